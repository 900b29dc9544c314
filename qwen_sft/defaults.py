"""The defaults that more than one stage script shares, each written once.

The constants at the top of each stage script stay the place a user reads and edits: a script names the value below
that it shares with another (as it names template.DEFAULT_SYSTEM_PROMPT), and `--help` prints the value. inherit.py
falls back on training's for an adapter manifest that an older version wrote without them.
"""

# Handed from stage to stage
MIX_FILE = "mixed_finetune_dataset.jsonl"  # the data stages write it; training reads it
ADAPTER_FOLDER = "Qwen_finetuning_model"  # training writes it; evaluation, inference, chat and export read it
MAX_SEQ_LENGTH = 2048  # training's tokens per example; the data stages drop rows estimated to exceed it

# Training's settings that the later stages inherit (Qwen_finetuning.py)
BASE_MODEL = "Qwen/Qwen2.5-7B-Instruct"
LOAD_IN_4BIT = True
EVAL_RATIO = 0.1
SPLIT_SEED = 42

# The data stages, Option A (data_integration.py) and Option B (data_set_generation.py)
MY_REPORT_DATA_PATH = "my_dataset.json"
MIX_SEED = 42
MIN_OUTPUT_CHARS = 2
SHUFFLE_BUFFER = 10000
BAD_ROW_REPORT_LIMIT = 10
MAX_ROWS_READ = 1_000_000
HUB_TIMEOUT_SECONDS = 30
NETWORK_RETRY_SECONDS = 120

# Decoding: the seed's sampling in inference.py and chat.py, and in export_model.py's Ollama Modelfile
MAX_NEW_TOKENS = 512
TEMPERATURE = 0.8
TOP_P = 0.9
REPETITION_PENALTY = 1.3
NO_REPEAT_NGRAM_SIZE = 3
