"""Multi-turn `messages` rows: validation, masks from the official template, truncation by whole turns."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from qwen_sft.cli import UserError
from qwen_sft.data import tokenize_records
from qwen_sft.records import read_records
from qwen_sft.template import (
    DEFAULT_SYSTEM_PROMPT,
    build_messages,
    conversation_example,
    reference_answer,
    tokenize_example,
)
from qwen_sft.tiny import tiny_path

THREE_TURNS = [
    {"role": "user", "content": "请记住数字7。"},
    {"role": "assistant", "content": "好的，记住了。"},
    {"role": "user", "content": "Add 2 to it."},
    {"role": "assistant", "content": "That makes 9."},
    {"role": "user", "content": "我让你记住的数字是几？"},
    {"role": "assistant", "content": "数字是7。"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny_path())


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def test_one_file_mixes_single_turn_and_conversation_rows(tmp_path):
    path = write_rows(tmp_path / "mixed.jsonl", [
        {"instruction": "q", "output": "a"},
        {"messages": [{"role": "system", "content": "S"}, *THREE_TURNS], "source": "chat", "id": 3},
    ])
    single, conversation = read_records(path)
    assert single == {"instruction": "q", "input": "", "output": "a"}
    assert conversation == {"messages": [{"role": "system", "content": "S"}, *THREE_TURNS], "source": "chat"}
    assert reference_answer(conversation) == "数字是7。" and reference_answer(single) == "a"


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}],
         "rows.jsonl:2: message 1: role must be system, user, assistant or tool, got 'human'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}],
         'rows.jsonl:2: message 2: "content" must be a non-empty string'),
        ([{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}],
         "rows.jsonl:2: message 2: two user turns in a row"),
        ([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
         "rows.jsonl:2: no assistant turn"),
        ([*THREE_TURNS[:3]], "rows.jsonl:2: ends with a user turn"),
        ([{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}],
         "rows.jsonl:2: message 1: unknown key(s) 'weight'"),
        ([{"role": "assistant", "content": "a"}], "rows.jsonl:2: message 1: an assistant turn must follow a user turn"),
        ([*THREE_TURNS[:2], {"role": "system", "content": "S"}], "rows.jsonl:2: message 3: a system turn may only"),
        ([], 'rows.jsonl:2: "messages" must be a non-empty list'),
        ("hello", 'rows.jsonl:2: "messages" must be a non-empty list'),
    ],
)
def test_bad_conversation_names_file_line_and_problem(tmp_path, messages, message):
    path = write_rows(tmp_path / "rows.jsonl", [{"instruction": "q", "output": "a"}, {"messages": messages}])
    with pytest.raises(UserError) as caught:
        read_records(path)
    assert message in str(caught.value)


def test_a_row_is_either_kind_not_both(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [{"messages": THREE_TURNS, "output": "a"}])
    with pytest.raises(UserError, match='rows.jsonl:1: a row holds either "messages" or "output", not both'):
        read_records(path)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_three_turn_mask_covers_every_answer_and_nothing_else(tokenizer):
    """The mask, built by hand from hand-written ChatML: 0 on the system and user turns and on the role headers,
    1 on each answer and its <|im_end|>."""
    example, dropped = tokenize_example(tokenizer, {"messages": THREE_TURNS}, "SYS", 4096)
    assert dropped == 0
    pieces = [
        ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n请记住数字7。<|im_end|>\n<|im_start|>assistant\n", 0),
        ("好的，记住了。<|im_end|>", 1),
        ("\n<|im_start|>user\nAdd 2 to it.<|im_end|>\n<|im_start|>assistant\n", 0),
        ("That makes 9.<|im_end|>", 1),
        ("\n<|im_start|>user\n我让你记住的数字是几？<|im_end|>\n<|im_start|>assistant\n", 0),
        ("数字是7。<|im_end|>", 1),
    ]
    expected_ids = [token for text, _ in pieces for token in ids(tokenizer, text)]
    expected_mask = [bit for text, bit in pieces for _ in ids(tokenizer, text)]
    assert example == {"input_ids": expected_ids, "completion_mask": expected_mask}
    assert sum(expected_mask) == sum(len(ids(tokenizer, text)) for text, bit in pieces if bit) > 0
    labelled = tokenizer.decode([token for token, bit in zip(example["input_ids"], example["completion_mask"]) if bit])
    assert labelled == "好的，记住了。<|im_end|>That makes 9.<|im_end|>数字是7。<|im_end|>"
    # The example is the official template's full render, less its trailing newline.
    full = tokenizer.apply_chat_template(build_messages({"messages": THREE_TURNS}, "SYS", with_answer=True),
                                         tokenize=False)
    assert tokenizer.decode(example["input_ids"]) + "\n" == full


def test_single_exchange_conversation_tokenizes_exactly_as_a_single_turn_row(tokenizer):
    single = {"instruction": "报告的良率是多少？", "input": "", "output": "良率为93%。"}
    conversation = {"messages": [{"role": "user", "content": single["instruction"]},
                                 {"role": "assistant", "content": single["output"]}]}
    assert tokenize_example(tokenizer, conversation, DEFAULT_SYSTEM_PROMPT, 2048) == \
        tokenize_example(tokenizer, single, DEFAULT_SYSTEM_PROMPT, 2048)
    assert build_messages(conversation, DEFAULT_SYSTEM_PROMPT) == build_messages(single, DEFAULT_SYSTEM_PROMPT)


def test_single_turn_rows_render_and_tokenize_as_before(tokenizer):
    """The single-turn example is the hand-written ChatML it always was: prompt, then answer + <|im_end|>."""
    record = {"instruction": "总结", "input": "良率 93%", "output": "良率为93%。"}
    prompt = "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n总结\n\n补充信息：\n良率 93%<|im_end|>\n<|im_start|>assistant\n"
    example, cut = tokenize_example(tokenizer, record, "SYS", 2048)
    answer = ids(tokenizer, "良率为93%。<|im_end|>")
    assert not cut and example == {"input_ids": ids(tokenizer, prompt) + answer,
                                   "completion_mask": [0] * len(ids(tokenizer, prompt)) + [1] * len(answer)}
    assert tokenizer.decode(example["input_ids"]).encode() == (prompt + "良率为93%。<|im_end|>").encode()


def test_configured_system_prompt_only_where_the_conversation_has_none(tokenizer):
    own = {"messages": [{"role": "system", "content": "OWN"}, *THREE_TURNS]}
    assert build_messages(own, "CONFIGURED")[0] == {"role": "system", "content": "OWN"}
    assert build_messages({"messages": THREE_TURNS}, "CONFIGURED")[0] == {"role": "system", "content": "CONFIGURED"}
    prompt = build_messages({"messages": THREE_TURNS}, "CONFIGURED")
    assert prompt[-1] == THREE_TURNS[-2] and len(prompt) == 6  # the prompt of the last answer: all turns before it
    example, _ = tokenize_example(tokenizer, own, "CONFIGURED", 4096)
    assert "CONFIGURED" not in tokenizer.decode(example["input_ids"]) and "OWN" in tokenizer.decode(example["input_ids"])


def test_long_conversation_drops_its_oldest_whole_exchanges(tokenizer):
    record = {"messages": [{"role": "system", "content": "S"}, *THREE_TURNS]}
    last_two = conversation_example(tokenizer, [{"role": "system", "content": "S"}, *THREE_TURNS[2:]])
    whole = conversation_example(tokenizer, record["messages"])
    example, dropped = tokenize_example(tokenizer, record, DEFAULT_SYSTEM_PROMPT, len(whole["input_ids"]) - 1)
    assert (example, dropped) == (last_two, 1)  # the system turn stays, the first exchange goes whole
    last = conversation_example(tokenizer, [{"role": "system", "content": "S"}, *THREE_TURNS[4:]])
    assert tokenize_example(tokenizer, record, "", len(last["input_ids"])) == (last, 2)
    assert tokenize_example(tokenizer, record, "", len(last["input_ids"]) - 1) == (None, 0)

    mixed = [record, record, {"instruction": "q", "input": "", "output": "a"}]
    rows, stats, kept = tokenize_records(tokenizer, mixed, "", len(last["input_ids"]))
    assert rows == [last, last] + rows[2:] and len(rows) == 3 and kept == [0, 1, 2]
    assert stats == {"prompt_truncated": 0, "dropped_answer_too_long": 0, "conversations_shortened": 2,
                     "exchanges_dropped": 4, "dropped_last_exchange_too_long": 0, "text_truncated": 0}
    _, stats, kept = tokenize_records(tokenizer, mixed, "", len(last["input_ids"]) - 1)
    assert stats["dropped_last_exchange_too_long"] == 2 and kept == [2]  # the row each example came from


def test_a_template_that_is_not_prefix_consistent_is_refused(tokenizer):
    odd = AutoTokenizer.from_pretrained(tiny_path())
    odd.chat_template = ("{{ messages | length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(UserError, match="does not render a conversation turn by turn"):
        tokenize_example(odd, {"messages": THREE_TURNS}, "S", 4096)


# ---------------------------------------------------------------------------------------------------- data stages

def orca_chat(*turns, system="Be brief."):
    return {"conversations": [{"from": "system", "value": system, "weight": None}]
            + [{"from": speaker, "value": text, "weight": 1.0} for speaker, text in turns]}


def test_slimorca_chat_of_several_exchanges_becomes_a_conversation_row():
    from qwen_sft.mix.schemas import SCHEMAS, Cut

    orca = SCHEMAS["orca"]
    chat = orca_chat(("human", "Pick a number."), ("gpt", "Seven."), ("human", " Which one? "), ("gpt", "Seven, as said."))
    assert orca.convert(chat) == [
        {"role": "user", "content": "Be brief.\n\nPick a number."}, {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "Which one?"}, {"role": "assistant", "content": "Seven, as said."},
    ]
    single = orca_chat(("human", "Pick a number."), ("gpt", "Seven."))
    assert orca.convert(single) == ("Be brief.\n\nPick a number.", "", "Seven.")  # single-turn, as before
    # A chat that stops alternating, or whose later exchange is empty, keeps its exchanges before that point, and
    # says why it was cut (the manifest counts it).
    first = ("Be brief.\n\na", "", "b")
    assert orca.convert(orca_chat(("human", "a"), ("gpt", "b"), ("gpt", "c"), ("human", "d"), ("gpt", "e"))) == \
        Cut(first, "stops_alternating")
    assert orca.convert(orca_chat(("human", "a"), ("gpt", "b"), ("human", " "), ("gpt", "c"))) == Cut(first, "empty_turn")
    unanswered = orca.convert(orca_chat(("human", "a"), ("gpt", "b"), ("human", "c"), ("gpt", "d"), ("human", "e")))
    assert unanswered.reason == "unanswered_question" and len(unanswered.kept) == 4
    assert orca.convert(orca_chat(("human", "a"), ("gpt", "b"), ("bot", "c"))) == Cut(first, "broken_turn")


def test_conversation_rows_are_written_as_compact_json_dumps_writes_them():
    from qwen_sft.mix.rows import conversation_duplicate_key, mix_line

    messages = [{"role": "user", "content": '"引号"\n\\ \u2028'}, {"role": "assistant", "content": "\x00 ok"}]
    expected = json.dumps({"messages": messages, "source": "orca"}, ensure_ascii=False, separators=(",", ":"))
    assert mix_line({"messages": messages}, "orca") == (expected + "\n").encode()
    shouted = [{"role": "user", "content": '"引号"\n\\ \u2028'.upper() + "  "}, {"role": "assistant", "content": "\x00 OK"}]
    assert conversation_duplicate_key(messages) == conversation_duplicate_key(shouted)
    swapped = [{"role": "assistant", "content": messages[0]["content"]}, {"role": "user", "content": "\x00 ok"}]
    assert conversation_duplicate_key(messages) != conversation_duplicate_key(swapped)


def test_data_stage_keeps_conversations_whole_and_counts_each_as_one_row(tmp_path, monkeypatch):
    import runpy
    import sys

    from conftest import FIXTURES, ROOT

    chats = [orca_chat(("human", f"Remember {n}."), ("gpt", f"Noted: {n}."), ("human", "Which number?"),
                       ("gpt", f"It was {n}.")) for n in range(6)]
    chats.append(orca_chat(("human", "REMEMBER 0."), ("gpt", "noted:  0."), ("human", "Which number?"),
                           ("gpt", "It was 0.")))  # a near-duplicate of the first chat
    chats.append(orca_chat(("human", "Long one."), ("gpt", "x"), ("human", "More?"), ("gpt", "word " * 2000)))
    chats += [orca_chat(("human", f"Single {n}?"), ("gpt", f"Answer {n}.")) for n in range(4)]
    orca = write_rows(tmp_path / "orca.jsonl", chats)
    reports = write_rows(tmp_path / "reports.jsonl", [
        {"instruction": "报告良率？", "input": "", "output": "良率为93%。"},
        {"messages": [{"role": "system", "content": "S"}, *THREE_TURNS]},
    ])
    namespace = runpy.run_path(str(ROOT / "data_integration.py"))
    monkeypatch.setattr(sys, "argv", list(map(str, [
        "data_integration.py", "--my_report_data_path", reports, "--sources",
        f"orca={orca},pubmed={FIXTURES / 'hub' / 'pubmedqa_pqa_labeled.jsonl'}", "--total_samples", 12,
        "--ratios", "reports=0.2,orca=0.8,pubmed=0", "--min_output_chars", 1, "--output_file", tmp_path / "mix.jsonl",
    ])))
    namespace["main"]()
    rows = read_records(tmp_path / "mix.jsonl")  # every row valid for training
    manifest = json.loads((tmp_path / "mix.jsonl.manifest.json").read_text(encoding="utf-8"))
    orca_rows = [row for row in rows if row["source"] == "orca"]
    assert len(orca_rows) == 10 and manifest["sources"]["orca"]["kept"] == {"orca": 10}  # one chat = one row
    conversations = [row["messages"] for row in orca_rows if "messages" in row]
    assert len(conversations) == 6 and all(len(messages) == 4 for messages in conversations)
    assert manifest["sources"]["orca"]["duplicates"] == 1
    assert manifest["sources"]["orca"]["filtered"] == {"too_long": 1}
    first = next(messages for messages in conversations if messages[1]["content"] == "Noted: 0.")
    assert first[0] == {"role": "user", "content": "Be brief.\n\nRemember 0."}
    report_rows = [row for row in rows if row["source"] == "reports"]
    assert len(report_rows) == 2
    assert {"messages": [{"role": "system", "content": "S"}, *THREE_TURNS], "source": "reports"} in report_rows


# ---------------------------------------------------------------------------------------------------- learning proof

SYSTEM = "你是助手。"  # short, so the examples stay short (the real vocabulary's LM head is costly on CPU)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """The tiny model trained on 8 "remember the number" conversations and 2 single-turn rows, in one file."""
    from conftest import FIXTURES, LEARNING_FLAGS, run_script, without_flags

    workdir = tmp_path_factory.mktemp("memorised")
    dataset = FIXTURES / "conversations_10.jsonl"
    extra = ["--per_device_train_batch_size", "10", "--dataset_path", dataset, "--system_prompt", SYSTEM]
    result = run_script("Qwen_finetuning.py", *without_flags(LEARNING_FLAGS, extra), *extra, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "Qwen_finetuning_model", read_records(dataset), dataset


@pytest.mark.slow
def test_multi_turn_learning_proof_greedy_chat_recalls_the_first_exchange(memorised, monkeypatch, capsys):
    """Each second answer ("是7。") depends only on the first exchange: the question is the same in every chat."""
    import io
    import sys

    from qwen_sft.chat import ChatSession, chat_loop
    from qwen_sft.modeling import load_adapter_model

    adapter, records, _ = memorised
    model, tokenizer, _ = load_adapter_model(str(adapter),
                                             base_model="tiny", backend="hf", load_in_4bit=False, max_seq_length=2048)
    chats = [record["messages"] for record in records if "messages" in record]
    assert len({messages[2]["content"] for messages in chats}) == 1 and len(chats) == 8
    script = [line for messages in chats for line in (messages[0]["content"], messages[2]["content"], "/reset")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    session = ChatSession(tokenizer, SYSTEM, 1024, 32)
    greedy = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0,
              "no_repeat_ngram_size": 0}
    chat_loop(model, tokenizer, session, greedy, show_prompt=False)
    out = capsys.readouterr().out
    replies = [line.removeprefix("助手> ") for line in out.splitlines() if line.startswith("助手> ")]
    assert replies == [messages[turn]["content"] for messages in chats for turn in (1, 3)]
    assert "cut at max_new_tokens" not in out  # every reply stopped at <|im_end|>


@pytest.mark.slow
def test_evaluation_scores_every_answer_and_generates_the_last(memorised, tmp_path):
    from conftest import run_script
    from qwen_sft.data import split_records

    adapter, records, dataset = memorised
    result = run_script("evaluate.py", "--adapter_dir", adapter, "--dataset_path", dataset, "--eval_ratio", "0.5",
                        "--system_prompt", SYSTEM, "--temperature", "0", "--max_new_tokens", "24",
                        "--compare_base", "false", "--output_dir", tmp_path / "eval", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    _, eval_records = split_records(records, 0.5, 42)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    masks = [tokenize_example(tokenizer, record, SYSTEM, 2048)[0]["completion_mask"] for record in eval_records]
    assert metrics["teacher_forcing"]["answer_tokens"] == sum(map(sum, masks))  # every answer of every row
    assert metrics["exact_match"] == 1.0 and metrics["stop_rate"] == 1.0  # trained rows, reproduced
    sources = {record.get("source") for record in eval_records}
    assert "memory" in sources and set(metrics["by_source"]) == sources
    assert metrics["by_source"]["memory"]["exact_match"] == 1.0
    lines = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    chat_lines = [line for line in lines if "messages" in line]
    assert chat_lines and len(lines) == len(eval_records)
    for line in chat_lines:  # the turns before the generated answer, which equals the reference
        assert len(line["messages"]) == 3 and line["prediction"] == line["reference"]
        assert line["reference"] == f"是{line['messages'][0]['content'][-2]}。"


@pytest.mark.slow
def test_inference_file_mode_answers_conversations(memorised, tmp_path):
    from conftest import run_script

    adapter, records, _ = memorised
    chat = next(record["messages"] for record in records if "messages" in record)
    prompts = write_rows(tmp_path / "prompts.jsonl", [
        {"id": "open", "messages": chat[:3]},  # ends with the user's question
        {"id": "trained", "messages": chat},  # ends with an answer: that is the reference
        {"id": "single", "instruction": records[2]["instruction"]},
    ])
    result = run_script("inference.py", "--adapter_dir", adapter, "--instruction_file", prompts, "--output_file",
                        tmp_path / "answers.jsonl", "--system_prompt", SYSTEM, "--preset", "greedy",
                        "--max_new_tokens", "24", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    answered = {row["id"]: row for row in map(json.loads, (tmp_path / "answers.jsonl").read_text().splitlines())}
    assert answered["open"]["output"] == answered["trained"]["output"] == chat[3]["content"]
    assert "reference" not in answered["open"] and answered["trained"]["reference"] == chat[3]["content"]
    assert answered["trained"]["messages"] == chat
    assert answered["single"]["output"] == records[2]["output"]
    assert all(row["stopped"] for row in answered.values())


def test_a_long_prompt_loses_whole_exchanges_before_tokens(tokenizer):
    from qwen_sft.template import prompt_ids, prompt_within

    messages = build_messages({"messages": THREE_TURNS}, "S")  # system, 2 exchanges, the last question
    without_first = [messages[0], *messages[3:]]
    assert len(without_first) == 4 and prompt_within(tokenizer, messages, 4096) == (prompt_ids(tokenizer, messages), False)
    fits_one = len(prompt_ids(tokenizer, without_first))
    assert prompt_within(tokenizer, messages, fits_one) == (prompt_ids(tokenizer, without_first), True)
    bare = prompt_ids(tokenizer, [messages[0], messages[-1]])
    assert prompt_within(tokenizer, messages, len(bare) - 2) == (bare[2:], True)  # then its end is kept


@pytest.mark.slow
def test_training_manifest_counts_shortened_and_dropped_conversations(tokenizer, tmp_path):
    from conftest import run_script

    short_end = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    fits = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, *short_end]}
    too_long = {"messages": [*short_end, {"role": "user", "content": "long " * 60}, {"role": "assistant", "content": "b"}]}
    limit = len(conversation_example(tokenizer, [{"role": "system", "content": SYSTEM}, *short_end])["input_ids"])
    dataset = write_rows(tmp_path / "rows.jsonl", [fits, too_long, {"instruction": "q", "output": "a"}])
    result = run_script("Qwen_finetuning.py", "--preset", "tiny_cpu", "--max_steps", "1",
                        "--per_device_train_batch_size", "1", "--eval_ratio", "0",
                        "--dataset_path", dataset, "--system_prompt", SYSTEM, "--max_seq_length", limit, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "Qwen_finetuning_model" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["rows"]["train"] == 2
    assert manifest["rows"]["train_stats"] == {
        "prompt_truncated": 0, "dropped_answer_too_long": 0, "conversations_shortened": 1, "exchanges_dropped": 1,
        "dropped_last_exchange_too_long": 1, "text_truncated": 0,
    }
    assert "1 conversations lost their 1 oldest exchanges; 1 conversations dropped" in result.stdout


# ------------------------------------------------------------------------------------- fitting in linear time

def quadratic_fit(tokenizer, record, system_prompt, max_seq_length):
    """The fitting as it was before it took linear time (every start offset, every prefix rendered): the
    reference the linear one must equal."""
    from qwen_sft.template import conversation_messages

    system, *turns = conversation_messages(record, system_prompt)
    for start in range(0, len(turns), 2):
        example = conversation_example(tokenizer, [system, *turns[start:]])
        if len(example["input_ids"]) <= max_seq_length:
            return example, start // 2
    return None, 0


words = st.text(st.sampled_from("ab 数字\n<>{}|_"), min_size=1, max_size=12).filter(str.strip)


@given(contents=st.lists(words, min_size=2, max_size=12).map(lambda items: items[: len(items) // 2 * 2]),
       system=st.sampled_from([None, "S", "长系统提示"]), max_seq_length=st.integers(20, 160))
@settings(max_examples=150)
def test_linear_fitting_gives_the_tokens_and_masks_of_the_old_algorithm(tokenizer, contents, system, max_seq_length):
    turns = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(contents)]
    record = {"messages": ([{"role": "system", "content": system}] if system else []) + turns}
    expected = quadratic_fit(tokenizer, record, DEFAULT_SYSTEM_PROMPT[:12], max_seq_length)
    assert tokenize_example(tokenizer, record, DEFAULT_SYSTEM_PROMPT[:12], max_seq_length) == expected


def test_fitting_renders_only_the_exchanges_that_fit(tokenizer, monkeypatch):
    """The template renders per conversation grow with the exchanges kept, not with the conversation's length
    (it was cubic in the length: 200 exchanges took 26 s)."""
    renders = []
    original = type(tokenizer).apply_chat_template
    monkeypatch.setattr(type(tokenizer), "apply_chat_template",
                        lambda self, *args, **kwargs: renders.append(1) or original(self, *args, **kwargs))

    def count(exchanges: int) -> tuple[int, int]:
        turns = [turn for i in range(exchanges) for turn in ({"role": "user", "content": f"Question {i % 10}?"},
                                                            {"role": "assistant", "content": f"Answer {i % 10}."})]
        renders.clear()
        example, dropped = tokenize_example(tokenizer, {"messages": turns}, "S", 256)
        return len(renders), exchanges - dropped

    (short_renders, short_kept), (long_renders, long_kept) = count(100), count(10_000)
    assert short_kept == long_kept < 20 and short_renders == long_renders <= 10 * short_kept
