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
