"""Chat with the fine-tuned model in a terminal: multi-turn, streamed replies, line editing and input history.

Commands: /reset, /system TEXT, /save FILE (append the chat as "messages" training rows), /help; exit, quit or Ctrl-D
leave. Ctrl-C stops the reply being written and keeps the conversation; at the prompt it leaves.

  python chat.py                                    # the seed's decoding defaults (sampling)
  python chat.py --temperature 0                    # greedy, reproducible replies
  python chat.py --adapter_dir Qwen_finetuning_model --max_context_tokens 8192
  printf '你好\\n/save chats.jsonl\\n' | python chat.py  # scripted, from a pipe
"""

from qwen_sft import defaults
from qwen_sft.cli import parse_config, run_stage
from qwen_sft.inherit import inherit_from_adapter
from qwen_sft.presets import with_preset

ADAPTER_DIR = defaults.ADAPTER_FOLDER  # adapter folder from Qwen_finetuning.py; `auto` below = as its manifest records
SYSTEM_PROMPT = "auto"  # system message at the start of the conversation (/system changes it); auto = as trained
MAX_NEW_TOKENS = defaults.MAX_NEW_TOKENS  # length limit of each reply
TEMPERATURE = defaults.TEMPERATURE  # sampling temperature; 0 = greedy
TOP_P = defaults.TOP_P  # nucleus sampling share (only when TEMPERATURE > 0)
REPETITION_PENALTY = defaults.REPETITION_PENALTY  # >1 discourages repeating tokens already in the conversation
NO_REPEAT_NGRAM_SIZE = defaults.NO_REPEAT_NGRAM_SIZE  # never repeat an n-gram of this size; 0 = off
MAX_CONTEXT_TOKENS = "auto"  # prompt + reply budget, oldest exchanges dropped to fit; auto = training's MAX_SEQ_LENGTH
HISTORY_FILE = "~/.qwen_sft_chat_history"  # readline input history kept across sessions; empty = none
SHOW_PROMPT = False  # print the full rendered prompt (system, history, message) before each reply
BASE_MODEL = "auto"  # base model the adapter is applied to: auto (as trained), a hub id, a local folder, or tiny
LOAD_IN_4BIT = "auto"  # load the base model in NF4 4-bit: auto (as trained), true or false
BACKEND = "auto"  # auto (Unsloth when CUDA and unsloth are present), unsloth, or hf (transformers + PEFT)
FAST_GENERATION = "auto"  # auto (merged bf16 copy + static cache + torch.compile when the GPU has room), true or false
PRESET = "none"  # none, or greedy (temperature 0, no repetition penalties: reproducible); flags given still win


def main():
    cfg = parse_config(globals(), resolve=with_preset("chat", then=inherit_from_adapter))
    from qwen_sft.chat import run_chat

    run_chat(cfg)


if __name__ == "__main__":
    run_stage(main)
