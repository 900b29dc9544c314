"""chat.py prints text from outside (piped lines, replies, the system prompt, file names) with its control
characters escaped: ANSI and OSC escape sequences in it cannot drive the terminal."""

import io
import sys

from qwen_sft.chat import ChatSession, chat_loop, shown

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\r\x9b0m"


def test_shown_escapes_control_characters_and_keeps_text_tabs_and_newlines():
    assert shown("a\tb\nc 日本 💥") == "a\tb\nc 日本 💥"
    assert shown(ESCAPES) == "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mred\\x0d\\x9b0m"


def test_piped_escape_sequences_are_echoed_and_shown_escaped(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # /save writes there
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/system {ESCAPES}\n/system\n/save {ESCAPES}\nexit\n"))
    session = ChatSession(tokenizer=None, system_prompt="s", max_context_tokens=64, max_new_tokens=8)
    chat_loop(model=None, tokenizer=None, session=session, decoding={}, show_prompt=False)
    out = capsys.readouterr().out
    assert session.system_prompt == ESCAPES  # the text itself is kept as given
    assert not any(character in out for character in "\x1b\x07\r\x9b"), repr(out)
    assert out.count("\\x1b]0;pwned\\x07") == 4  # two echoed lines, the system prompt shown, the /save notice
