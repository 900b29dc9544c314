"""Fine-tune Qwen2.5 with LoRA on mixed_finetune_dataset.jsonl (Unsloth + TRL SFTTrainer, 4-bit base).

Writes checkpoints and TensorBoard logs to OUTPUT_DIR, then the adapter with its tokenizer, loss curve and
manifest to ADAPTER_DIR (and the tokenizer again to TOKENIZER_DIR).

  python Qwen_finetuning.py                                   # the seed defaults, Qwen/Qwen2.5-7B-Instruct
  python Qwen_finetuning.py --preset tiny                     # the offline CPU demo: the tiny model, 30 steps
  python Qwen_finetuning.py --resume_from_checkpoint auto     # continue an interrupted run
  python Qwen_finetuning.py --preset h200_fast                # fastest on a 48 GB+ GPU (gpu24 for 24 GB)
"""

from qwen_sft import defaults
from qwen_sft.cli import parse_config, run_stage
from qwen_sft.mix_check import check_against_mix
from qwen_sft.modeling import LORA_TARGET_MODULES
from qwen_sft.presets import with_preset
from qwen_sft.template import DEFAULT_SYSTEM_PROMPT

BASE_MODEL = defaults.BASE_MODEL  # hub id, local model folder, or `tiny` (built offline)
DATASET_PATH = defaults.MIX_FILE  # JSONL or JSON array of rows in any format of README "Data format"
DATASET_FORMAT = "auto"  # auto (each row by its keys), alpaca, sharegpt, messages, prompt_completion or text (README: "Data format")
SYSTEM_PROMPT = DEFAULT_SYSTEM_PROMPT  # system message of every example
MAX_SEQ_LENGTH = defaults.MAX_SEQ_LENGTH  # tokens per example; longer prompts are cut from the left, never the answer
LOAD_IN_4BIT = defaults.LOAD_IN_4BIT  # load the base model in NF4 4-bit (bitsandbytes)
BACKEND = "auto"  # auto (Unsloth when CUDA and unsloth are present), unsloth, or hf (transformers + PEFT)
LORA_R = 16  # LoRA rank
LORA_ALPHA = 32  # LoRA scaling numerator (alpha / r)
LORA_DROPOUT = 0.0  # dropout on the LoRA path
LORA_TARGET_MODULES = LORA_TARGET_MODULES  # projections that get adapters
GRADIENT_CHECKPOINTING = "auto"  # recompute activations (Unsloth's mode): auto = only where memory needs it
NUM_TRAIN_EPOCHS = 3  # passes over the training split (ignored when MAX_STEPS > 0)
MAX_STEPS = -1  # optimizer steps; -1 = use NUM_TRAIN_EPOCHS (0 is refused)
PER_DEVICE_TRAIN_BATCH_SIZE = "auto"  # rows per micro-batch: auto = the largest that fits the GPU (CPU: 2), or N
GRADIENT_ACCUMULATION_STEPS = "auto"  # micro-batches per step: auto = 8 rows a step over all processes, or N
LEARNING_RATE = 2e-4  # peak learning rate
LR_SCHEDULER_TYPE = "linear"  # learning-rate schedule after warm-up
WARMUP_STEPS = 5  # linear warm-up steps
WEIGHT_DECAY = 0.01  # AdamW weight decay
OPTIM = "adamw_8bit"  # optimizer (bitsandbytes 8-bit AdamW; adamw_torch also works)
LOGGING_STEPS = 10  # log (and print a summary line) every N steps
EVAL_STEPS = 50  # evaluate on the eval split every N steps
SAVE_STEPS = 50  # write a checkpoint every N steps
SAVE_TOTAL_LIMIT = 3  # keep at most N checkpoints (the best is always kept)
LOAD_BEST_MODEL_AT_END = True  # restore the checkpoint with the lowest eval loss at the end
NEFTUNE_NOISE_ALPHA = 5.0  # NEFTune embedding noise; 0 = off
PACKING = False  # pack rows padding-free into MAX_SEQ_LENGTH rows (Unsloth on CUDA only); see README
GROUP_BY_LENGTH = True  # unpacked: batch rows of similar length (less padding); batches still come in random order
PRESET = "none"  # none, h200_fast (fastest, 48 GB+ GPU), gpu24 (fits 24 GB), tiny or tiny_cpu; flags given still win
SEED = 3407  # training seed (LoRA init, data order, dropout)
SPLIT_SEED = defaults.SPLIT_SEED  # seed of the 90/10 train/eval split (evaluate.py uses the same)
EVAL_RATIO = defaults.EVAL_RATIO  # share of rows held out for evaluation; 0 = no eval split
RESUME_FROM_CHECKPOINT = "false"  # false, a checkpoint folder, or auto (latest complete one in OUTPUT_DIR)
OUTPUT_DIR = "outputs"  # checkpoints and TensorBoard logs
ADAPTER_DIR = defaults.ADAPTER_FOLDER  # final adapter + tokenizer + manifest + loss curve
TOKENIZER_DIR = "Qwen_finetuning_tokenizer"  # tokenizer copy, as the seed project had it
OVERWRITE_OUTPUT = False  # write into folders this toolkit did not create (your files kept; OUTPUT_DIR in place)


def main():
    cfg = parse_config(globals(), resolve=with_preset("training", then=check_against_mix))
    from qwen_sft.training import train

    train(cfg, script_name=__file__)


if __name__ == "__main__":
    run_stage(main)
