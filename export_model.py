"""Merge the LoRA adapter into its base model and write a standalone 16-bit model folder.

OUTPUT_DIR gets safetensors weights, config, generation config (stops at <|im_end|>), the tokenizer with the
chat template training used, a manifest, an Ollama Modelfile and, with --gguf, a GGUF file written by llama.cpp's
own converter (llama.cpp, llama-cpp-python, Ollama and LM Studio load it). Plain transformers and vLLM load the
folder as is.

  python export_model.py                                     # Qwen_finetuning_model -> Qwen_finetuning_merged (bf16)
  python export_model.py --gguf q8_0                         # also Qwen_finetuning_merged/model-q8_0.gguf
  python export_model.py --dtype float16 --output_dir qwen-ft-fp16
  python export_model.py --ollama_modelfile false
"""

from qwen_sft import defaults
from qwen_sft.cli import parse_config, run_stage
from qwen_sft.inherit import inherit_from_adapter

ADAPTER_DIR = defaults.ADAPTER_FOLDER  # adapter folder from Qwen_finetuning.py; `auto` below = as its manifest records
BASE_MODEL = "auto"  # base model the adapter is merged into: auto (as trained), a hub id, a local folder, or tiny
OUTPUT_DIR = "Qwen_finetuning_merged"  # the merged model folder (replaced only once complete)
OVERWRITE_OUTPUT = False  # write into an OUTPUT_DIR this toolkit did not create (your files kept, as NAME.user)
DTYPE = "bfloat16"  # weight type of the merged model: bfloat16, float16, or float32 (exact, twice the size)
OLLAMA_MODELFILE = True  # also write OUTPUT_DIR/Modelfile (ChatML template, SYSTEM_PROMPT, stop tokens)
SYSTEM_PROMPT = "auto"  # the Modelfile's system prompt; auto = as trained
MAX_SEQ_LENGTH = "auto"  # the Modelfile's num_ctx, and the length Unsloth loads the model for; auto = as trained
TEMPERATURE = defaults.TEMPERATURE  # the Modelfile's sampling temperature (inference.py's and chat.py's)
TOP_P = defaults.TOP_P  # the Modelfile's nucleus sampling share
REPETITION_PENALTY = defaults.REPETITION_PENALTY  # the Modelfile's repeat_penalty
GGUF = ""  # also write OUTPUT_DIR/model-<type>.gguf with llama.cpp's converter: q8_0, bf16, f16 or f32; empty = no
LLAMA_CPP_DIR = ""  # a llama.cpp checkout whose converter to use; empty = llama-cpp-python 0.3.36's, fetched once by pip
BACKEND = "auto"  # auto (Unsloth's merged save when CUDA and unsloth are present), unsloth, or hf (PEFT merge)


def main():
    cfg = parse_config(globals(), resolve=inherit_from_adapter)
    from qwen_sft.export import export_merged

    export_merged(cfg)


if __name__ == "__main__":
    run_stage(main)
