"""Batch shapes: length-grouped batches cut padding, the start-up hint names waste, packing's line."""

import json
import random

import pytest

from conftest import run_script
from qwen_sft.batching import padding_share
from qwen_sft.cli import Config


def realistic_lengths(rows=1350, seed=0):
    """Row lengths shaped like the data stage's mix: median ~545 tokens, a long tail cut at 2,048."""
    rng = random.Random(seed)
    return [min(2048, max(40, round(rng.lognormvariate(6.3, 0.7)))) for _ in range(rows)]


def test_length_grouped_batches_cut_the_seed_defaults_padding_below_5_percent():
    lengths = realistic_lengths()
    assert padding_share(lengths, 2, 0, seed=3407) > 0.2  # random pairs: about a quarter padding, as measured
    assert padding_share(lengths, 2, 2 * 4, seed=3407) <= 0.05


@pytest.mark.slow
def test_stage_hints_at_padding_and_groups_rows_by_length(tmp_path):
    rng = random.Random(1)
    lengths = [min(200, max(1, int(rng.lognormvariate(3.0, 1.0)))) for _ in range(400)]
    rows = [{"instruction": f"question {i}", "input": "", "output": " ".join(["yes"] * length)}
            for i, length in enumerate(lengths)]  # enough rows for transformers to sort them in groups of 96
    dataset = tmp_path / "varied.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    shares = {}
    for grouped in ("false", "true"):
        workdir = tmp_path / grouped
        workdir.mkdir()
        result = run_script("Qwen_finetuning.py", "--preset", "tiny_cpu", "--dataset_path", dataset,
                            "--max_steps", "3", "--eval_ratio", "0", "--save_steps", "100",
                            "--group_by_length", grouped, "--system_prompt", "S", cwd=workdir)
        assert result.returncode == 0, result.stderr[-3000:]
        padding_lines = [line for line in result.stdout.splitlines() if line.startswith("padding: about")]
        assert len(padding_lines) == 1
        assert ("hint: --group_by_length true" in padding_lines[0]) == (grouped == "false"), padding_lines
        manifest = json.loads((workdir / "Qwen_finetuning_model" / "manifest.json").read_text())
        shares[grouped] = manifest["tokens"]["real_token_share"]
    assert shares["false"] < 0.8 and shares["true"] > 0.9, shares  # 3 steps from the long end of the sort


def test_packing_line_says_examples_per_step_and_steps_per_epoch(capsys):
    from qwen_sft.batching import report_packing

    cfg = Config(PER_DEVICE_TRAIN_BATCH_SIZE=4, GRADIENT_ACCUMULATION_STEPS=2, MAX_SEQ_LENGTH=2048)
    report_packing(cfg, examples=1350, packed_rows=400, world_size=2)
    assert capsys.readouterr().out.strip() == (
        "packing: 1350 examples in 400 rows of up to 2048 tokens (3.4 per row): about 54 examples per optimizer "
        "step, 25 steps per epoch (unpacked: 16 and 85)")
