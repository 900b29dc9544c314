#!/usr/bin/env bash
# Every GPU measurement recorded in bench/results/, on one H200 with no network (see bench/README.md).
# Each part fits in one 10-minute command; the random 7B-shaped model is built once in /tmp and reused.
#
#   bash bench/run_h200.sh pipeline LOG_DIR   # the real GPU path: data mix -> 30 steps -> evaluate -> inference,
#                                             # and the packed-vs-padded loss check
#   bash bench/run_h200.sh speed LOG_DIR      # training throughput (a)/(b)/(c) and the profile behind it
#   bash bench/run_h200.sh generation LOG_DIR # generation: the 4-bit path vs the fast path (merged bf16, static
#                                             # cache, compiled), bs1 and evaluation; within 560 s
#   bash bench/run_h200.sh generation_old LOG_DIR  # the same in two commands (the machine must stay warm between
#   bash bench/run_h200.sh generation_new LOG_DIR  # them): setup + the old path, then the new path + the report
set -uo pipefail
usage="usage: run_h200.sh pipeline|speed|generation|generation_old|generation_new LOG_DIR"
part=${1:?$usage}
mkdir -p "${2:?$usage}"
logs=$(cd "$2" && pwd)  # absolute: the steps run in $work
root=$(cd "$(dirname "$0")/.." && pwd)
model=/tmp/qwen7b-random
work=/tmp/h200_run
mkdir -p "$logs" "$work"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
run() {  # run NAME TIMEOUT COMMAND...: log to LOG_DIR/NAME.log, keep going when one step fails
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local started=$SECONDS
  (cd "$work" && timeout "$limit" "$@") > "$logs/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - started)) s"
  tr '\r' '\n' < "$logs/$name.log" | grep -E "^step |error|Error|tok/s|real tok|final eval|c/a|ratio|wrote|backend:|packing:|GPU busy|^=== |FAILED|^(bs1|eval|peak|agreement)" | tail -15
}

[[ $part == generation* ]] || python3 "$root/bench/random_qwen7b.py" "$model"  # generation's setup part builds it
if [[ $part != generation* && ! -f "$work/mix.jsonl" ]]; then  # the data stage's own mix, from hub-schema sources of realistic shape
  python3 "$root/bench/data_mix_benchmark.py" --total_samples 1500 --data_dir "$work/sources" --sources_only >/dev/null
  (cd "$work" && python3 "$root/data_set_generation.py" --total_samples 1500 --output_file mix.jsonl \
    --my_report_data_path sources/my_reports.jsonl \
    --sources orca=sources/slimorca.jsonl,pubmed=sources/pubmedqa_pqa_labeled.jsonl,stackexchange=sources/stack_exchange_preferences.jsonl \
    | tail -3)
fi

case $part in
pipeline)
  # The seed defaults (4-bit, LoRA r16/a32, batch 2 x 4, lr 2e-4, adamw_8bit, NEFTune 5), Unsloth backend.
  run train 420 python3 "$root/Qwen_finetuning.py" --base_model "$model" --dataset_path mix.jsonl \
    --max_steps 30 --eval_steps 15 --save_steps 15 --logging_steps 5
  cp "$work/Qwen_finetuning_model/manifest.json" "$logs/train_manifest.json"
  run evaluate 300 python3 "$root/evaluate.py" --dataset_path mix.jsonl --max_gen_samples 16 --max_new_tokens 64
  cp "$work/evaluation_results/metrics.json" "$logs/evaluate_metrics.json"
  run inference 200 python3 "$root/inference.py" --max_new_tokens 48
  run packing_check 300 python3 "$root/bench/packing_check.py" --model "$model" --mix mix.jsonl \
    --out "$logs/packing_check.json"
  ;;
speed)
  run train_throughput 360 python3 "$root/bench/train_throughput.py" --model "$model" --mix mix.jsonl \
    --out "$logs/train_throughput.json"
  run profile_training 300 python3 "$root/bench/profile_training.py" --model "$model" --mix mix.jsonl \
    --out "$logs/profile_training.json"
  ;;
generation)  # each part runs in its own process and records its own failures (see the script's docstring)
  run generation_throughput 595 python3 "$root/bench/generation_throughput.py" --model_dir "$model" \
    --results_dir "$logs"
  ;;
generation_old)
  run generation_throughput_old 595 python3 "$root/bench/generation_throughput.py" --model_dir "$model" \
    --results_dir "$logs" --parts setup,old
  ;;
generation_new)
  run generation_throughput_new 595 python3 "$root/bench/generation_throughput.py" --model_dir "$model" \
    --results_dir "$logs" --parts new,report
  ;;
esac
