"""The terminal chat behind chat.py: a multi-turn session kept within a token budget, its slash commands, and
the input loop (readline line editing and history, streamed replies, Ctrl-C handling).

Every message is sent with the system prompt and the earlier exchanges. When the prompt would leave fewer than
MAX_NEW_TOKENS of MAX_CONTEXT_TOKENS free, the oldest exchanges are dropped (the system prompt stays).

`/save FILE` appends the exchanges not saved yet to FILE as conversation rows that records.read_records accepts:
{"messages": [system, user, assistant, ...], "source": "chat"}, each holding exactly what the model saw (the
system prompt then in force and the earlier exchanges sent with it, as dropped to fit MAX_CONTEXT_TOKENS) and the
replies it gave. One row covers every exchange it shows with the context that exchange had, so a plain
conversation is one row; training on it gives the model the same tokens it answered from. Every assistant turn of a
row is learned, so an exchange saved before reappears as context (and is learned again) in a later row that
continues it. Only replies that ended at <|im_end|> are saved: one cut at MAX_NEW_TOKENS is kept in the history
but not saved, nor are the later exchanges that were sent with it (they could not be saved without it); one
stopped with Ctrl-C is dropped altogether.

`/tools FILE` offers the model the tools of a JSON file (a list of function specs, as a row's "tools"). A reply
that is a tool call is shown as one, and the next line the user types is the tool's result (its turn); the model
then answers from it (or calls again). The calls and results are part of the exchange, so /save keeps them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import APPEND, Output, append_to_file, claim_outputs
from .cli import UserError
from .families import family
from .fast_generation import generation_path, load_generation_model, warm_up
from .formats import tool_specs
from .generation import decoding_settings, stream_reply
from .modeling import chosen_base_path
from .records import validate_record
from .template import prompt_ids, render_prompt

USER_PROMPT = "你> "
REPLY_PREFIX = "助手> "
SAVED_SOURCE = "chat"
HISTORY_LENGTH = 1000  # input lines kept in the readline history file
EXIT_WORDS = ("exit", "quit")
COMMANDS = ("/reset", "/system", "/save", "/tools", "/help")  # any other line, "/usr/bin 是什么" too, is a message
STOPPED = "reply stopped; this exchange is left out of the history"
HELP = """\
commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    use TEXT as the system prompt from the next message on (/system alone shows it)
  /save FILE      append the exchanges not saved yet to FILE as JSONL "messages" rows (system prompt included)
  /tools FILE     offer the tools of FILE (a JSON list of function specs); after a tool call, type its result
  /help           show this list
  exit, quit      leave (so do Ctrl-D and Ctrl-C at the prompt); Ctrl-C during a reply stops that reply"""


@dataclass
class Exchange:
    user: str
    reply: str
    complete: bool  # the reply ended at <|im_end|> rather than at MAX_NEW_TOKENS
    system: str = ""  # the system prompt sent with it
    context: list[Exchange] = field(default_factory=list)  # the earlier exchanges sent with this one
    steps: list[dict] = field(default_factory=list)  # tool calls and their results before the reply

    @property
    def savable(self) -> bool:
        return self.complete and bool(self.reply.strip())

    def conversation(self) -> list[dict]:
        """What the model saw, followed by its reply: the system prompt, the earlier exchanges, this one."""
        messages = [{"role": "system", "content": self.system}]
        for exchange in [*self.context, self]:
            messages += exchange.turns()
        return messages

    def turns(self) -> list[dict]:
        return [{"role": "user", "content": self.user}, *self.steps, {"role": "assistant", "content": self.reply}]

    def shows(self, earlier: Exchange) -> bool:
        """Whether this exchange's conversation holds `earlier` with exactly the context `earlier` was sent with."""
        position = next((index for index, item in enumerate(self.context) if item is earlier), None)
        return (
            position is not None
            and self.system == earlier.system
            and len(earlier.context) == position
            and all(mine is theirs for mine, theirs in zip(self.context, earlier.context))
        )


@dataclass
class SaveResult:
    rows: int  # conversation rows appended
    exchanges: int  # exchanges those rows hold that were not saved before
    cut: int  # replies cut at MAX_NEW_TOKENS (or empty), left out
    after_cut: int  # exchanges left out because a cut reply was sent with them


class ChatSession:
    """The conversation: system prompt, the exchanges still sent, and those not saved yet."""

    def __init__(self, tokenizer, system_prompt: str, max_context_tokens: int, max_new_tokens: int,
                 inputs: dict[str, str] | None = None):
        self.tokenizer = tokenizer
        self.inputs = inputs or {}  # what the session reads (the adapter): /save may not write there
        self.system_prompt = system_prompt
        self.prompt_budget = max_context_tokens - max_new_tokens
        self.history: list[Exchange] = []
        self.unsaved: list[Exchange] = []
        self.tools: list[dict] | None = None  # offered to the model (/tools FILE)
        self.pending: tuple[str, list[dict]] | None = None  # (message, steps so far) while a tool call awaits its result

    def messages(self, user_text: str, history: list[Exchange] | None = None) -> list[dict]:
        """System prompt, `history` (default: the session's) and the new message, as chat messages."""
        messages = [{"role": "system", "content": self.system_prompt}]
        for exchange in self.history if history is None else history:
            messages += exchange.turns()
        return messages + [{"role": "user", "content": user_text}]

    def prompt_tokens(self, user_text: str, history: list[Exchange] | None = None) -> int:
        return len(prompt_ids(self.tokenizer, self.messages(user_text, history), self.tools))

    def make_room(self, user_text: str) -> tuple[int, int]:
        """Drop the oldest exchanges until the prompt fits the budget; returns (exchanges dropped, prompt tokens).

        A message that does not fit even without history drops nothing; its token count is then over budget.
        """
        for dropped in range(len(self.history) + 1):
            tokens = self.prompt_tokens(user_text, self.history[dropped:])
            if tokens <= self.prompt_budget:
                del self.history[:dropped]
                return dropped, tokens
        return 0, tokens

    def add(self, user_text: str, reply: str, complete: bool, steps: list[dict] | None = None) -> None:
        exchange = Exchange(user_text, reply, complete, self.system_prompt, list(self.history), steps or [])
        self.history.append(exchange)
        self.unsaved.append(exchange)

    def reset(self) -> None:
        self.history.clear()
        self.unsaved.clear()
        self.pending = None

    def load_tools(self, path: str) -> list[str]:
        """Offer the tools of the JSON file `path` from the next message on; returns their names."""
        try:
            tools = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: {getattr(error, 'strerror', None) or error}") from None
        self.tools = tool_specs(tools, path) or None
        return [tool["function"]["name"] for tool in self.tools or []]

    def save(self, path: str) -> SaveResult:
        """Append the unsaved exchanges to the JSONL file `path` as conversation rows (see the module docstring).

        The newest exchange's conversation is a row, covering the earlier unsaved exchanges it shows; then the
        newest exchange not covered yet, and so on. The rows are appended in place under the output rule
        (qwen_sft/artifacts.py): a link is followed, a hard link and the file's mode stay, a FIFO or device (even
        /dev/null) is refused, and a failed write is cut back off, so the file never keeps half a row.
        """
        rows, covered, after_cut = [], [], 0
        for exchange in reversed(self.unsaved):
            if not exchange.savable or any(exchange is item for item in covered):
                continue
            if not all(earlier.savable for earlier in exchange.context):
                after_cut += 1
                continue
            row = {"messages": exchange.conversation(), **({"tools": self.tools} if self.tools else {}),
                   "source": SAVED_SOURCE}
            rows.append(validate_record(row, "chat"))
            covered += [exchange, *(earlier for earlier in exchange.context if exchange.shows(earlier))]
        with claim_outputs(self.inputs, [Output("/save", path, APPEND)], "chat", overwrite=False) as claimed:
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in reversed(rows))
            append_to_file(claimed["/save"], lines)  # a file that does not end in UTF-8 text is refused there
        saved = sum(any(exchange is item for item in covered) for exchange in self.unsaved)
        cut = sum(not exchange.savable for exchange in self.unsaved)
        self.unsaved.clear()
        return SaveResult(len(rows), saved, cut, after_cut)


CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but tab and newline, DEL, C1


def shown(text: str) -> str:
    """Text from outside (a piped line, a reply, a prompt, a file name) as printed: its control characters, with
    which ANSI and OSC escape sequences start, written as \\xNN, so that they cannot drive the terminal."""
    return CONTROL_CHARACTERS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def notice(text: str) -> None:
    print(f"[{shown(text)}]", flush=True)


def enable_line_editing(history_file: str) -> None:
    """Arrow keys, Emacs-style editing and input history for input(); the history persists in `history_file`."""
    import readline

    if not history_file:
        return
    path = Path(history_file).expanduser()
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(HISTORY_LENGTH)

    def write_history():
        with contextlib.suppress(OSError):
            readline.write_history_file(path)

    atexit.register(write_history)


def is_command(text: str) -> bool:
    return text.split()[0] in COMMANDS


def attempted(action, failed: str):
    """`action()`'s result, or None after the notice `failed: why`: a command that fails leaves the chat going."""
    try:
        return action()
    except OSError as error:
        notice(f"{failed}: {error.filename}: {error.strerror}" if error.filename else f"{failed}: {error}")
    except UserError as error:
        notice(f"{failed}: {error}")
    return None


def run_command(session: ChatSession, line: str) -> None:
    name, *rest = line.split(maxsplit=1)  # split as is_command does: a tab after the command counts too
    argument = rest[0].strip() if rest else ""
    if name == "/help":
        print(HELP)
    elif name == "/reset":
        session.reset()
        notice("conversation cleared")
    elif name == "/system" and argument:
        session.system_prompt = argument
        notice("system prompt set; it applies from the next message")
    elif name == "/system":
        notice(f"system prompt: {session.system_prompt}")
    elif name == "/tools" and argument:
        names = attempted(lambda: session.load_tools(argument), "could not read tools")
        if names is None:
            return
        notice(f"tools offered from the next message on: {', '.join(names) or 'none'}")
    elif name == "/tools":
        names = [tool["function"]["name"] for tool in session.tools or []]
        notice(f"tools offered: {', '.join(names)}" if names else "no tools offered; /tools FILE offers some")
    elif name == "/save" and argument:
        saved = attempted(lambda: session.save(argument), "could not save")
        if saved is None:
            return
        extra = f"; {saved.cut} reply(ies) cut at max_new_tokens (or empty) left out" if saved.cut else ""
        if saved.after_cut:
            extra += f", and {saved.after_cut} later exchange(s) sent with a cut reply"
        notice(f"appended {saved.rows} conversation row(s) ({saved.exchanges} exchange(s)) to {argument}{extra}")
    else:
        notice("usage: /save FILE")


TOOL_CALL = re.compile(rf"{re.escape(family.TOOL_CALL_OPEN)}\s*(.*?)\s*{re.escape(family.TOOL_CALL_CLOSE)}", re.DOTALL)


def parsed_tool_calls(reply: str) -> list[dict] | None:
    """The tool calls a reply makes, as an assistant turn's "tool_calls", or None when it makes none (or writes
    one that is not a JSON {"name", "arguments"})."""
    calls = []
    for body in TOOL_CALL.findall(reply):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        calls.append({"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}})
    return calls or None


def answer(model, tokenizer, session: ChatSession, user_text: str, decoding: dict, show_prompt: bool,
           steps: list[dict] | None = None) -> None:
    """Reply to `user_text` (after `steps`, the tool calls and results of this exchange so far)."""
    steps = steps or []
    dropped, tokens = session.make_room(user_text)
    if dropped:
        notice(f"dropped the {dropped} oldest exchange(s) to stay within max_context_tokens")
    if tokens > session.prompt_budget:
        notice(
            f"that message needs {tokens} prompt tokens but max_context_tokens leaves {session.prompt_budget} "
            "beside max_new_tokens; shorten it or raise --max_context_tokens"
        )
        return
    messages = session.messages(user_text) + steps
    if show_prompt:
        print(f"[prompt, {tokens} tokens]\n{shown(render_prompt(tokenizer, messages, session.tools))}[end of prompt]")
    print(REPLY_PREFIX, end="", flush=True)
    reply = stream_reply(model, tokenizer, messages, on_text=lambda piece: print(shown(piece), end="", flush=True),
                         tools=session.tools, **decoding)
    print()
    if reply.interrupted:
        notice(STOPPED)
        return
    if not reply.stopped:
        notice(f"reply cut at max_new_tokens {decoding['max_new_tokens']}")
    calls = parsed_tool_calls(reply.text) if session.tools and reply.stopped else None
    if calls:
        described = "; ".join(f"{call['function']['name']} {json.dumps(call['function']['arguments'], ensure_ascii=False)}"
                              for call in calls)
        notice(f"tool call: {shown(described)}; type the tool's result (its turn) as the next line")
        session.pending = (user_text, [*steps, {"role": "assistant", "content": "", "tool_calls": calls}])
        return
    session.add(user_text, reply.text, reply.stopped, steps)


def answer_from_tool(model, tokenizer, session: ChatSession, result: str, decoding: dict, show_prompt: bool) -> None:
    """The line typed after a tool call is the tool's result: the model answers from it (or calls again)."""
    user_text, steps = session.pending
    session.pending = None
    answer(model, tokenizer, session, user_text, decoding, show_prompt, [*steps, {"role": "tool", "content": result}])


def run_chat(cfg) -> None:
    """Load the adapter and chat until exit, quit, end of input or Ctrl-C at the prompt."""
    if cfg.max_new_tokens >= cfg.max_context_tokens:
        raise UserError(
            f"--max_new_tokens {cfg.max_new_tokens} leaves no room for the prompt in --max_context_tokens "
            f"{cfg.max_context_tokens}; raise --max_context_tokens or lower --max_new_tokens"
        )
    chosen_base_path(cfg.adapter_dir, cfg.adapter_manifest, cfg.base_model)  # a trained base that is gone: one line
    model, tokenizer, loaded = load_generation_model(cfg.adapter_dir, base_model=cfg.base_model, backend=cfg.backend,
                                                     fast_generation=cfg.fast_generation,
                                                     load_in_4bit=cfg.load_in_4bit,
                                                     max_seq_length=cfg.max_context_tokens,
                                                     max_cache_len=cfg.max_context_tokens)
    warm_up_seconds = warm_up(model, tokenizer)
    session = ChatSession(tokenizer, cfg.system_prompt, cfg.max_context_tokens, cfg.max_new_tokens,
                          inputs={"--adapter_dir": cfg.adapter_dir})
    if sys.stdin.isatty():
        enable_line_editing(cfg.history_file)
    print(f"chatting with {cfg.adapter_dir} (base model {loaded['base_model']}, "
          f"backend {loaded['backend_loaded']}; {generation_path(loaded, warm_up_seconds)}); "
          "/help lists the commands, exit or Ctrl-D leaves")
    chat_loop(model, tokenizer, session, decoding_settings(cfg), cfg.show_prompt)


def read_line() -> str:
    """input(), with bytes that are not UTF-8 (a pasted Latin-1 line, a binary pipe) shown as U+FFFD and a notice,
    rather than an exception that ends the session."""
    if hasattr(sys.stdin, "reconfigure") and sys.stdin.errors != "surrogateescape":
        sys.stdin.reconfigure(errors="surrogateescape")
    line = input(USER_PROMPT)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        notice("that line was not UTF-8 text; its undecodable bytes are shown as \ufffd")
    return line


def chat_loop(model, tokenizer, session: ChatSession, decoding: dict, show_prompt: bool) -> None:
    """Read messages and commands from stdin until exit, quit, end of input or Ctrl-C at the prompt."""
    echo = not sys.stdin.isatty()  # piped input is not echoed by a terminal; echoing keeps the transcript readable
    while True:
        try:
            line = read_line()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if echo:
            print(shown(line))
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_WORDS:
            return
        try:
            if is_command(text):
                run_command(session, text)
            elif session.pending:
                answer_from_tool(model, tokenizer, session, text, decoding, show_prompt)
            else:
                answer(model, tokenizer, session, text, decoding, show_prompt)
        except KeyboardInterrupt:  # Ctrl-C outside generation (which stream_reply turns into a stopped reply)
            print()
            notice(STOPPED)
