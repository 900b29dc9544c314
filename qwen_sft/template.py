"""The one prompt template. Training, evaluation, inference and chat all build their text here.

Messages are system (a fixed cross-domain expert prompt unless overridden), user (`instruction`, plus `input`
under a "补充信息" heading when it is non-empty) and assistant (`output`). A conversation record ("messages") keeps
its own turns, led by the same system prompt when it has no system turn of its own. They are rendered by the
tokenizer's own chat template (ChatML for Qwen2.5). The loss covers each answer (every assistant turn) and its
closing `<|im_end|>` only.
"""

from __future__ import annotations

from .errors import UserError
from .families import family

DEFAULT_SYSTEM_PROMPT = (
    "你是一位跨领域专家，精通人工智能、集成电路（IC）设计与制造以及生物医学。"
    "请基于事实作答：先给出结论，再分点说明依据；不确定时请明确说明，不要编造。"
)
INPUT_HEADING = "补充信息"


def user_content(instruction: str, extra_input: str = "") -> str:
    if extra_input and extra_input.strip():
        return f"{instruction}\n\n{INPUT_HEADING}：\n{extra_input}"
    return instruction


def is_conversation(record: dict) -> bool:
    return "messages" in record


def conversation_messages(record: dict, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """A conversation record's turns, led by `system_prompt` when it has no system turn of its own."""
    turns = record["messages"]
    if turns[0]["role"] == "system":
        return list(turns)
    return [{"role": "system", "content": system_prompt}, *turns]


def is_text(record: dict) -> bool:
    """A plain text row: language modelling (every token after the first learned), no prompt and no answer."""
    return "text" in record


def reference_answer(record: dict) -> str | None:
    """The answer a record teaches last: `output`, or a conversation's final assistant turn as the template writes
    it (its content, then its tool calls); None for a text row."""
    if is_text(record):
        return None
    if not is_conversation(record):
        return record["output"]
    last = record["messages"][-1]
    calls = [_rendered_call(call) for call in last.get("tool_calls", [])]
    return "\n".join(([last["content"]] if last["content"] else []) + calls)


def _rendered_call(call: dict) -> str:
    """One tool call as the official template writes it (its tojson: json.dumps with ensure_ascii=False)."""
    import json

    function = call["function"]
    arguments = json.dumps(function["arguments"], ensure_ascii=False)
    body = f'{{"name": "{function["name"]}", "arguments": {arguments}}}'
    return f"{family.TOOL_CALL_OPEN}\n{body}\n{family.TOOL_CALL_CLOSE}"


def build_messages(record: dict, system_prompt: str = DEFAULT_SYSTEM_PROMPT, with_answer: bool = False) -> list[dict]:
    """The messages of a record; without `with_answer`, the prompt that its (last) answer replies to."""
    if is_conversation(record):
        messages = conversation_messages(record, system_prompt)
        if not with_answer and messages[-1]["role"] == "assistant":
            messages.pop()
        return messages
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


def render_prompt(tokenizer, messages: list[dict], tools: list | None = None) -> str:
    """The text the model sees before it answers: the conversation (and the tools it may call, which the template
    lists in the system turn) plus the opened assistant turn."""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, messages: list[dict], tools: list | None = None) -> list[int]:
    return tokenizer(render_prompt(tokenizer, messages, tools), add_special_tokens=False)["input_ids"]


def exchange_starts(messages: list[dict]) -> list[int]:
    """Where each exchange begins: its user turn (an exchange runs to the next one, through any tool calls, tool
    results and answers)."""
    return [index for index, message in enumerate(messages) if message["role"] == "user"]


def prompt_within(tokenizer, messages: list[dict], max_tokens: int, tools: list | None = None):
    """prompt_ids of `messages` within `max_tokens`, and whether anything was cut: the oldest exchanges after the
    system turn go first, whole; a prompt still too long keeps its last `max_tokens` tokens."""
    ids = prompt_ids(tokenizer, messages, tools)
    cut = len(ids) > max_tokens
    while len(ids) > max_tokens and len(exchange_starts(messages)) > 1:
        messages = [messages[0], *messages[exchange_starts(messages)[1]:]]
        ids = prompt_ids(tokenizer, messages, tools)
    return ids[-max_tokens:], cut


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer followed by the end-of-turn token, the only tokens that carry loss."""
    return tokenizer(answer + family.END_OF_TURN, add_special_tokens=False)["input_ids"]


NOT_TURN_BY_TURN = (
    "the tokenizer's chat template does not render a conversation turn by turn (each render a prefix of the next), "
    "so its answers cannot be masked; use a ChatML template such as Qwen2.5's"
)


def conversation_pieces(tokenizer, messages: list[dict], tools: list | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation (up to its last `<|im_end|>`) as consecutive (text, carries_loss) pieces.

    Each assistant turn (its content, its tool calls as the template writes them, and its `<|im_end|>`) carries
    loss; the system turn with its tool list, the user turns, the tool results and the role headers do not. The
    cuts come from the tokenizer's own template, rendered prefix by prefix: the text before an answer is the
    template's render of the turns so far with the assistant turn opened.
    """
    pieces, rendered = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        opened = tokenizer.apply_chat_template(messages[:index], tools=tools, tokenize=False,
                                               add_generation_prompt=True)
        closed = tokenizer.apply_chat_template(messages[: index + 1], tools=tools, tokenize=False)
        end = closed.rfind(family.END_OF_TURN) + len(family.END_OF_TURN)
        answer = closed[len(opened):end]
        if not (opened.startswith(rendered) and closed.startswith(opened) and answer.endswith(family.END_OF_TURN)):
            raise UserError(NOT_TURN_BY_TURN)
        pieces += [(opened[len(rendered):], False), (answer, True)]
        rendered = opened + answer
    return pieces


def conversation_example(tokenizer, messages: list[dict], tools: list | None = None) -> dict:
    """input_ids and completion_mask of a whole conversation, each piece tokenized as prompt_ids and
    answer_ids tokenize it, so a single exchange gives exactly the single-turn tokens."""
    return _pieces_example(tokenizer, conversation_pieces(tokenizer, messages, tools))


def _pieces_example(tokenizer, pieces: list[tuple[str, bool]]) -> dict:
    example = {"input_ids": [], "completion_mask": []}
    for text, carries_loss in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        example["input_ids"] += ids
        example["completion_mask"] += [int(carries_loss)] * len(ids)
    return example


def tokenize_conversation(tokenizer, record: dict, system_prompt: str, max_seq_length: int):
    """A conversation's training example within `max_seq_length`: its oldest whole exchanges (a user turn and
    everything up to the next one) are dropped until it fits, the system turn kept, so no turn is ever cut.
    Returns (example, exchanges dropped), or (None, 0) when the last exchange alone does not fit.

    Linear time: exchanges are added from the newest back, each rendered once as the first after the system turn
    (the candidate start) and once after its predecessor (its pieces inside a longer conversation), so the work
    stops once the next older exchange no longer fits, whatever the conversation's length. A ChatML template
    renders each turn on its own, so these pieces are exactly the pieces of the whole conversation's render; the
    kept conversation is rendered once more to check that.
    """
    system, *turns = conversation_messages(record, system_prompt)
    tools = record.get("tools")
    starts = [*exchange_starts(turns), len(turns)]
    exchanges = [turns[begin:end] for begin, end in zip(starts, starts[1:])]
    later, later_length, fitted = [], 0, None  # pieces (as a list of examples, newest first) after the start
    for first in reversed(range(len(exchanges))):
        lead = conversation_example(tokenizer, [system, *exchanges[first]], tools)
        if len(lead["input_ids"]) + later_length > max_seq_length:
            break
        fitted = (lead, first)
        if first:
            pair = [system, *exchanges[first - 1], *exchanges[first]]
            own = conversation_pieces(tokenizer, pair, tools)[-2 * _answers(exchanges[first]):]
            later.append(_pieces_example(tokenizer, own))
            later_length += len(later[-1]["input_ids"])
    if fitted is None:
        return None, 0
    lead, first = fitted
    example = {key: lead[key] + [item for piece in reversed(later[: len(exchanges) - 1 - first])
                                  for item in piece[key]] for key in lead}
    _check_render(tokenizer, [system, *turns[starts[first]:]], tools, example)
    return example, first


def _answers(turns: list[dict]) -> int:
    return sum(turn["role"] == "assistant" for turn in turns)


def _check_render(tokenizer, messages: list[dict], tools: list | None, example: dict) -> None:
    """UserError unless `example` holds the tokens of the template's own render of `messages` (up to its last
    `<|im_end|>`) tokenized piece by piece."""
    whole = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    text = tokenizer.decode(example["input_ids"])
    if whole[: whole.rfind(family.END_OF_TURN) + len(family.END_OF_TURN)] != text:
        raise UserError(NOT_TURN_BY_TURN)


def tokenize_example(tokenizer, record: dict, system_prompt: str, max_seq_length: int):
    """Token ids and completion mask of one training example, or None when the answer alone does not fit.

    A prompt that would push the example past `max_seq_length` loses its oldest tokens (the start of the
    system prompt); the answer is never cut. Returns (example, prompt_was_truncated). A conversation record
    goes through tokenize_conversation instead: it returns how many exchanges it dropped.
    """
    if is_conversation(record):
        return tokenize_conversation(tokenizer, record, system_prompt, max_seq_length)
    if is_text(record):
        return tokenize_text(tokenizer, record["text"], max_seq_length)
    prompt = prompt_ids(tokenizer, build_messages(record, system_prompt))
    answer = answer_ids(tokenizer, record["output"])
    if len(answer) >= max_seq_length:
        return None, False
    room = max_seq_length - len(answer)
    truncated = len(prompt) > room
    prompt = prompt[-room:]
    example = {"input_ids": prompt + answer, "completion_mask": [0] * len(prompt) + [1] * len(answer)}
    return example, truncated


def tokenize_text(tokenizer, text: str, max_seq_length: int):
    """A text row for language modelling: its tokens and the end-of-text token, each learned from the ones before
    it (TRL's `text` rows; the first has none, so it carries no loss). A text longer than `max_seq_length` keeps its
    first tokens. Returns (example, was_truncated)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(family.END_OF_TEXT)]
    kept = ids[:max_seq_length]
    return {"input_ids": kept, "completion_mask": [0] + [1] * (len(kept) - 1)}, len(ids) > max_seq_length
