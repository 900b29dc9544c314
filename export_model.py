"""Merge the LoRA adapter into its base model and write a standalone 16-bit model folder.

OUTPUT_DIR gets safetensors weights, config, generation config (stops at <|im_end|>), the tokenizer with the
chat template training used, a manifest and, optionally, an Ollama Modelfile. Plain transformers and vLLM load
it as is; llama.cpp's convert_hf_to_gguf.py turns it into a GGUF file (see the README).

  python export_model.py                                     # Qwen_finetuning_model -> Qwen_finetuning_merged (bf16)
  python export_model.py --dtype float16 --output_dir qwen-ft-fp16
  python export_model.py --ollama_modelfile false
"""

from qwen_sft.cli import parse_config, run_stage
from qwen_sft.template import DEFAULT_SYSTEM_PROMPT

ADAPTER_DIR = "Qwen_finetuning_model"  # adapter folder from Qwen_finetuning.py; its manifest names the base model
OUTPUT_DIR = "Qwen_finetuning_merged"  # the merged model folder (replaced only once complete)
OVERWRITE_OUTPUT = False  # write into an OUTPUT_DIR this toolkit did not create (files of the same name replaced)
DTYPE = "bfloat16"  # weight type of the merged model: bfloat16, float16, or float32 (exact, twice the size)
OLLAMA_MODELFILE = True  # also write OUTPUT_DIR/Modelfile (ChatML template, SYSTEM_PROMPT, stop tokens)
SYSTEM_PROMPT = DEFAULT_SYSTEM_PROMPT  # the Modelfile's system prompt (keep it as in training)
BACKEND = "auto"  # auto (Unsloth's merged save when CUDA and unsloth are present), unsloth, or hf (PEFT merge)


def main():
    cfg = parse_config(globals())
    from qwen_sft.export import export_merged

    export_merged(cfg)


if __name__ == "__main__":
    run_stage(main)
