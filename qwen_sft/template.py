"""The one prompt template. Training, evaluation, inference and chat all build their text here.

Messages are system (a fixed cross-domain expert prompt unless overridden), user (`instruction`, plus `input`
under a "补充信息" heading when it is non-empty) and assistant (`output`). They are rendered by the tokenizer's
own chat template (ChatML for Qwen2.5). The loss covers the answer and its closing `<|im_end|>` only.
"""

from __future__ import annotations

from .cli import UserError

DEFAULT_SYSTEM_PROMPT = (
    "你是一位跨领域专家，精通人工智能、集成电路（IC）设计与制造以及生物医学。"
    "请基于事实作答：先给出结论，再分点说明依据；不确定时请明确说明，不要编造。"
)
INPUT_HEADING = "补充信息"
END_OF_TURN = "<|im_end|>"


def user_content(instruction: str, extra_input: str = "") -> str:
    if extra_input and extra_input.strip():
        return f"{instruction}\n\n{INPUT_HEADING}：\n{extra_input}"
    return instruction


def build_messages(record: dict, system_prompt: str = DEFAULT_SYSTEM_PROMPT, with_answer: bool = False) -> list[dict]:
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": user_content(record["instruction"], record.get("input", ""))},
    ]
    if with_answer:
        messages.append({"role": "assistant", "content": record["output"]})
    return messages


def require_chat_template(tokenizer, folder) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{folder}: the tokenizer has no chat template; re-run Qwen_finetuning.py to write a complete adapter folder"
        )


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text the model sees before it answers: the conversation plus the opened assistant turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer followed by the end-of-turn token, the only tokens that carry loss."""
    return tokenizer(answer + END_OF_TURN, add_special_tokens=False)["input_ids"]


def tokenize_example(tokenizer, record: dict, system_prompt: str, max_seq_length: int):
    """Token ids and completion mask of one training example, or None when the answer alone does not fit.

    A prompt that would push the example past `max_seq_length` loses its oldest tokens (the start of the
    system prompt); the answer is never cut. Returns (example, prompt_was_truncated).
    """
    prompt = prompt_ids(tokenizer, build_messages(record, system_prompt))
    answer = answer_ids(tokenizer, record["output"])
    if len(answer) >= max_seq_length:
        return None, False
    room = max_seq_length - len(answer)
    truncated = len(prompt) > room
    prompt = prompt[-room:]
    example = {"input_ids": prompt + answer, "completion_mask": [0] * len(prompt) + [1] * len(answer)}
    return example, truncated
