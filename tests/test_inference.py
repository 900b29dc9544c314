"""inference.py on the tiny model: one streamed answer, a JSONL file answered in batches, and bad input."""

import json
import runpy
import shutil

import pytest

from conftest import EXACT, FIXTURES, ROOT, run_script
from qwen_sft.cli import parse_config
from qwen_sft.inference import run_inference
from qwen_sft.inherit import inherit_from_adapter
from qwen_sft.presets import with_preset
from qwen_sft.records import read_records

ROWS = read_records(FIXTURES / "learning_20.jsonl")


@pytest.fixture(scope="module")
def adapter(learned_adapter):
    return learned_adapter / "Qwen_finetuning_model"


def test_help_lists_every_setting():
    result = run_script("inference.py", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--adapter_dir", "--instruction", "--input", "--system_prompt", "--instruction_file",
                 "--output_file", "--batch_size", "--max_new_tokens", "--temperature", "--top_p",
                 "--repetition_penalty", "--no_repeat_ngram_size", "--backend"):
        assert f"\n  {flag} " in result.stdout
    assert "--instruction_file -" in result.stdout  # the stdin example


def test_one_prompt_with_input_is_answered_exactly(adapter, tmp_path, monkeypatch, capsys):
    """inference.py's single-prompt mode, run in this process through the script's own constants."""
    row = ROWS[1]  # Report 1: what was the power? + input "Q2 summary: power reached 87%."
    assert row["input"]
    monkeypatch.chdir(tmp_path)
    script = runpy.run_path(str(ROOT / "inference.py"))  # its constants; main() does not run
    argv = ["--adapter_dir", str(adapter), "--instruction", row["instruction"], "--input", row["input"], *EXACT]
    run_inference(parse_config(script, argv, quiet=True, resolve=with_preset("inference", then=inherit_from_adapter)))
    stdout = capsys.readouterr().out
    question, answer = stdout.split("[question]\n", 1)[1].split("\n\n[answer]\n", 1)
    assert question == f"{row['instruction']}\n\n补充信息：\n{row['input']}"
    assert answer == row["output"] + "\n"  # streamed whole, stopped at <|im_end|>, nothing after it
    assert not list(tmp_path.iterdir())  # nothing is written in this mode


def test_jsonl_from_stdin_is_answered_in_batches(adapter, tmp_path):
    prompts = [{"id": index, "instruction": row["instruction"], "input": row["input"]} for index, row in
               enumerate(ROWS)]
    prompts[3]["output"] = "a reference answer"
    output = tmp_path / "answers.jsonl"
    result = run_script("inference.py", "--adapter_dir", adapter, "--instruction_file", "-", "--output_file", output,
                        "--batch_size", "8", *EXACT, cwd=tmp_path,
                        input_text="".join(json.dumps(row, ensure_ascii=False) + "\n" for row in prompts))
    assert result.returncode == 0, result.stderr[-2000:]
    answered = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in answered] == list(range(20))  # input order, whatever the batching
    assert [row["output"] for row in answered] == [row["output"] for row in ROWS]
    assert all(row["stopped"] and 0 < row["tokens"] < 40 for row in answered)
    assert answered[3]["reference"] == "a reference answer" and "reference" not in answered[2]
    manifest = json.loads((tmp_path / "answers.jsonl.manifest.json").read_text(encoding="utf-8"))
    assert manifest["stage"] == "inference" and manifest["rows"] == 20 and manifest["cut_at_max_new_tokens"] == 0
    assert manifest["config"]["BATCH_SIZE"] == 8 and manifest["backend"] == "hf"
    assert "20 answers written" in result.stdout


def test_missing_adapter_bad_row_and_missing_base_are_one_line_exit_2(adapter, tmp_path):
    result = run_script("inference.py", "--adapter_dir", tmp_path / "nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: no LoRA adapter there; run Qwen_finetuning.py first (or pass --adapter_dir)"
    ]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "fine"}\n{"input": "no instruction"}\n', encoding="utf-8")
    result = run_script("inference.py", "--adapter_dir", adapter, "--instruction_file", prompts, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'error: {prompts}:2: field "instruction" is missing; each row needs a non-empty "instruction" string '
        'and, optionally, an "input" string (or a "messages" list)'
    ]

    moved_base = tmp_path / "moved_base"
    shutil.copytree(adapter, moved_base)
    manifest_file = moved_base / "manifest.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    manifest["base_model"] = str(tmp_path / "models" / "gone")
    manifest_file.write_text(json.dumps(manifest), encoding="utf-8")
    result = run_script("inference.py", "--adapter_dir", moved_base, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {moved_base}: its base model {tmp_path / 'models' / 'gone'} is not there; put that folder back "
        f"(or set base_model in {manifest_file}), or re-run Qwen_finetuning.py"
    ]
    assert not (tmp_path / "inference_results.jsonl").exists()
