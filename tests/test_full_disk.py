"""A disk that fills up in training (a checkpoint) or export (the merged weights): one line, exit code 2, and no
half checkpoint or half folder left behind. The disk is a 4 MB tmpfs (needs root, as CI runs; skipped elsewhere):
the tiny model's tokenizer.json alone is 11 MB."""

import re

import pytest

from conftest import FIXTURES, run_script

QUICK_TRAINING = ["--preset", "tiny_cpu", "--max_steps", 2, "--eval_ratio", 0, "--per_device_train_batch_size", 2,
                  "--gradient_accumulation_steps", 1, "--logging_steps", 1, "--dataset_path",
                  FIXTURES / "learning_20.jsonl"]


@pytest.fixture
def full_soon(tmpfs):
    return tmpfs("4m")


def error_line(result) -> str:
    """The one error line (model loads print progress bars on stderr before it), after checking there is one."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line.strip() for line in re.split(r"[\r\n]", result.stderr) if line.strip()]  # a bar redraws with \r
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_a_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_half_checkpoint(tmp_path, full_soon):
    result = run_script("Qwen_finetuning.py", *QUICK_TRAINING, "--save_steps", 1, "--output_dir", full_soon / "outputs",
                        cwd=tmp_path)
    line = error_line(result)
    assert line.startswith(f"error: {full_soon / 'outputs'}: cannot write the checkpoint of step 1 (the disk is "
                           "full); no checkpoint is saved yet; free some space"), line
    assert not list((full_soon / "outputs").glob("checkpoint-*"))
    assert not (tmp_path / "Qwen_finetuning_model").exists()


@pytest.mark.slow
def test_a_disk_full_during_export_is_one_line_and_leaves_nothing(tmp_path, full_soon):
    trained = run_script("Qwen_finetuning.py", *QUICK_TRAINING, "--save_steps", 1000, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = run_script("export_model.py", "--adapter_dir", tmp_path / "Qwen_finetuning_model", "--output_dir",
                        full_soon / "merged", cwd=tmp_path)
    line = error_line(result)
    assert line == (f"error: {full_soon / 'merged'}: cannot write (the disk is full); the previous output, if any, "
                    "is unchanged"), line
    assert list(full_soon.iterdir()) == []
