"""`tiny`: a small random-weight model of the family in use (families/), with its real tokenizer, built offline
in seconds: for Qwen2.5, a 2-layer Qwen2 with the real Qwen2.5 tokenizer.

It stands in for Qwen/Qwen2.5-7B-Instruct wherever a base model is named, so that the whole pipeline runs and is
tested on a CPU with no hub. The build is deterministic (the pinned vocabulary, a fixed seed) and cached on disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .cli import UserError
from .families import family
from .qwen_tokenizer_build import build_qwen2_5_tokenizer, write_portable_tokenizer_config

TINY_NAME = "tiny"
TINY_VERSION = "v2"  # bump when the build below changes, so stale caches are not reused


def cache_root() -> Path:
    return Path(os.environ.get("QWEN_SFT_CACHE", Path.home() / ".cache" / "qwen_sft"))


def cache_not_writable(error: OSError) -> UserError:
    """The one line for a cache folder that cannot be written (a read-only mount, a full disk, no permission)."""
    return UserError(f"the cache {cache_root()} cannot be written ({error.strerror or error}); set QWEN_SFT_CACHE "
                     "to a writable folder")


def tiny_path() -> Path:
    """The folder holding the tiny model and tokenizer, built on first use."""
    folder = cache_root() / f"tiny-{TINY_VERSION}"
    if not (folder / "config.json").is_file():
        try:
            _build(folder)
        except OSError as error:
            raise cache_not_writable(error) from None
    return folder


def _build(folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tokenizer = build_qwen2_5_tokenizer(family.CHAT_TEMPLATE_PATH.read_text(encoding="utf-8"))
    end_of_turn, end_of_text = tokenizer.convert_tokens_to_ids([family.END_OF_TURN, family.END_OF_TEXT])
    config = AutoConfig.for_model(
        family.MODEL_TYPE,
        vocab_size=family.VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        eos_token_id=end_of_turn,
        pad_token_id=end_of_text,
        bos_token_id=None,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(
        eos_token_id=[end_of_turn, end_of_text], pad_token_id=end_of_text, do_sample=False
    )
    model.config.name_or_path = TINY_NAME

    # Build beside the final folder and rename, so a concurrent or interrupted build never leaves half a model.
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    write_portable_tokenizer_config(temporary)
    try:
        os.rename(temporary, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # another process did not win the race: a real failure
            raise
        shutil.rmtree(temporary, ignore_errors=True)
