"""The ecosystem's row formats, each turned into one of the toolkit's records (README, "Data format").

- alpaca (LLaMA-Factory): `instruction`, `input`, `output`, `system`, `history` ([[question, answer], ...]);
- sharegpt (LLaMA-Factory): `conversations` of {`from`, `value`} (human, gpt, system, function_call, observation),
  `system`, `tools`;
- messages (OpenAI, TRL): {`role`, `content`} with content a string or a list of text parts, `tool_calls`, the
  `tool` role, and `tools`;
- prompt_completion (TRL): `prompt` and `completion`, both strings (standard) or both lists of messages
  (conversational);
- text (TRL): `text`, plain language modelling.

A record is single-turn {"instruction", "input", "output"} (an alpaca row with no system or history, and a standard
prompt/completion row), a conversation {"messages", "tools"?}, or {"text"}; any may carry a "source". Fields that
no record keeps are counted per file in an IgnoredFields, never dropped without a word.
"""

from __future__ import annotations

import json
from collections import Counter

from .cli import UserError

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
CONVERTING = 'see README.md, "Data format"'
# The fields each format reads (a row's "source" is kept in every format).
USED_FIELDS = {
    "alpaca": {"instruction", "input", "output", "system", "history"},
    "sharegpt": {"conversations", "system", "tools"},
    "messages": {"messages", "tools"},
    "prompt_completion": {"prompt", "completion", "tools"},
    "text": {"text"},
}
MEDIA = ("image", "video", "audio")  # in an ignored field's name: what a text-only model cannot read
CONTENT_PART = "content part"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool"}
ROLES = ("system", "user", "assistant", "tool")
MESSAGES_HELP = (
    '"messages" is a list of {"role": "system"|"user"|"assistant"|"tool", "content": string or text parts}: an '
    "optional system turn first, then a user turn, its answer (an assistant turn, or tool calls, their tool results "
    "and an answer), and so on"
)
SINGLE_TURN_FIELDS = ("instruction", "input", "output")


class IgnoredFields(Counter):
    """Rows per ignored field of one file ("images", "messages[].name", ...), and the formats its rows were in."""

    def __init__(self):
        super().__init__()
        self.formats = Counter()

    def lines(self, path) -> list[str]:
        return [f"{path}: {rows} rows: {_named(field)} ignored ({_why_ignored(field)})"
                for field, rows in sorted(self.items())]

    def report(self) -> dict:
        """What the manifest records: the rows of each format and of each ignored field."""
        return {"formats": dict(sorted(self.formats.items())), "ignored_fields": dict(sorted(self.items()))}


def _named(field: str) -> str:
    return field if field.startswith(CONTENT_PART) else f'field "{field}"'


def _why_ignored(field: str) -> str:
    return "text-only model" if any(media in field for media in MEDIA) else "not used by the toolkit"


def check_format(dataset_format: str) -> None:
    if dataset_format != "auto" and dataset_format not in FORMATS:
        raise UserError(f"--dataset_format must be auto, {', '.join(FORMATS)}; got {dataset_format!r}")


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def unknown_shape(row: dict, where: str) -> UserError:
    keys = ", ".join(map(repr, sorted(row))) or "none"
    return UserError(f"{where}: a row of unknown shape (keys {keys}); the formats read are alpaca (instruction, "
                     "output), sharegpt (conversations), messages, prompt/completion and text; " + CONVERTING)


def convert_row(row, where: str, with_output: bool = True, dataset_format: str = "auto",
                ignored: IgnoredFields | None = None) -> dict:
    """The record of one row in its format (detected from its keys unless `dataset_format` names it), or a
    UserError naming `where`. Without `with_output` the row is a prompt (inference): no answer is required."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}; {CONVERTING}")
    found = detect_format(row)
    kind = found if dataset_format == "auto" else dataset_format
    if found is None and dataset_format == "auto":
        raise unknown_shape(row, where)
    ignored = IgnoredFields() if ignored is None else ignored
    ignored.formats[kind] += 1
    kept = USED_FIELDS[kind] | ({"source"} if isinstance(row.get("source"), str) else set())
    ignored.update(sorted(set(row) - kept))  # a "source" that is not a string is ignored too
    record = CONVERTERS[kind](row, where, with_output, ignored)
    if "source" in kept:
        record["source"] = row["source"]
    return record


# ------------------------------------------------------------------------------------------------------ alpaca

def _text(row: dict, field: str, where: str, required: bool = True) -> str:
    value = row.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        problem = "is missing" if field not in row else "must be a non-empty string" if required else "must be a string"
        help_text = ALPACA_HELP if field in SINGLE_TURN_FIELDS else CONVERTING
        raise UserError(f'{where}: field "{field}" {problem}; {help_text}')
    return value


ALPACA_HELP = ('each row needs a non-empty "instruction" and "output" string and, optionally, an "input" string '
               '(or, for a conversation, a "messages" list; other formats: ' + CONVERTING + ")")


def _alpaca(row: dict, where: str, with_output: bool, ignored: IgnoredFields) -> dict:
    from .template import user_content

    both = [field for field in ("messages", "conversations") if field in row]
    if both:
        raise UserError(f'{where}: a row holds either "{both[0]}" or "instruction", not both')
    instruction = _text(row, "instruction", where)
    extra = _text(row, "input", where, required=False)
    output = _text(row, "output", where) if with_output else None
    system = _text(row, "system", where, required=False)
    history = row.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) and text.strip() for text in pair)
            for pair in history):
        raise UserError(f'{where}: "history" must be a list of [question, answer] pairs of non-empty strings')
    if not system.strip() and not history:
        record = {"instruction": instruction, "input": extra}
        if with_output:
            record["output"] = output
        return record
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": user_content(instruction, extra)})
    if with_output:
        messages.append({"role": "assistant", "content": output})
    return {"messages": messages}


# ---------------------------------------------------------------------------------------------------- sharegpt

def _sharegpt(row: dict, where: str, with_output: bool, ignored: IgnoredFields) -> dict:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise UserError(f'{where}: "conversations" must be a non-empty list of {{"from", "value"}} turns')
    messages = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    elif system not in (None, ""):
        raise UserError(f'{where}: field "system" must be a string')
    for number, turn in enumerate(turns, start=1):
        place = f"{where}: turn {number}"
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise UserError(f'{place}: expected {{"from": {"|".join(SHAREGPT_ROLES)}, "value": string}}')
        ignored.update(f"conversations[].{key}" for key in sorted(set(turn) - {"from", "value"}))
        role = SHAREGPT_ROLES[turn["from"]]
        if turn["from"] == "function_call":
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": _function_calls(turn["value"], place)})
        else:
            messages.append({"role": role, "content": turn["value"]})
    record = {"messages": validate_messages(messages, where, with_output)}
    tools = tool_specs(row.get("tools"), where)
    if tools:
        record["tools"] = tools
    return record


def _function_calls(value: str, where: str) -> list[dict]:
    """A function_call turn's value: a JSON {"name", "arguments"} or a list of them."""
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as error:
        raise UserError(f'{where}: a function_call value must be JSON {{"name", "arguments"}} ({error.msg})') from None
    return _tool_calls(calls if isinstance(calls, list) else [calls], where)


# ---------------------------------------------------------------------------------------------------- messages

def _messages(row: dict, where: str, with_output: bool, ignored: IgnoredFields) -> dict:
    both = [field for field in SINGLE_TURN_FIELDS if field in row]
    if both:
        raise UserError(f'{where}: a row holds either "messages" or "{both[0]}", not both')
    record = {"messages": validate_messages(row.get("messages"), where, with_output, ignored)}
    tools = tool_specs(row.get("tools"), where)
    if tools:
        record["tools"] = tools
    return record


def validate_messages(messages, where: str, with_output: bool = True, ignored: IgnoredFields | None = None,
                      ) -> list[dict]:
    """The turns as clean messages ({"role", "content"}, an assistant's "tool_calls"), or a UserError naming
    `where`, the turn and what is wrong.

    With `with_output` the conversation ends with an assistant turn (the answer or call that is learned); without
    it (a prompt for inference) it may end with a user or tool turn as well.
    """
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{where}: "messages" must be a non-empty list; {MESSAGES_HELP}')
    ignored = IgnoredFields() if ignored is None else ignored
    turns = []
    for number, message in enumerate(messages, start=1):
        turn = f"{where}: message {number}"
        if not isinstance(message, dict):
            raise UserError(f"{turn}: expected a JSON object, got {type(message).__name__}; {MESSAGES_HELP}")
        unknown = sorted(set(message) - {"role", "content", "tool_calls", "name", "tool_call_id"})
        if unknown:
            raise UserError(f"{turn}: unknown key(s) {', '.join(map(repr, unknown))}; {MESSAGES_HELP}")
        ignored.update(f"messages[].{key}" for key in ("name", "tool_call_id") if key in message)
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"{turn}: role must be system, user, assistant or tool, got {role!r}")
        clean = {"role": role, "content": _content(message.get("content"), turn, ignored)}
        if message.get("tool_calls"):
            if role != "assistant":
                raise UserError(f'{turn}: only an assistant turn makes "tool_calls"')
            clean["tool_calls"] = _tool_calls(message["tool_calls"], turn)
        elif not clean["content"].strip() and role != "tool":
            raise UserError(f'{turn}: "content" must be a non-empty string')
        _check_order(turns, clean, turn)
        turns.append(clean)
    last = turns[-1]["role"]
    if last == "system":
        raise UserError(f"{where}: no user turn; {MESSAGES_HELP}")
    if with_output and last != "assistant":
        problem = "ends with a user turn" if last == "user" and len(turns) > 2 else (
            "ends with a tool result" if last == "tool" else "no assistant turn")
        raise UserError(f"{where}: {problem}; a conversation ends with the assistant's answer")
    return turns


def _check_order(turns: list[dict], message: dict, where: str) -> None:
    role, previous = message["role"], turns[-1] if turns else None
    previous_role = previous["role"] if previous else None
    if role == "system" and previous is not None:
        raise UserError(f"{where}: a system turn may only come first")
    if role == "user" and previous_role == "user":
        raise UserError(f"{where}: two user turns in a row; user and assistant turns alternate")
    if role == "assistant" and previous_role not in ("user", "tool"):
        if previous_role == "assistant":
            raise UserError(f"{where}: two assistant turns in a row; user and assistant turns alternate")
        raise UserError(f"{where}: an assistant turn must follow a user turn")
    if role == "tool" and not (previous_role == "tool" or (previous_role == "assistant" and "tool_calls" in previous)):
        raise UserError(f"{where}: a tool result must follow an assistant turn with tool_calls (or another result)")
    if role == "user" and previous_role == "tool":
        raise UserError(f"{where}: a user turn after a tool result; the assistant answers from the result first")


def _content(content, where: str, ignored: IgnoredFields) -> str:
    """A message's text: a string, or the text parts of a list joined (other parts are counted as ignored)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise UserError(f'{where}: "content" must be a string or a list of text parts, got {type(content).__name__}')
    texts = []
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise UserError(f'{where}: "content" is a list, so each part must be {{"type": "text", "text": ...}}')
        if part["type"] == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            ignored[f'{CONTENT_PART} "{part["type"]}"'] += 1
    return "".join(texts)


def _tool_calls(calls, where: str) -> list[dict]:
    """Tool calls as the template renders them: {"type": "function", "function": {"name", "arguments": object}};
    OpenAI's arguments (a JSON string) are parsed, and a bare {"name", "arguments"} is wrapped."""
    if not isinstance(calls, list) or not calls:
        raise UserError(f'{where}: "tool_calls" must be a non-empty list')
    clean = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", {}) if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            raise UserError(f'{where}: each tool call needs a "name" and "arguments" (a JSON object, or a string '
                            "holding one)")
        clean.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    return clean


def tool_specs(tools, where: str) -> list[dict]:
    """The tools a row offers, as OpenAI function specs ({"type": "function", "function": {...}}, the form Qwen2.5
    was trained on); LLaMA-Factory's JSON string of bare {"name", "description", "parameters"} is accepted."""
    if isinstance(tools, str):
        if not tools.strip():
            return []
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise UserError(f'{where}: "tools" is a string but not JSON ({error.msg})') from None
    if tools is None:
        return []
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise UserError(f'{where}: "tools" must be a list of function specs ({{"name", "description", "parameters"}})')
    wrapped = []
    for tool in tools:
        spec = tool["function"] if tool.get("type") == "function" and isinstance(tool.get("function"), dict) else tool
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise UserError(f'{where}: each tool needs a "name"')
        wrapped.append({"type": "function", "function": spec})
    return wrapped


# --------------------------------------------------------------------------------- prompt/completion and text

def _prompt_completion(row: dict, where: str, with_output: bool, ignored: IgnoredFields) -> dict:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str):
        if with_output and not isinstance(completion, str):
            raise UserError(f'{where}: a string "prompt" needs a string "completion" (TRL standard prompt-completion)')
        record = {"instruction": _text(row, "prompt", where), "input": ""}
        if with_output:
            record["output"] = _text(row, "completion", where)
        return record
    if not isinstance(prompt, list) or (with_output and not isinstance(completion, list)):
        raise UserError(f'{where}: "prompt" and "completion" are both strings or both lists of messages')
    if with_output and any(isinstance(turn, dict) and turn.get("role") == "assistant" for turn in prompt):
        raise UserError(f'{where}: an assistant turn in "prompt" would be learned here; put the row in "messages" '
                        "(every assistant turn is learned) or keep the prompt to system and user turns")
    messages = validate_messages(prompt + (completion if with_output else []), where, with_output, ignored)
    record = {"messages": messages}
    tools = tool_specs(row.get("tools"), where)
    if tools:
        record["tools"] = tools
    return record


def _text_row(row: dict, where: str, with_output: bool, ignored: IgnoredFields) -> dict:
    if not with_output:
        raise UserError(f'{where}: a "text" row has no prompt to answer; give "instruction", "messages" or "prompt"')
    return {"text": _text(row, "text", where)}


CONVERTERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages,
              "prompt_completion": _prompt_completion, "text": _text_row}
