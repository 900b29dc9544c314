"""The terminal chat behind chat.py: a multi-turn session kept within a token budget, its slash commands, and
the input loop (readline line editing and history, streamed replies, Ctrl-C handling).

Every message is sent with the system prompt and the earlier exchanges. When the prompt would leave fewer than
MAX_NEW_TOKENS of MAX_CONTEXT_TOKENS free, the oldest exchanges are dropped (the system prompt stays).

`/save FILE` turns exchanges into training rows that records.read_records accepts, one row per exchange:
instruction = the user's message, output = the reply, input = the earlier exchanges the model saw with it, as
"用户：…" / "助手：…" lines (empty for the first one), source = "chat". The template puts `input` under the
补充信息 heading, so a row trained on shows the model the same context it answered in. The system prompt is not
saved (training applies its own SYSTEM_PROMPT). Only replies that ended at <|im_end|> become rows: one cut at
MAX_NEW_TOKENS is kept in the history but not saved, and one stopped with Ctrl-C is dropped altogether.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import atomic_file
from .cli import UserError
from .generation import decoding_settings, stream_reply
from .modeling import load_adapter_model
from .records import validate_record
from .template import prompt_ids, render_prompt

USER_PROMPT = "你> "
REPLY_PREFIX = "助手> "
CONTEXT_LABELS = ("用户", "助手")  # how earlier exchanges are labelled in a saved row's input
SAVED_SOURCE = "chat"
HISTORY_LENGTH = 1000  # input lines kept in the readline history file
EXIT_WORDS = ("exit", "quit")
COMMANDS = ("/reset", "/system", "/save", "/help")  # any other line, "/usr/bin 是什么" too, is a message
STOPPED = "reply stopped; this exchange is left out of the history"
HELP = """\
commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    use TEXT as the system prompt from the next message on (/system alone shows it)
  /save FILE      append the exchanges not saved yet to FILE as instruction/input/output JSONL rows
  /help           show this list
  exit, quit      leave (so do Ctrl-D and Ctrl-C at the prompt); Ctrl-C during a reply stops that reply"""


@dataclass
class Exchange:
    user: str
    reply: str
    complete: bool  # the reply ended at <|im_end|> rather than at MAX_NEW_TOKENS
    context: list[Exchange] = field(default_factory=list)  # the earlier exchanges sent with this one

    def training_row(self) -> dict:
        user_label, reply_label = CONTEXT_LABELS
        context = "\n".join(
            f"{user_label}：{earlier.user}\n{reply_label}：{earlier.reply}" for earlier in self.context
        )
        return {"instruction": self.user, "input": context, "output": self.reply, "source": SAVED_SOURCE}


class ChatSession:
    """The conversation: system prompt, the exchanges still sent, and those not saved yet."""

    def __init__(self, tokenizer, system_prompt: str, max_context_tokens: int, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.prompt_budget = max_context_tokens - max_new_tokens
        self.history: list[Exchange] = []
        self.unsaved: list[Exchange] = []

    def messages(self, user_text: str, history: list[Exchange] | None = None) -> list[dict]:
        """System prompt, `history` (default: the session's) and the new message, as chat messages."""
        messages = [{"role": "system", "content": self.system_prompt}]
        for exchange in self.history if history is None else history:
            messages += [{"role": "user", "content": exchange.user}, {"role": "assistant", "content": exchange.reply}]
        return messages + [{"role": "user", "content": user_text}]

    def prompt_tokens(self, user_text: str, history: list[Exchange] | None = None) -> int:
        return len(prompt_ids(self.tokenizer, self.messages(user_text, history)))

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

    def add(self, user_text: str, reply: str, complete: bool) -> None:
        exchange = Exchange(user_text, reply, complete, list(self.history))
        self.history.append(exchange)
        self.unsaved.append(exchange)

    def reset(self) -> None:
        self.history.clear()
        self.unsaved.clear()

    def save(self, path: str) -> tuple[int, int]:
        """Append the unsaved complete exchanges to the JSONL file `path`; returns (rows written, replies left out).

        The file is rewritten through a temporary copy, so an interrupted save never leaves half a row.
        """
        target = Path(path).expanduser()
        rows = [validate_record(exchange.training_row(), "chat") for exchange in self.unsaved
                if exchange.complete and exchange.reply]
        try:
            existing = target.read_text(encoding="utf-8") if target.is_file() else ""
        except UnicodeDecodeError as error:
            raise UserError(f"{path} is not UTF-8 text (byte {error.start}), so rows cannot be appended to it; "
                            "choose another file") from None
        if existing and not existing.endswith("\n"):
            existing += "\n"
        with atomic_file(target) as handle:
            handle.write(existing)
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        left_out = len(self.unsaved) - len(rows)
        self.unsaved.clear()
        return len(rows), left_out


def notice(text: str) -> None:
    print(f"[{text}]", flush=True)


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


def run_command(session: ChatSession, line: str) -> None:
    name, _, argument = line.partition(" ")
    argument = argument.strip()
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
    elif name == "/save" and argument:
        try:
            written, left_out = session.save(argument)
        except OSError as error:
            notice(f"could not write {argument}: {error.strerror or error}")
            return
        except UserError as error:
            notice(f"could not save: {error}")
            return
        extra = f"; {left_out} reply(ies) cut at max_new_tokens left out" if left_out else ""
        notice(f"appended {written} row(s) to {argument}{extra}")
    else:
        notice("usage: /save FILE")


def answer(model, tokenizer, session: ChatSession, user_text: str, decoding: dict, show_prompt: bool) -> None:
    dropped, tokens = session.make_room(user_text)
    if dropped:
        notice(f"dropped the {dropped} oldest exchange(s) to stay within max_context_tokens")
    if tokens > session.prompt_budget:
        notice(
            f"that message needs {tokens} prompt tokens but max_context_tokens leaves {session.prompt_budget} "
            "beside max_new_tokens; shorten it or raise --max_context_tokens"
        )
        return
    messages = session.messages(user_text)
    if show_prompt:
        print(f"[prompt, {tokens} tokens]\n{render_prompt(tokenizer, messages)}[end of prompt]")
    print(REPLY_PREFIX, end="", flush=True)
    reply = stream_reply(model, tokenizer, messages, on_text=lambda piece: print(piece, end="", flush=True),
                         **decoding)
    print()
    if reply.interrupted:
        notice(STOPPED)
        return
    if not reply.stopped:
        notice(f"reply cut at max_new_tokens {decoding['max_new_tokens']}")
    session.add(user_text, reply.text, reply.stopped)


def run_chat(cfg) -> None:
    """Load the adapter and chat until exit, quit, end of input or Ctrl-C at the prompt."""
    if cfg.max_new_tokens >= cfg.max_context_tokens:
        raise UserError(
            f"--max_new_tokens {cfg.max_new_tokens} leaves no room for the prompt in --max_context_tokens "
            f"{cfg.max_context_tokens}; raise --max_context_tokens or lower --max_new_tokens"
        )
    model, tokenizer, manifest = load_adapter_model(cfg.adapter_dir, cfg.backend, max_seq_length=cfg.max_context_tokens)
    session = ChatSession(tokenizer, cfg.system_prompt, cfg.max_context_tokens, cfg.max_new_tokens)
    if sys.stdin.isatty():
        enable_line_editing(cfg.history_file)
    print(f"chatting with {cfg.adapter_dir} (base model {manifest['base_model']}, "
          f"backend {manifest['backend_loaded']}); /help lists the commands, exit or Ctrl-D leaves")
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
            print(line)
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_WORDS:
            return
        try:
            if is_command(text):
                run_command(session, text)
            else:
                answer(model, tokenizer, session, text, decoding, show_prompt)
        except KeyboardInterrupt:  # Ctrl-C outside generation (which stream_reply turns into a stopped reply)
            print()
            notice(STOPPED)
