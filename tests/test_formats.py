"""The ecosystem's row formats: LLaMA-Factory's demo files and TRL's documented rows, read, rendered and masked as the
official Qwen2.5 template renders them, with nothing dropped without a word."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import FIXTURES
from qwen_sft.cli import UserError
from qwen_sft.families import family
from qwen_sft.formats import IgnoredFields
from qwen_sft.records import read_records, validate_record
from qwen_sft.template import DEFAULT_SYSTEM_PROMPT, build_messages, reference_answer, tokenize_example
from qwen_sft.tiny import tiny_path

LLAMA_FACTORY = FIXTURES / "llamafactory"
DEMO_FILES = ["alpaca_zh_demo.json", "glaive_toolcall_zh_demo.json", "glaive_toolcall_en_demo.json", "identity.json"]
ALL_FILES = [LLAMA_FACTORY / name for name in DEMO_FILES] + [FIXTURES / "trl_formats.jsonl"]

# The official template with TRL's {% generation %} markers around what an assistant turn says (its content, its
# tool calls and its <|im_end|>), so that transformers' return_assistant_tokens_mask gives an independent mask.
MARKED = [
    ("""{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}""",
     """{%- if message.role == "assistant" and not message.tool_calls %}{{- '<|im_start|>assistant\\n' }}"""
     """{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"""
     """{%- elif (message.role == "user") or (message.role == "system" and not loop.first) %}"""),
    ("""        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}""",
     """        {{- '<|im_start|>assistant\\n' }}{% generation %}
        {%- if message.content %}
            {{- message.content + '\\n' }}
        {%- endif %}"""),
    ("""            {{- '\\n<tool_call>\\n{"name": "' }}""",
     """            {%- if not loop.first %}{{- '\\n' }}{%- endif %}{{- '<tool_call>\\n{"name": "' }}"""),
    ("""        {%- endfor %}
        {{- '<|im_end|>\\n' }}""",
     """        {%- endfor %}
        {{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"""),
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny_path())


@pytest.fixture(scope="module")
def marked(tokenizer):
    template = family.CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    for official, with_markers in MARKED:
        assert template.count(official) == 1
        template = template.replace(official, with_markers)
    copy = AutoTokenizer.from_pretrained(tiny_path())
    copy.chat_template = template
    return copy


def test_demo_files_are_read_with_their_counts(capsys):
    """Every row of each file becomes a record; glaive's function calls and tools are kept."""
    counts = {}
    for path in ALL_FILES:
        report = IgnoredFields()
        records = read_records(path, report=report)
        counts[path.name] = (len(records), report.report())
    assert counts["alpaca_zh_demo.json"] == (30, {"formats": {"alpaca": 30}, "ignored_fields": {}})
    assert counts["identity.json"] == (30, {"formats": {"alpaca": 30}, "ignored_fields": {}})
    for name in ("glaive_toolcall_zh_demo.json", "glaive_toolcall_en_demo.json"):
        assert counts[name] == (30, {"formats": {"sharegpt": 30}, "ignored_fields": {}})
    assert counts["trl_formats.jsonl"] == (7, {
        "formats": {"messages": 4, "prompt_completion": 2, "text": 1},
        "ignored_fields": {"messages[].name": 1, "messages[].tool_call_id": 1},
    })
    out = capsys.readouterr().out
    assert f'{FIXTURES / "trl_formats.jsonl"}: 1 rows: field "messages[].name" ignored (not used by the toolkit)' in out

    glaive = read_records(LLAMA_FACTORY / "glaive_toolcall_en_demo.json")
    with_calls = [record for record in glaive if any("tool_calls" in turn for turn in record["messages"])]
    raw = json.loads((LLAMA_FACTORY / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
    assert len(with_calls) == sum(any(t["from"] == "function_call" for t in row["conversations"]) for row in raw) == 15
    assert sum("tools" in record for record in glaive) == sum(bool(json.loads(row["tools"])) for row in raw)


def _official(marked, messages, tools):
    return marked.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda path: path.name)
def test_tokens_and_masks_are_the_official_templates(tokenizer, marked, path):
    """Each record's tokens are the official template's render (tools in the system turn, <tool_call> in the
    assistant turn, <tool_response> in a user turn); the loss falls exactly on what the assistant says, tool calls
    included, never on a tool result."""
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for record in read_records(path):
        example, cut = tokenize_example(tokenizer, record, DEFAULT_SYSTEM_PROMPT, 100_000)
        assert not cut
        if "text" in record:
            end_of_text = tokenizer.convert_tokens_to_ids(family.END_OF_TEXT)
            assert example["input_ids"] == tokenizer(record["text"])["input_ids"] + [end_of_text]
            assert example["completion_mask"] == [0] + [1] * (len(example["input_ids"]) - 1)  # all but the first
            continue
        messages = build_messages(record, DEFAULT_SYSTEM_PROMPT, with_answer=True)
        official = _official(marked, messages, record.get("tools"))
        assert marked.apply_chat_template(messages, tools=record.get("tools"), tokenize=False) == (
            tokenizer.apply_chat_template(messages, tools=record.get("tools"), tokenize=False))  # markers only
        assert official["input_ids"] == example["input_ids"] + newline
        assert official["assistant_masks"][:-1] == example["completion_mask"]
        answer = tokenizer.decode([t for t, m in zip(example["input_ids"], example["completion_mask"]) if m])
        assert "<tool_response>" not in answer and answer.endswith(reference_answer(record) + family.END_OF_TURN)


def test_a_glaive_tool_row_renders_its_call_and_result_as_the_template_writes_them(tokenizer):
    record = read_records(LLAMA_FACTORY / "glaive_toolcall_zh_demo.json")[0]
    text = tokenizer.decode(tokenize_example(tokenizer, record, "S", 100_000)[0]["input_ids"])
    assert '# Tools\n\nYou may call one or more functions' in text and '"name": "generate_invoice"' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "generate_invoice", "arguments": {"customer_name": '
            '"约翰·多伊"') in text
    assert '<|im_start|>user\n<tool_response>\n{"invoice_id": "INV12345"' in text


ROWS = [
    ({"instruction": "q", "input": "", "output": "a", "system": "S", "history": [["q0", "a0"]]},
     {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q0"},
                   {"role": "assistant", "content": "a0"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}),
    ({"instruction": "q", "input": "x", "output": "a", "system": "", "history": []},
     {"instruction": "q", "input": "x", "output": "a"}),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                        {"from": "function_call", "value": '{"name": "f", "arguments": {"x": 1}}'},
                        {"from": "observation", "value": "2"}, {"from": "gpt", "value": "a"}],
      "tools": '[{"name": "f", "description": "d", "parameters": {"type": "object"}}]'},
     {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
                   {"role": "tool", "content": "2"}, {"role": "assistant", "content": "a"}],
      "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]}),
    ({"prompt": "The sky is", "completion": " blue."}, {"instruction": "The sky is", "input": "", "output": " blue."}),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
     {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
    ({"text": "The sky is blue.", "source": "docs"}, {"text": "The sky is blue.", "source": "docs"}),
]


@pytest.mark.parametrize("row, record", ROWS)
def test_each_format_becomes_its_record(row, record):
    assert validate_record(row, "rows.jsonl:1") == record


def test_ignored_fields_are_named_once_per_file_and_counted(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<image>What?"}]},
                          {"role": "assistant", "content": "A cat."}], "images": ["cat.jpg"], "id": n}
            for n in range(6)]
    path = tmp_path / "mllm.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    report = IgnoredFields()
    records = read_records(path, report=report)
    assert records[0]["messages"][0] == {"role": "user", "content": "<image>What?"}
    assert capsys.readouterr().out.splitlines() == [
        f'{path}: 6 rows: content part "image" ignored (text-only model)',
        f'{path}: 6 rows: field "id" ignored (not used by the toolkit)',
        f'{path}: 6 rows: field "images" ignored (text-only model)',
    ]
    assert report.report()["ignored_fields"] == {'content part "image"': 6, "id": 6, "images": 6}


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "answer": "a"},
     "rows.jsonl:1: a row of unknown shape (keys 'answer', 'question'); the formats read are alpaca (instruction, "
     'output), sharegpt (conversations), messages, prompt/completion and text; see README.md, "Data format"'),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "shot"},
                 {"role": "user", "content": "q2"}], "completion": [{"role": "assistant", "content": "a"}]},
     'rows.jsonl:1: an assistant turn in "prompt" would be learned here'),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]},
     "rows.jsonl:1: message 2: a tool result must follow an assistant turn with tool_calls"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f(1)"}]},
     'rows.jsonl:1: turn 2: a function_call value must be JSON {"name", "arguments"}'),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1"}}]}]},
     'rows.jsonl:1: message 2: each tool call needs a "name" and "arguments"'),
])
def test_bad_rows_are_one_line(tmp_path, row, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        read_records(path)
    assert str(caught.value).startswith(f"{tmp_path}/{message}")


def test_dataset_format_forces_one_format(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    with pytest.raises(UserError, match='rows.jsonl:1: a row holds either "messages" or "instruction", not both'):
        read_records(path, "alpaca")
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "The sky is blue."}\n')
    with pytest.raises(UserError, match='text.jsonl:1: field "instruction" is missing'):
        read_records(text, "alpaca")
    with pytest.raises(UserError, match="--dataset_format must be auto, alpaca, sharegpt, messages, "
                                        "prompt_completion, text; got 'chatml'"):
        read_records(path, "chatml")
    assert read_records(path, "messages") == read_records(path)


# ---------------------------------------------------------------------------------------------------- data stages

def test_data_stage_writes_every_format_in_the_canonical_form(tmp_path, monkeypatch, capsys):
    """my_dataset.json rows in every format reach the mix as records training reads back equal: alpaca single-turn
    rows byte for byte as before, the others as "messages" (with "tools") or "text"; the manifest counts them."""
    import runpy
    import sys

    from conftest import ROOT
    from qwen_sft.records import iter_json_rows

    rows = [row for path in ALL_FILES for _, row in iter_json_rows(path)]
    rows.append({"instruction": "q", "output": "a", "images": ["x.png"]})
    reports = tmp_path / "my_dataset.jsonl"
    reports.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    namespace = runpy.run_path(str(ROOT / "data_integration.py"))
    monkeypatch.setattr(sys, "argv", list(map(str, [
        "data_integration.py", "--my_report_data_path", reports, "--sources", f"orca={reports},pubmed={reports}",
        "--total_samples", len(rows), "--ratios", "reports=1,orca=0,pubmed=0", "--min_output_chars", 1,
        "--max_seq_length", 16384, "--output_file", tmp_path / "mix.jsonl",
    ])))
    namespace["main"]()
    assert f'{reports}: 1 rows: field "images" ignored (text-only model)' in capsys.readouterr().out
    written = (tmp_path / "mix.jsonl").read_text(encoding="utf-8").splitlines()
    mixed = read_records(tmp_path / "mix.jsonl")
    expected = [{**_cleaned(record), "source": "reports"} for record in read_records(reports)]
    key = lambda record: json.dumps(record, sort_keys=True, ensure_ascii=False)  # noqa: E731
    assert sorted(map(key, mixed)) == sorted(set(map(key, expected)))  # TRL's two sky rows are one row twice
    single = next(line for line in written if '"instruction":"hi"' in line)
    assert single == json.dumps({"instruction": "hi", "input": "", "output": rows[90]["output"],
                                 "source": "reports"}, ensure_ascii=False, separators=(",", ":"))
    assert sum('"tools":[{"type":"function"' in line for line in written) == sum("tools" in r for r in expected)
    manifest = json.loads((tmp_path / "mix.jsonl.manifest.json").read_text(encoding="utf-8"))["sources"]["reports"]
    assert manifest["rows_read"] == len(rows) and manifest["duplicates"] == len(expected) - len(mixed) == 2
    assert manifest["formats"] == {"alpaca": 61, "messages": 4, "prompt_completion": 2, "sharegpt": 60, "text": 1}
    assert manifest["ignored_fields"] == {"images": 1, "messages[].name": 1, "messages[].tool_call_id": 1}


def _cleaned(record: dict) -> dict:
    """A record as the data stage cleans it: the fields of a single-turn row and the turns of a plain conversation
    stripped; a conversation with tools or tool calls and a text row kept as they are."""
    if "instruction" in record:
        return {key: value.strip() for key, value in record.items()}
    if "text" in record or "tools" in record or any(turn["role"] == "tool" for turn in record["messages"]):
        return record
    return {"messages": [{**turn, "content": turn["content"].strip()} for turn in record["messages"]]}


def test_slimorca_route_keeps_tool_calls_and_tools_and_counts_every_cut(tmp_path, monkeypatch):
    """Through the SlimOrca route (a hub-schema source, not my_dataset.json), LLaMA-Factory's glaive chats keep their
    function_call and observation turns and their tools; a chat cut short is counted in the manifest."""
    import runpy
    import sys

    from conftest import ROOT

    glaive = json.loads((LLAMA_FACTORY / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
    broken = {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"},
                                {"from": "human", "value": "q3"}]}
    orca = tmp_path / "orca.jsonl"
    orca.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in [*glaive, broken]), encoding="utf-8")
    reports = tmp_path / "reports.jsonl"
    reports.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    namespace = runpy.run_path(str(ROOT / "data_integration.py"))
    monkeypatch.setattr(sys, "argv", list(map(str, [
        "data_integration.py", "--my_report_data_path", reports, "--sources", f"orca={orca},pubmed={reports}",
        "--total_samples", len(glaive) + 1, "--ratios", "reports=0,orca=1,pubmed=0", "--min_output_chars", 1,
        "--max_seq_length", 16384, "--output_file", tmp_path / "mix.jsonl",
    ])))
    namespace["main"]()
    mixed = read_records(tmp_path / "mix.jsonl")
    manifest = json.loads((tmp_path / "mix.jsonl.manifest.json").read_text(encoding="utf-8"))["sources"]["orca"]
    assert manifest["rows_read"] == len(glaive) + 1 and manifest["duplicates"] == 1  # two glaive chats fold to one
    assert manifest["kept"] == {"orca": len(glaive)} and manifest["rejected"] == manifest["filtered"] == {}
    with_calls = [row for row in mixed if "messages" in row and any("tool_calls" in t for t in row["messages"])]
    assert len(with_calls) == 15 and all("tools" in row for row in with_calls)
    as_read = {json.dumps(record["messages"], ensure_ascii=False)
               for record in read_records(LLAMA_FACTORY / "glaive_toolcall_en_demo.json")
               if any("tool_calls" in turn for turn in record["messages"])}
    assert {json.dumps(row["messages"], ensure_ascii=False) for row in with_calls} == as_read  # every turn kept
    assert manifest["kept_chats_cut"] == {"unanswered_question": 1}


# ------------------------------------------------------------------------------- training, evaluation, inference

@pytest.fixture(scope="module")
def trained_on(tmp_path_factory):
    """An adapter trained for 2 steps on each file (the tiny model), and the run's folder."""
    from conftest import run_script

    runs = {}
    for path in ALL_FILES:
        workdir = tmp_path_factory.mktemp(path.stem)
        result = run_script("Qwen_finetuning.py", "--preset", "tiny_cpu", "--dataset_path", path, "--max_steps", 2,
                            "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 1,
                            "--max_seq_length", 384, "--eval_ratio", 0.2, "--eval_steps", 2, "--save_steps", 2,
                            "--logging_steps", 1, "--neftune_noise_alpha", 0, cwd=workdir)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[path.name] = workdir
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("path", ALL_FILES, ids=lambda path: path.name)
def test_each_file_trains_with_its_formats_in_the_manifest(trained_on, path):
    manifest = json.loads((trained_on[path.name] / "Qwen_finetuning_model" / "manifest.json").read_text())
    report = IgnoredFields()
    records = read_records(path, report=report)
    assert manifest["dataset"]["rows"] == len(records)
    assert manifest["dataset"]["formats"] == report.report()["formats"]
    assert manifest["dataset"]["ignored_fields"] == report.report()["ignored_fields"]
    trained = manifest["rows"]["train"] + manifest["rows"]["eval"]
    dropped = manifest["rows"]["train_stats"]["dropped_last_exchange_too_long"] + manifest["rows"]["eval_stats"][
        "dropped_last_exchange_too_long"] + manifest["rows"]["train_stats"]["dropped_answer_too_long"] + manifest[
        "rows"]["eval_stats"]["dropped_answer_too_long"]
    assert trained + dropped == len(records) and trained > 0 and manifest["global_step"] == 2
    print(f"{path.name}: {len(records)} rows read, {trained} trained (train {manifest['rows']['train']}, eval "
          f"{manifest['rows']['eval']}), {dropped} too long at 384 tokens, ignored "
          f"{manifest['dataset']['ignored_fields']}")


@pytest.mark.slow
def test_tool_and_text_rows_evaluate_and_infer(trained_on, tmp_path):
    """Evaluation scores the TRL file's rows (the text row by its loss only), and inference answers an
    instruction-file row that offers tools, from the glaive-trained adapter."""
    from conftest import run_script

    adapter = trained_on["trl_formats.jsonl"] / "Qwen_finetuning_model"
    # split seed 0 leaves one prompt/completion row for training and the other six, the text row too, for evaluation
    result = run_script("evaluate.py", "--adapter_dir", adapter, "--eval_ratio", 0.9, "--split_seed", 0,
                        "--max_new_tokens", 4, "--compare_base", "false", "--output_dir", tmp_path / "eval",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    predictions = (tmp_path / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert metrics["teacher_forcing"]["rows"] == 6 and len(predictions) == 5  # the text row: a loss, no answer

    glaive = read_records(LLAMA_FACTORY / "glaive_toolcall_en_demo.json")
    row = next(record for record in glaive if "tools" in record)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": 1, "messages": row["messages"][:1], "tools": row["tools"]}) + "\n")
    result = run_script("inference.py", "--adapter_dir", trained_on["glaive_toolcall_en_demo.json"] /
                        "Qwen_finetuning_model", "--instruction_file", prompts, "--output_file", tmp_path / "a.jsonl",
                        "--max_new_tokens", 4, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    answered = json.loads((tmp_path / "a.jsonl").read_text(encoding="utf-8"))
    assert answered["id"] == 1 and answered["tools"] == row["tools"] and answered["tokens"] == 4


# ---------------------------------------------------------------------------------------------------- learning proof

TOOL_SYSTEM = "你是助手。"  # short: the template's tool list already makes the system turn long


@pytest.fixture(scope="module")
def tool_adapter(tmp_path_factory):
    """The tiny model trained on tests/fixtures/tool_calls_2.jsonl: the same question, an OpenAI `messages` row and a
    LLaMA-Factory sharegpt row, whose tool results (21, 9) differ and so do the answers. 120 full-batch steps of two
    rows: quicker than the 20-row and multi-turn proofs."""
    from conftest import LEARNING_FLAGS, run_script, without_flags

    workdir = tmp_path_factory.mktemp("tools")
    extra = ["--max_steps", "120", "--per_device_train_batch_size", "2", "--system_prompt", TOOL_SYSTEM,
             "--dataset_path", FIXTURES / "tool_calls_2.jsonl"]
    result = run_script("Qwen_finetuning.py", *without_flags(LEARNING_FLAGS, extra), *extra, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "Qwen_finetuning_model"


CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "北京"}}\n</tool_call>'


@pytest.mark.slow
def test_tool_call_learning_proof_in_chat(tool_adapter, monkeypatch, capsys, tmp_path):
    """chat.py with /tools FILE, greedy: the model writes the exact call (name and JSON arguments) and stops, the chat
    shows it, and the line typed next is the tool's result, which the model answers from (21 or 9 degrees, for the
    same question)."""
    import io
    import sys

    from qwen_sft.chat import ChatSession, chat_loop
    from qwen_sft.modeling import load_adapter_model

    model, tokenizer, _ = load_adapter_model(str(tool_adapter),
                                             base_model="tiny", backend="hf", load_in_4bit=False, max_seq_length=2048)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(read_records(FIXTURES / "tool_calls_2.jsonl")[0]["tools"]), encoding="utf-8")
    script = [f"/tools {tools}", "北京天气？", "21", "/reset", "北京天气？", "9", "/save " + str(tmp_path / "saved.jsonl")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    greedy = {"max_new_tokens": 40, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0,
              "no_repeat_ngram_size": 0}
    chat_loop(model, tokenizer, ChatSession(tokenizer, TOOL_SYSTEM, 1024, 40), greedy, show_prompt=False)
    out = capsys.readouterr().out
    assert "[tools offered from the next message on: weather]" in out
    assert out.count(f"助手> {CALL}\n[tool call: weather {{\"city\": \"北京\"}}; type the tool's result (its turn) as "
                     "the next line]") == 2
    assert "助手> 21度。\n" in out and "助手> 9度。\n" in out and "cut at max_new_tokens" not in out
    saved = read_records(tmp_path / "saved.jsonl")  # the call and the result are part of the saved exchange
    assert [turn["role"] for turn in saved[0]["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert saved[0]["messages"][3]["content"] == "9" and saved[0]["tools"][0]["function"]["name"] == "weather"


@pytest.mark.slow
def test_inference_offers_a_rows_tools(tool_adapter, tmp_path):
    from conftest import EXACT, run_script

    record = read_records(FIXTURES / "tool_calls_2.jsonl")[0]
    call, tools = record["messages"][:2], record["tools"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in [
        {"id": "call", "messages": call[:1], "tools": tools},
        {"id": "21", "messages": [*call, {"role": "tool", "content": "21"}], "tools": tools},
        {"id": "9", "messages": [*call, {"role": "tool", "content": "9"}], "tools": tools},
        {"id": "no tools", "messages": call[:1]},
    ]), encoding="utf-8")
    result = run_script("inference.py", "--adapter_dir", tool_adapter, "--instruction_file", prompts, "--output_file",
                        tmp_path / "answers.jsonl", "--system_prompt", TOOL_SYSTEM, *EXACT, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = {row["id"]: row for row in map(json.loads, (tmp_path / "answers.jsonl").read_text().splitlines())}
    assert answers["call"]["output"] == CALL and answers["21"]["output"] == "21度。" and answers["9"]["output"] == "9度。"
    assert answers["no tools"]["output"] != CALL  # the call was learned with the tools in the prompt
    assert all(answers[key]["stopped"] for key in ("call", "21", "9"))
