"""Record reading/validation and atomic writes."""

import json

import pytest

from qwen_sft.artifacts import atomic_directory, atomic_file, manifest_path_for
from qwen_sft.cli import UserError
from qwen_sft.records import read_records


def test_reads_jsonl_and_json_array(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b", "source": "reports"}, {"instruction": "c", "output": "d"}]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    expected = [{"instruction": "a", "input": "", "output": "b", "source": "reports"},
                {"instruction": "c", "input": "", "output": "d"}]
    assert read_records(jsonl) == expected
    assert read_records(array) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": }\n', "rows.jsonl:2: malformed JSON"),
        ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n', 'rows.jsonl:3: field "output" is missing'),
        ('{"instruction": "", "output": "b"}\n', 'rows.jsonl:1: field "instruction" must be a non-empty string'),
        ('{"instruction": "a", "input": 3, "output": "b"}\n', 'rows.jsonl:1: field "input" must be a string'),
        ('["a"]', "rows.jsonl:1: expected a JSON object"),
        ('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a", "output": 5}\n]', "rows.jsonl:3: field"),
        ('[\n {"instruction": "a", "output": "b"}\n {"instruction": "a"}]', "rows.jsonl:3: malformed JSON array"),
        ("", "rows.jsonl: holds no rows"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        read_records(path)
    assert message in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="missing.jsonl: file not found"):
        read_records(tmp_path / "missing.jsonl")


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as handle:
            handle.write("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_file(target) as handle:
        handle.write("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


def test_atomic_directory_keeps_old_until_complete(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as folder:
        (folder / "a.txt").write_text("v1")
        (folder / "manifest.json").write_text('{"stage": "test"}')
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as folder:
            (folder / "a.txt").write_text("v2")
            (folder / "manifest.json").write_text('{"stage": "test"}')
            raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "v1"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]
    assert manifest_path_for(tmp_path / "mix.jsonl").name == "mix.jsonl.manifest.json"  # not shared with mix.json


# ------------------------------------------------------------------------ every row a stage writes reads back equal

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qwen_sft.mix.reading import numbered_files_rows, numbered_jsonl_spans, read_span  # noqa: E402
from qwen_sft.mix.rows import mix_line, parse_json_line  # noqa: E402
from qwen_sft.records import iter_json_rows, json_line  # noqa: E402

SEPARATORS = "\u2028\u2029\u0085\r\n\x0b\x0c\x1c\x1d\x1e\"\\"
# Any Unicode scalar (a lone surrogate is no text: readers refuse it), weighted towards the characters that
# splitlines() and JSON escaping treat specially, and characters beyond the BMP (written raw, or as a surrogate pair
# when escaped).
texts = st.text(st.one_of(st.sampled_from(SEPARATORS), st.characters(codec="utf-8"),
                          st.characters(min_codepoint=0x10000)), max_size=12)
huge_numbers = st.integers(min_value=-(10**4000), max_value=10**4000) | st.floats(allow_nan=False)
json_values = st.recursive(st.none() | st.booleans() | huge_numbers | texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=12)


def _read_back(path):
    """The rows of `path` as each reader sees them: records.iter_json_rows (training, evaluation, inference, data
    stages), the local-source reader (the report file), and the mixer's JSONL spans parsed in its workers."""
    by_records = [row for _, row in iter_json_rows(path)]
    by_source = [row for _, row, _ in numbered_files_rows([path])]
    with open(path, "rb") as handle:
        by_mixer = [parse_json_line(read_span(handle, span)) for _, _, span in numbered_jsonl_spans(path)]
    return by_records, by_source, by_mixer


@given(rows=st.lists(st.tuples(texts, texts, texts, texts), min_size=1, max_size=4),
       conversation=st.lists(texts, min_size=2, max_size=4))
def test_mixer_lines_read_back_equal(tmp_path_factory, rows, conversation):
    path = tmp_path_factory.mktemp("mix") / "mix.jsonl"
    turns = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(conversation)]
    lines = [mix_line({"instruction": i, "input": e, "output": o}, s) for i, e, o, s in rows]
    lines.append(mix_line({"messages": turns}, "reports"))
    path.write_bytes(b"".join(lines))
    expected = [{"instruction": i, "input": e, "output": o, "source": s} for i, e, o, s in rows]
    expected.append({"messages": turns, "source": "reports"})
    assert _read_back(path) == (expected, expected, expected)


@given(rows=st.lists(st.dictionaries(texts, json_values, min_size=1, max_size=4), min_size=1, max_size=3))
def test_inference_and_evaluation_lines_read_back_equal(tmp_path_factory, rows):
    """inference.py's answers and evaluate.py's predictions are written by records.json_line, with the fields of
    the rows they read (any JSON values, so also numbers of thousands of digits)."""
    path = tmp_path_factory.mktemp("out") / "answers.jsonl"
    path.write_text("".join(json_line(row) for row in rows), encoding="utf-8")
    by_records, by_source, by_mixer = _read_back(path)
    assert by_records == rows and by_source == rows
    # The mixer's orjson reads an integer beyond 64 bits as a float (only ever in a field it does not use).
    small = [row for row in rows if "e+" not in json.dumps(by_mixer[rows.index(row)])]
    assert [by_mixer[rows.index(row)] for row in small] == small


def test_a_line_separator_inside_a_string_does_not_split_the_row(tmp_path):
    path = tmp_path / "mix.jsonl"
    row = {"instruction": "a\u2028b\u2029c\u0085d", "input": "", "output": "e\rf"}
    path.write_text(json_line(row) + json_line(row), encoding="utf-8")
    assert read_records(path) == [row, row]


@pytest.mark.parametrize("text, problem", [
    ('{"instruction": "a\\ud800", "output": "b"}',
     'a lone surrogate escape (such as "\\ud800") in a string: not Unicode text'),
    ('{"instruction": "a", "output": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "JSON nested too deeply to read"),
    ('{"instruction": "a", "output": "b", "n": ' + "9" * 5000 + "}", "a number with more than 4,300 digits"),
])
@pytest.mark.parametrize("array", [False, True])
def test_unreadable_values_name_file_and_row(tmp_path, text, problem, array):
    path = tmp_path / "rows.json"
    good = '{"instruction": "q", "output": "a"}'
    path.write_text(f"[{good},\n{text}]" if array else f"{good}\n{text}\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        read_records(path)
    assert str(caught.value) == f"{path}:2: {problem}"


def test_a_paired_surrogate_escape_is_read_as_its_character(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"instruction": "\\ud83d\\ude00", "output": "b"}\n', encoding="utf-8")
    assert read_records(path)[0]["instruction"] == "\U0001F600"


@pytest.mark.parametrize("line, problem", [
    (b'{"conversations": "\\udc00"}', "a lone surrogate escape"),
    (b'{"conversations": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested too deeply to read"),
    (b'{"conversations": ' + b"9" * 5000 + b"}", "a number with more than 4,300 digits"),
])
def test_the_mixer_counts_an_unreadable_line_as_malformed(line, problem):
    from qwen_sft.mix.rows import MALFORMED, convert_source_row
    from qwen_sft.mix.schemas import SlimOrcaSchema

    converted = convert_source_row(SlimOrcaSchema(), None, line)
    assert converted.kind == MALFORMED and converted.content is None and converted.reason.startswith(problem)
