"""The one template: the tiny tokenizer renders like Qwen2.5's official template, and the loss mask."""

import hashlib

import pytest
from transformers import AutoTokenizer

from qwen_sft.families import family
from qwen_sft.template import (
    DEFAULT_SYSTEM_PROMPT,
    build_messages,
    render_prompt,
    tokenize_example,
    user_content,
)
from qwen_sft.tiny import tiny_path

# sha256 of Qwen2.5-7B-Instruct's official chat template (tokenizer_config.json "chat_template").
OFFICIAL_TEMPLATE_SHA256 = "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny_path())


def chatml(*turns, open_assistant=False):
    """Hand-written ChatML, the format Qwen2.5's template produces."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + ("<|im_start|>assistant\n" if open_assistant else "")


def test_shipped_template_is_the_official_one(tokenizer):
    assert hashlib.sha256(family.CHAT_TEMPLATE_PATH.read_bytes()).hexdigest() == OFFICIAL_TEMPLATE_SHA256
    assert tokenizer.chat_template == family.CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "messages, add_generation_prompt, expected",
    [
        (
            [{"role": "system", "content": "S"}, {"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}],
            False,
            chatml(("system", "S"), ("user", "问"), ("assistant", "答")),
        ),
        (
            [{"role": "user", "content": "hi\nthere"}],
            True,
            chatml(("system", QWEN_DEFAULT_SYSTEM), ("user", "hi\nthere"), open_assistant=True),
        ),
        (
            [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}],
            True,
            chatml(("system", QWEN_DEFAULT_SYSTEM), ("user", "q1"), ("assistant", "a1"), ("user", "q2"),
                   open_assistant=True),
        ),
    ],
)
def test_renders_byte_identical_chatml(tokenizer, messages, add_generation_prompt, expected):
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert rendered.encode() == expected.encode()


def test_tiny_tokenizer_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, token  # atomic, never split into bytes
    assert tokenizer.decode(tokenizer("LoRA 微调 ÷ 😀")["input_ids"]) == "LoRA 微调 ÷ 😀"  # byte-level: lossless


def test_user_turn_and_default_system_prompt(tokenizer):
    assert user_content("总结", "") == "总结"
    assert user_content("总结", "   ") == "总结"
    assert user_content("总结", "报告正文") == "总结\n\n补充信息：\n报告正文"
    text = render_prompt(tokenizer, build_messages({"instruction": "总结", "input": "报告正文"}))
    assert text == chatml(("system", DEFAULT_SYSTEM_PROMPT), ("user", "总结\n\n补充信息：\n报告正文"), open_assistant=True)


def test_loss_mask_covers_answer_and_end_of_turn_only(tokenizer):
    record = {"instruction": "报告的良率是多少？", "input": "良率 93%", "output": "良率为93%。"}
    example, truncated = tokenize_example(tokenizer, record, DEFAULT_SYSTEM_PROMPT, 2048)
    assert not truncated
    ids, mask = example["input_ids"], example["completion_mask"]
    labelled = [token for token, bit in zip(ids, mask) if bit]
    assert tokenizer.decode(labelled) == "良率为93%。<|im_end|>"
    assert labelled[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt_part = tokenizer.decode([token for token, bit in zip(ids, mask) if not bit])
    assert prompt_part.endswith("<|im_start|>assistant\n") and "良率 93%" in prompt_part
    assert mask == sorted(mask)  # one prompt block, then one answer block
    full = tokenizer.apply_chat_template(build_messages(record, with_answer=True), tokenize=False)
    assert full == tokenizer.decode(ids) + "\n"  # the template's trailing newline carries no loss


def test_long_prompt_is_cut_from_the_left_and_answer_kept(tokenizer):
    record = {"instruction": "问题 " * 400, "input": "", "output": "短答案"}
    example, truncated = tokenize_example(tokenizer, record, DEFAULT_SYSTEM_PROMPT, 64)
    assert truncated and len(example["input_ids"]) == 64
    labelled = [token for token, bit in zip(example["input_ids"], example["completion_mask"]) if bit]
    assert tokenizer.decode(labelled) == "短答案<|im_end|>"
    too_long = {"instruction": "q", "input": "", "output": "答 " * 200}
    assert tokenize_example(tokenizer, too_long, DEFAULT_SYSTEM_PROMPT, 64) == (None, False)
