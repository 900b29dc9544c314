"""chat.py on the tiny model: multi-turn history, commands, /save rows, trimming, leaving, and Ctrl-C mid-reply."""

import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import termios
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import EXACT, FIXTURES, ROOT, run_script
from qwen_sft.chat import STOPPED, ChatSession, chat_loop
from qwen_sft.cli import UserError
from qwen_sft.generation import stream_reply
from qwen_sft.modeling import load_adapter_model, load_adapter_tokenizer
from qwen_sft.records import read_records
from qwen_sft.template import DEFAULT_SYSTEM_PROMPT, prompt_ids
from qwen_sft.tiny import tiny_path

ROWS = read_records(FIXTURES / "learning_20.jsonl")
Q0, A0 = ROWS[0]["instruction"], ROWS[0]["output"]  # 报告0中的晶圆良率是多少？ -> 报告0中的晶圆良率为80%。
Q2, Q4, Q6 = ROWS[2]["instruction"], ROWS[4]["instruction"], ROWS[6]["instruction"]
SHOWN_PROMPT = re.compile(r"\[prompt, (\d+) tokens\]\n(.*?)\[end of prompt\]", re.S)


def turn(user: str, reply: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n"


def replies(stdout: str) -> list[str]:
    return re.findall(r"^助手> (.*)$", stdout, re.M)


@pytest.fixture(scope="module")
def adapter(learned_adapter):
    return learned_adapter / "Qwen_finetuning_model"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path())


def test_help_lists_every_setting():
    result = run_script("chat.py", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--adapter_dir", "--system_prompt", "--max_new_tokens", "--temperature", "--top_p",
                 "--repetition_penalty", "--no_repeat_ngram_size", "--max_context_tokens", "--history_file",
                 "--show_prompt", "--backend"):
        assert flag in result.stdout
    assert "--max_new_tokens 512" in result.stdout and "--temperature 0.8" in result.stdout
    assert "/save FILE" in result.stdout


def test_a_command_and_its_argument_may_be_split_by_a_tab(tokenizer, capsys):
    from qwen_sft.chat import is_command, run_command

    session = ChatSession(tokenizer, "SYS", 4096, 512)
    assert is_command("/system\tNEW PROMPT")
    run_command(session, "/system\tNEW PROMPT")
    assert session.system_prompt == "NEW PROMPT" and "usage" not in capsys.readouterr().out


def test_session_drops_oldest_exchanges_first_and_keeps_the_system_prompt(tokenizer):
    session = ChatSession(tokenizer, "SYSTEM-X", max_context_tokens=10_000, max_new_tokens=100)
    for index in range(4):
        session.add(f"question {index}", f"answer {index}", complete=True)
    session.prompt_budget = session.prompt_tokens("next", session.history[-2:])  # room for the newest two only

    dropped, tokens = session.make_room("next")
    assert dropped == 2 and tokens == session.prompt_budget
    assert [exchange.user for exchange in session.history] == ["question 2", "question 3"]
    assert session.messages("next")[0] == {"role": "system", "content": "SYSTEM-X"}
    assert session.messages("next")[-1] == {"role": "user", "content": "next"}

    session.prompt_budget = 5  # not even the system prompt and the message fit: the history is left alone
    dropped, tokens = session.make_room("next")
    assert dropped == 0 and len(session.history) == 2 and tokens == session.prompt_tokens("next", [])


def conversation(system, *exchanges):
    messages = [{"role": "system", "content": system}]
    for user, reply in exchanges:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


def test_save_appends_conversation_rows_of_what_the_model_saw(tokenizer, tmp_path):
    target = tmp_path / "chats.jsonl"
    target.write_text('{"instruction": "old", "input": "", "output": "kept"}', encoding="utf-8")  # no final newline
    session = ChatSession(tokenizer, "SYS-A", 4096, 512)
    session.add("第一问", "第一答", complete=True)
    session.add("cut question", "an answer cut at the length limit", complete=False)
    session.add("第三问", "第三答", complete=True)  # sent with the cut reply: cannot be saved without it
    saved = session.save(target)
    assert (saved.rows, saved.exchanges, saved.cut, saved.after_cut) == (1, 1, 1, 1)

    session.reset()
    session.add("q4", "a4", complete=True)
    session.add("q5", "a5", complete=True)
    assert session.save(target).rows == 1  # one conversation: one row
    del session.history[0]  # as make_room drops the oldest exchange
    session.system_prompt = "SYS-B"
    session.add("q6", "a6", complete=True)
    session.add("q7", "a7", complete=True)
    saved = session.save(target)
    assert (saved.rows, saved.exchanges, saved.cut, saved.after_cut) == (1, 2, 0, 0)

    rows = read_records(target)
    assert rows[0] == {"instruction": "old", "input": "", "output": "kept"}
    assert rows[1:] == [
        {"messages": conversation("SYS-A", ("第一问", "第一答")), "source": "chat"},
        {"messages": conversation("SYS-A", ("q4", "a4"), ("q5", "a5")), "source": "chat"},
        {"messages": conversation("SYS-B", ("q5", "a5"), ("q6", "a6"), ("q7", "a7")), "source": "chat"},
    ]


def test_a_failed_tools_or_save_command_is_one_notice_and_the_chat_goes_on(tokenizer, tmp_path, monkeypatch,
                                                                          capsys):
    from qwen_sft.chat import run_command

    session = ChatSession(tokenizer, "S", 4096, 64)
    session.add("q", "a", complete=True)
    run_command(session, f"/tools {tmp_path / 'none.json'}")
    run_command(session, f"/save {tmp_path}")
    monkeypatch.setattr(ChatSession, "save", lambda self, path: (_ for _ in ()).throw(
        OSError(28, "No space left on device", path)))
    run_command(session, f"/save {tmp_path / 'chats.jsonl'}")
    assert capsys.readouterr().out.splitlines() == [
        f"[could not read tools: {tmp_path / 'none.json'}: No such file or directory]",
        f"[could not save: /save {tmp_path}: is a folder, not a regular file; outputs are written only as regular "
        "files and folders: choose another name]",
        f"[could not save: {tmp_path / 'chats.jsonl'}: No space left on device]",
    ]
    assert session.tools is None and len(session.unsaved) == 1  # nothing changed: the exchange can still be saved


def test_exchanges_with_different_contexts_get_their_own_rows(tokenizer, tmp_path):
    session = ChatSession(tokenizer, "SYS", 4096, 512)
    session.add("q1", "a1", complete=True)
    session.add("q2", "a2", complete=True)
    del session.history[0]
    session.add("q3", "a3", complete=True)  # saw q2 but not q1, while q2 itself was sent with q1
    assert session.save(tmp_path / "rows.jsonl").rows == 2
    assert [row["messages"] for row in read_records(tmp_path / "rows.jsonl")] == [
        conversation("SYS", ("q1", "a1"), ("q2", "a2")),
        conversation("SYS", ("q2", "a2"), ("q3", "a3")),
    ]


def test_a_saved_chat_trains_on_the_tokens_the_model_answered_from(tokenizer, tmp_path, monkeypatch, capsys):
    """chat_loop with its generation replaced by canned replies: each prompt it sent, token for token, is what
    training on the saved row puts before that reply, and each reply is learned as it was given."""
    from qwen_sft import chat
    from qwen_sft.generation import Reply
    from qwen_sft.template import answer_ids, prompt_ids, tokenize_example

    canned = iter([("Answer one.", True), ("第二个回答。", True), ("cut short", False), ("Fourth.", True)])
    sent = []

    def fake_stream_reply(model, tokenizer, messages, on_text=None, **decoding):
        sent.append(prompt_ids(tokenizer, messages))
        text, stopped = next(canned)
        return Reply(text, len(answer_ids(tokenizer, text)) - 1, stopped, False)

    monkeypatch.setattr(chat, "stream_reply", fake_stream_reply)
    session = ChatSession(tokenizer, "You are a test assistant.", 4096, 32)
    saved = tmp_path / "saved.jsonl"
    script = ["Question one?", "第二个问题？", f"/save {saved}", "/reset", "third", "fourth", f"/save {saved}"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    chat_loop(None, tokenizer, session, {"max_new_tokens": 32}, show_prompt=False)
    out = capsys.readouterr().out
    assert f"[appended 1 conversation row(s) (2 exchange(s)) to {saved}]" in out
    assert (f"[appended 0 conversation row(s) (0 exchange(s)) to {saved}; 1 reply(ies) cut at max_new_tokens (or "
            "empty) left out, and 1 later exchange(s) sent with a cut reply]") in out

    [row] = read_records(saved)
    assert row["messages"][0] == {"role": "system", "content": "You are a test assistant."}
    example, dropped = tokenize_example(tokenizer, row, "a different configured system prompt", 4096)
    ids, mask = example["input_ids"], example["completion_mask"]
    answer_starts = [i for i in range(len(mask)) if mask[i] and not (i and mask[i - 1])]
    assert dropped == 0 and len(answer_starts) == 2
    for start, prompt, reply in zip(answer_starts, sent, ["Answer one.", "第二个回答。"]):
        assert ids[:start] == prompt  # the exact context the model answered from
        answer = answer_ids(tokenizer, reply)
        assert ids[start:start + len(answer)] == answer and all(mask[start:start + len(answer)])


def test_piped_chat_multi_turn_commands_and_exit(adapter, tmp_path):
    saved = tmp_path / "saved.jsonl"
    script = [Q0, Q2, f"/save {saved}", "/reset", Q0, "/system 你是测试助手。", Q4, "/help", "exit", Q6]
    result = run_script("chat.py", "--adapter_dir", adapter, *EXACT, "--show_prompt", cwd=tmp_path,
                        input_text="\n".join(script) + "\n", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    prompts = [text for _, text in SHOWN_PROMPT.findall(result.stdout)]
    answers = replies(result.stdout)
    assert len(prompts) == len(answers) == 4, result.stdout  # Q6 after `exit` is never answered

    assert answers[0] == A0
    assert prompts[1].startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
    assert turn(Q0, A0) in prompts[1]  # the second message is sent with the first exchange
    assert prompts[2] == prompts[0]  # after /reset: the bare first prompt again...
    assert answers[2] == A0  # ...and the same exact answer

    assert read_records(saved) == [
        {"messages": conversation(DEFAULT_SYSTEM_PROMPT, (Q0, A0), (Q2, answers[1])), "source": "chat"}
    ]

    assert "[conversation cleared]" in result.stdout and "/system TEXT" in result.stdout
    assert "[system prompt set; it applies from the next message]" in result.stdout
    assert prompts[3].startswith("<|im_start|>system\n你是测试助手。<|im_end|>\n")  # /system replaced it...
    assert turn(Q0, A0) in prompts[3]  # ...and kept the conversation
    assert "<|" not in "".join(answers)


def test_history_is_trimmed_to_max_context_tokens_and_end_of_input_leaves(adapter, monkeypatch, capsys):
    """The loop chat.py runs, in this process: three messages, one too long to send, then end of input."""
    model, tokenizer, _ = load_adapter_model(str(adapter),
                                             base_model="tiny", backend="hf", load_in_4bit=False, max_seq_length=2048)
    def prompt_tokens(*turns):
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
        messages += [{"role": role, "content": text} for role, text in zip(("user", "assistant") * 3, turns)]
        return len(prompt_ids(tokenizer, messages))

    max_new_tokens = 32
    greedy = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0,
              "no_repeat_ngram_size": 0}
    # The reply to Q2 asked after the first exchange: a context never trained on, so not always ROWS[2]'s answer
    second = stream_reply(model, tokenizer, [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *(
        {"role": role, "content": text} for role, text in zip(("user", "assistant", "user"), (Q0, A0, Q2)))],
        **greedy).text
    # A prompt budget one token short of two earlier exchanges: it holds one earlier exchange, not two.
    budget = prompt_tokens(Q0, A0, Q2, second, Q4) - 1
    assert prompt_tokens(Q0, A0, Q2) <= budget and prompt_tokens(Q2, second, Q4) <= budget
    session = ChatSession(tokenizer, DEFAULT_SYSTEM_PROMPT, budget + max_new_tokens, max_new_tokens)
    too_long = "晶圆" * 200
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join([Q0, Q2, Q4, too_long]) + "\n"))
    chat_loop(model, tokenizer, session, greedy, show_prompt=True)  # returns at end of input

    stdout = capsys.readouterr().out
    shown = SHOWN_PROMPT.findall(stdout)
    assert len(shown) == 3 and all(int(tokens) <= budget for tokens, _ in shown)
    assert Q0 in shown[1][1] and Q2 in shown[1][1]  # the first exchange still fits with the second message
    third = shown[2][1]
    assert Q0 not in third and Q2 in third and Q4 in third  # the oldest exchange went first
    assert third.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
    notice = "[dropped the 1 oldest exchange(s) to stay within max_context_tokens]"
    assert stdout.count(notice) == 1 and stdout.index(notice) < stdout.index(third)
    assert [exchange.user for exchange in session.history] == [Q2, Q4]  # the message too long was refused...
    assert re.search(rf"\[that message needs \d+ prompt tokens but max_context_tokens leaves {budget} beside "
                     r"max_new_tokens; shorten it or raise --max_context_tokens\]", stdout)  # ...with a notice
    assert stdout.endswith("你> \n")  # end of input at the prompt leaves quietly


def test_missing_adapter_and_bad_budget_are_one_line_exit_2(adapter, tmp_path):
    result = run_script("chat.py", "--adapter_dir", tmp_path / "nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: no LoRA adapter there; run Qwen_finetuning.py first (or pass --adapter_dir)"
    ]
    result = run_script("chat.py", "--adapter_dir", adapter, "--max_new_tokens", "600", "--max_context_tokens", "512",
                        cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --max_new_tokens 600 leaves no room for the prompt in --max_context_tokens 512; raise "
        "--max_context_tokens or lower --max_new_tokens"
    ]


def test_adapter_tokenizer_without_chat_template_is_refused(adapter, tmp_path):
    no_template = tmp_path / "no_template"
    shutil.copytree(adapter, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config_file = no_template / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(UserError) as error:
        load_adapter_tokenizer(str(no_template))
    assert str(error.value) == (f"{no_template}: the tokenizer has no chat template; re-run Qwen_finetuning.py to "
                                "write a complete adapter folder")
    assert load_adapter_tokenizer(str(adapter)).chat_template  # the complete folder passes


class Terminal:
    """chat.py on a pseudo-terminal it owns, so that Ctrl-C typed there is a SIGINT, as for a user."""

    def __init__(self, *args, cwd):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "chat.py"), *map(str, args)], cwd=cwd, stdin=slave, stdout=slave,
            stderr=slave, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # the pty becomes its controlling terminal
        )
        os.close(slave)
        self.pending = b""

    def read_until(self, text: str, timeout: float = 120) -> str:
        """Everything up to and including `text`."""
        wanted = text.encode()
        deadline = time.monotonic() + timeout
        while wanted not in self.pending:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                seen = self.pending[-800:].decode(errors="replace")
                raise AssertionError(f"no {text!r} within {timeout}s; got {seen}")
            self.pending += os.read(self.master, 4096)
        end = self.pending.index(wanted) + len(wanted)
        seen, self.pending = self.pending[:end], self.pending[end:]
        return seen.decode(errors="replace")

    def read_some(self, count: int, timeout: float = 60) -> bytes:
        """At least `count` more bytes of output."""
        deadline = time.monotonic() + timeout
        while len(self.pending) < count:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"fewer than {count} bytes within {timeout}s: {self.pending!r}")
            self.pending += os.read(self.master, 4096)
        seen, self.pending = self.pending, b""
        return seen

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        os.close(self.master)


@pytest.fixture(scope="module")
def base_only_adapter(adapter, tmp_path_factory):
    """The trained adapter with its LoRA B matrices zeroed: the random tiny base itself, which under the seed's
    repetition penalties writes thousands of tokens without reaching <|im_end|>, a reply long enough to interrupt."""
    folder = tmp_path_factory.mktemp("base_only") / "adapter"
    shutil.copytree(adapter, folder)
    weights = load_file(folder / "adapter_model.safetensors")
    save_file({name: np.zeros_like(value) if "lora_B" in name else value for name, value in weights.items()},
              str(folder / "adapter_model.safetensors"))
    return folder


def test_ctrl_c_stops_the_reply_and_keeps_the_session(base_only_adapter, tmp_path):
    history = tmp_path / "history"
    terminal = Terminal("--adapter_dir", base_only_adapter, "--temperature", "0", "--max_new_tokens", "20000",
                        "--max_context_tokens", "30000", "--show_prompt", "--history_file", history, cwd=tmp_path)
    try:
        terminal.read_until("你> ")
        terminal.type("first message\r")
        terminal.read_until("助手> ")
        terminal.read_some(40)  # the reply is streaming
        terminal.type("\x03")
        terminal.read_until(STOPPED, timeout=15)  # promptly: the flag ends generation within a step
        terminal.read_until("你> ")

        terminal.type("second message\r")
        prompt = terminal.read_until("[end of prompt]")
        assert "second message" in prompt and "first message" not in prompt  # the stopped exchange was dropped
        terminal.read_until("助手> ")
        terminal.type("\x03")  # at once: also covers a Ctrl-C before the first token
        terminal.read_until(STOPPED, timeout=15)  # promptly: the flag ends generation within a step

        terminal.read_until("你> ")
        terminal.type("/help\r")
        terminal.read_until("/reset")  # the session still answers commands
        terminal.read_until("你> ")
        # readline prints the prompt before it starts waiting for keys; a SIGINT in between is only noticed
        # at the next key (CPython's readline loop), so give it a moment as a person would.
        time.sleep(0.5)
        terminal.type("\x03")  # Ctrl-C at the prompt leaves cleanly
        assert terminal.process.wait(timeout=60) == 0
    finally:
        terminal.close()
    assert history.read_text(encoding="utf-8").splitlines()[-3:] == ["first message", "second message", "/help"]
