#!/usr/bin/env bash
# Every GPU measurement recorded in bench/results/, on H200s with no network (see bench/README.md).
# Each part fits in one 10-minute command; the random 7B-shaped model is built once in /tmp and reused.
#
#   bash bench/run_h200.sh pipeline LOG_DIR   # the real GPU path: data mix -> 30 steps -> evaluate -> inference,
#                                             # and the packed-vs-padded loss check
#   bash bench/run_h200.sh speed LOG_DIR      # training throughput: bare Unsloth (a), the packed stage 4 x 2
#                                             # (c_current), --preset h200_fast (c): c/a, loss parity, peak memory
#   bash bench/run_h200.sh default LOG_DIR    # the default (unpacked) path: the seed's 2 x 4 against auto, with
#                                             # the whole card and under 24 GB and 16 GB caps: ratios, loss parity
#   bash bench/run_h200.sh padding_free LOG_DIR  # auto with grouped padding against auto with padding-free
#                                             # batches (TRL's padding_free, unpacked): ratio, loss parity
#   bash bench/run_h200.sh two_gpus LOG_DIR   # (2 GPUs) the fast stage on 1 vs 2 GPUs: scaling efficiency
#   bash bench/run_h200.sh grad LOG_DIR       # token-weighted accumulation on the GPU: LoRA gradients of (B, 1)
#                                             # vs (B/k, k), unpacked and packed (bench/accumulation_check.py)
#   bash bench/run_h200.sh gpu_tests LOG_DIR  # the pytest GPU tests (needs pytest and pytest-timeout there)
#   bash bench/run_h200.sh profile LOG_DIR    # where the stage's time goes against the bare loop
#   bash bench/run_h200.sh generation LOG_DIR # generation: the 4-bit path vs the fast path (merged bf16, static
#                                             # cache, compiled), bs1 and evaluation; within 560 s
#   bash bench/run_h200.sh generation_old LOG_DIR  # the same in two commands (the machine must stay warm between
#   bash bench/run_h200.sh generation_new LOG_DIR  # them): setup + the old path, then the new path + the report
set -uo pipefail
usage="usage: run_h200.sh pipeline|speed|default|padding_free|two_gpus|grad|gpu_tests|profile|generation|generation_old|generation_new LOG_DIR"
part=${1:?$usage}
logs=${2:?$usage}
logs=$(mkdir -p "$logs" && cd "$logs" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
model=/tmp/qwen7b-random
work=/tmp/h200_run
mkdir -p "$logs" "$work"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# qwen_sft for the benchmarks, where it is not pip-installed (pip install -e . elsewhere)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# One GPU unless a part asks for more (train_throughput.py --two_gpus sets its own): a single process that sees two
# GPUs would train with DataParallel.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
run() {  # run NAME TIMEOUT COMMAND...: log to LOG_DIR/NAME.log, keep going when one step fails
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local started=$SECONDS
  (cd "$work" && timeout "$limit" "$@") > "$logs/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - started)) s"
  tr '\r' '\n' < "$logs/$name.log" | grep -E "^step |error|Error|tok/s|real tok|final eval|c/a|ratio|wrote|backend:|packing:|padding:|preset|GPU busy|efficiency|relative difference|passed|^=== |FAILED|^(bs1|eval|peak|agreement)|^batch:|/seed|/auto |out-of-memory" | tail -20
}

prepare() {  # the random 7B-shaped model, and the data stage's own mix from hub-schema sources of realistic shape
  python3 "$root/bench/random_qwen7b.py" "$model"
  if [ ! -f "$work/mix.jsonl" ]; then
    python3 "$root/bench/data_mix_benchmark.py" --total_samples 1500 --data_dir "$work/sources" --sources_only >/dev/null
    (cd "$work" && python3 "$root/data_set_generation.py" --total_samples 1500 --output_file mix.jsonl \
      --my_report_data_path sources/my_reports.jsonl \
      --sources orca=sources/slimorca.jsonl,pubmed=sources/pubmedqa_pqa_labeled.jsonl,stackexchange=sources/stack_exchange_preferences.jsonl \
      | tail -3)
  fi
}

case $part in
pipeline)
  prepare
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
  prepare
  run train_throughput 500 python3 "$root/bench/train_throughput.py" --model "$model" --mix mix.jsonl \
    --out "$logs/train_throughput.json"
  ;;
default)
  prepare
  run train_default_path 540 python3 "$root/bench/train_throughput.py" --model "$model" --mix mix.jsonl \
    --default_path --out "$logs/train_default_path.json"
  ;;
padding_free)
  prepare
  run train_padding_free 540 python3 "$root/bench/train_throughput.py" --model "$model" --mix mix.jsonl \
    --default_path --default_runs auto,auto_padding_free --out "$logs/train_padding_free.json"
  ;;
two_gpus)
  prepare
  run train_two_gpus 500 python3 "$root/bench/train_throughput.py" --model "$model" --mix mix.jsonl --two_gpus \
    --out "$logs/train_two_gpus.json"
  ;;
grad)
  run accumulation_check 540 python3 "$root/bench/accumulation_check.py" --out "$logs/accumulation_check.json" \
    --workdir "$work/accumulation_check"
  ;;
gpu_tests)
  if python3 -c "import pytest, pytest_timeout" 2>/dev/null; then
    run gpu_tests 540 python3 -m pytest "$root/tests/test_accumulation.py" "$root/tests/test_gpu.py" -m gpu -q -s \
      -p no:cacheprovider
  else
    echo "=== gpu_tests: skipped (this machine has no pytest with pytest-timeout); the grad part runs the same check"
  fi
  ;;
profile)
  prepare
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
*)
  echo "$usage" >&2; exit 2
  ;;
esac
