#!/usr/bin/env bash
# The whole pipeline, offline, on a CPU, with the embedded `tiny` model: every stage run as a user runs it.
# The bundled samples/ stand in for the hub datasets (same schemas). Everything is written to demo/.
#   bash scripts/demo_cpu.sh        (make demo sets up .venv first and runs this)
set -euo pipefail
PYTHON=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$root/demo"
cd "$root/demo"
started=$SECONDS
stage() { printf '\n===== %s\n' "$*"; }
samples="$root/samples"

stage "1. data mix, Option A: my_dataset.json + SlimOrca + PubMedQA samples -> mixed_finetune_dataset.jsonl"
$PYTHON "$root/data_integration.py" --my_report_data_path "$root/my_dataset.json" --total_samples 200 \
  --ratios reports=0.15,orca=0.55,pubmed=0.3 \
  --sources "orca=$samples/slimorca.jsonl,pubmed=$samples/pubmedqa_pqa_labeled.jsonl"
# The SlimOrca sample's multi-turn chats become "messages" rows: training gets a file of both formats.
echo "conversation (messages) rows in the mix: $(grep -c '^{"messages"' mixed_finetune_dataset.jsonl)"

stage "1b. data mix, Option B (keyword domains from StackExchange) -> mixed_option_b.jsonl"
$PYTHON "$root/data_set_generation.py" --my_report_data_path "$root/my_dataset.json" --total_samples 300 \
  --output_file mixed_option_b.jsonl \
  --sources "orca=$samples/slimorca.jsonl,pubmed=$samples/pubmedqa_pqa_labeled.jsonl,stackexchange=$samples/stack_exchange_preferences.jsonl"

stage "2. fine-tune the tiny model on the mix of single-turn and conversation rows (4-bit NF4 + LoRA, the seed's other defaults), 30 steps"
$PYTHON "$root/Qwen_finetuning.py" --preset tiny

stage "3. evaluate: tuned vs base on the eval split (32 new tokens, 8 rows)"
$PYTHON "$root/evaluate.py" --preset tiny

stage "4. inference: one streamed answer"
$PYTHON "$root/inference.py" --max_new_tokens 32

stage "5. chat: a scripted two-turn conversation, saved as a conversation (messages) training row"
printf '报告的良率是多少？\n再简短一点。\n/save chat_rows.jsonl\nexit\n' | $PYTHON "$root/chat.py" --max_new_tokens 24 --history_file ""

stage "6. export: merged 16-bit model + GGUF (q8_0, llama.cpp's converter, read back and checked) + Ollama Modelfile"
$PYTHON "$root/export_model.py" --gguf q8_0
$PYTHON -c 'import json; print("GGUF:", json.load(open("Qwen_finetuning_merged/manifest.json"))["gguf"])'

stage "done in $((SECONDS - started)) s; outputs in demo/"
ls "$root/demo"
