"""Answer with the fine-tuned model: one streamed answer, or batched answers for a JSONL file of prompts.

The prompt is built by the same template as training (system, instruction, input under 补充信息). With
INSTRUCTION_FILE, each row's "instruction" (and optional "input"), or conversation ("messages", answered after its
last user turn), is answered in batches and OUTPUT_FILE gets the row plus "output", "tokens" and "stopped", with
a manifest beside it.

  python inference.py                                              # the example question below, streamed
  python inference.py --instruction "解释什么是LoRA微调" --temperature 0
  python inference.py --instruction "总结报告要点" --input "$(cat report.txt)"
  python inference.py --instruction_file questions.jsonl --output_file answers.jsonl
  cat questions.jsonl | python inference.py --instruction_file -
"""

from qwen_sft import defaults
from qwen_sft.cli import parse_config, run_stage
from qwen_sft.inherit import inherit_from_adapter
from qwen_sft.presets import with_preset

ADAPTER_DIR = defaults.ADAPTER_FOLDER  # adapter folder from Qwen_finetuning.py; `auto` below = as its manifest records
INSTRUCTION = "请解释什么是LoRA微调，并说明它为什么能降低显存占用。"  # the question (ignored with INSTRUCTION_FILE)
INPUT = ""  # extra context for INSTRUCTION, shown under 补充信息; empty = none
SYSTEM_PROMPT = "auto"  # system message; auto = as trained
INSTRUCTION_FILE = ""  # JSONL/JSON array of prompt rows (README "Data format", "tools" too); - = stdin; empty = INSTRUCTION
DATASET_FORMAT = "auto"  # auto (each row by its keys), alpaca, sharegpt, messages, prompt_completion or text (README: "Data format")
OUTPUT_FILE = "inference_results.jsonl"  # answers for INSTRUCTION_FILE, one row per prompt row
OVERWRITE_OUTPUT = False  # replace an OUTPUT_FILE this toolkit did not write (or that was changed since)
BATCH_SIZE = 32  # prompts per generate() call with INSTRUCTION_FILE; lower it if the GPU runs out of memory
MAX_NEW_TOKENS = defaults.MAX_NEW_TOKENS  # length limit of each answer
TEMPERATURE = defaults.TEMPERATURE  # sampling temperature; 0 = greedy
TOP_P = defaults.TOP_P  # nucleus sampling share (only when TEMPERATURE > 0)
REPETITION_PENALTY = defaults.REPETITION_PENALTY  # >1 discourages repeating tokens already in the prompt or answer
NO_REPEAT_NGRAM_SIZE = defaults.NO_REPEAT_NGRAM_SIZE  # never repeat an n-gram of this size; 0 = off
BASE_MODEL = "auto"  # base model the adapter is applied to: auto (as trained), a hub id, a local folder, or tiny
LOAD_IN_4BIT = "auto"  # load the base model in NF4 4-bit: auto (as trained), true or false
MAX_SEQ_LENGTH = "auto"  # sequence length Unsloth loads the model for; auto = as trained
BACKEND = "auto"  # auto (Unsloth when CUDA and unsloth are present), unsloth, or hf (transformers + PEFT)
FAST_GENERATION = "auto"  # auto (merged bf16 copy + static cache + torch.compile when the GPU has room), true or false
PRESET = "none"  # none, or greedy (temperature 0, no repetition penalties: reproducible); flags given still win


def main():
    cfg = parse_config(globals(), resolve=with_preset("inference", then=inherit_from_adapter))
    from qwen_sft.inference import run_inference

    run_inference(cfg)


if __name__ == "__main__":
    run_stage(main)
