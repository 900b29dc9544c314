"""Evaluate the fine-tuned adapter on the eval split training held out, beside its base model (adapter off).

Teacher-forced eval_loss and perplexity (loss on the answer and <|im_end|> only, as in training), length
statistics and truncation_rate, then answers generated from system + user in batches: empty_rate, exact_match,
lengths, distinct-1/2 and, with --rouge, ROUGE-1/2/L. Writes OUTPUT_DIR/metrics.json (every metric, the
per-source breakdown, config and versions) and OUTPUT_DIR/predictions.jsonl, then prints base vs tuned.

  python evaluate.py                                   # as trained (the adapter's manifest); 512 new tokens
  python evaluate.py --rouge --max_gen_samples 200     # ROUGE too, answers for 200 seeded eval rows only
  python evaluate.py --compare_base false              # the adapter alone
"""

from qwen_sft import defaults
from qwen_sft.cli import parse_config, run_stage
from qwen_sft.inherit import inherit_from_adapter
from qwen_sft.presets import with_preset

ADAPTER_DIR = defaults.ADAPTER_FOLDER  # adapter folder from Qwen_finetuning.py; `auto` below = as its manifest records
BASE_MODEL = "auto"  # base model the adapter is applied to: auto (as trained), a hub id, a local folder, or tiny
DATASET_PATH = "auto"  # the dataset whose eval split is evaluated; auto = the one training used
DATASET_FORMAT = "auto"  # auto (each row by its keys), alpaca, sharegpt, messages, prompt_completion or text (README: "Data format")
OUTPUT_DIR = "evaluation_results"  # metrics.json and predictions.jsonl are written here
OVERWRITE_OUTPUT = False  # write into an OUTPUT_DIR this toolkit did not create (your files kept, as NAME.user)
SYSTEM_PROMPT = "auto"  # system message of every example; auto = as trained
MAX_SEQ_LENGTH = "auto"  # tokens per example (longer prompts are cut from the left); auto = as trained
EVAL_RATIO = "auto"  # share of rows held out; auto = as trained (the same seeded split)
SPLIT_SEED = "auto"  # seed of the train/eval split; auto = as trained
GENERATION_SEED = 42  # picks the MAX_GEN_SAMPLES rows, and seeds sampling (TEMPERATURE > 0)
EVAL_BATCH_SIZE = 8  # rows per teacher-forced forward pass
MAX_NEW_TOKENS = defaults.MAX_NEW_TOKENS  # length limit of each generated answer
GEN_BATCH_SIZE = 64  # rows per generate() call, left-padded; lower it if the GPU runs out of memory
MAX_GEN_SAMPLES = 0  # eval rows to generate answers for (a seeded choice); 0 or -1 = all
TEMPERATURE = 0.0  # 0 = greedy (reproducible); above 0 samples
TOP_P = 1.0  # nucleus sampling share (only when TEMPERATURE > 0)
COMPARE_BASE = True  # also evaluate the base model (adapter switched off) on the same rows
ROUGE = False  # ROUGE-1/2/L of the answers (needs `pip install rouge-score`)
LOAD_IN_4BIT = "auto"  # load the base model in NF4 4-bit: auto (as trained), true or false
BACKEND = "auto"  # auto (Unsloth when CUDA and unsloth are present), unsloth, or hf (transformers + PEFT)
FAST_GENERATION = "auto"  # auto (merged bf16 copy + static cache + torch.compile when the GPU has room), true or false
PRESET = "none"  # none, or tiny (short answers for 8 rows, for the tiny model); flags given still win


def main():
    cfg = parse_config(globals(), resolve=with_preset("evaluate", then=inherit_from_adapter))
    from qwen_sft.evaluation import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    run_stage(main)
