"""Training checks the mix it trains on: a MAX_SEQ_LENGTH or SYSTEM_PROMPT other than the one the mix was filtered
and measured with prints one warning line under the config, as the later stages' overrides of the adapter's values
do; a file without a manifest is the user's own and is not checked; a mix manifest that cannot be read is a warning."""

import json
import runpy
import shutil
import sys

import pytest

import qwen_sft.training
from conftest import HUB, ROOT, run_script
from qwen_sft.template import DEFAULT_SYSTEM_PROMPT

MIX_LENGTH = 1024


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """A real mix, filtered for 1,024 tokens with the default system prompt."""
    folder = tmp_path_factory.mktemp("mix")
    result = run_script("data_integration.py", "--my_report_data_path", HUB / "reports.json", "--sources",
                        f"orca={HUB / 'slimorca.jsonl'},pubmed={HUB / 'pubmedqa_pqa_labeled.jsonl'}",
                        "--ratios", "reports=0,orca=1,pubmed=0", "--total_samples", 10,
                        "--max_seq_length", MIX_LENGTH, "--output_file", folder / "mix.jsonl", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "mix.jsonl"


def training_lines(dataset, monkeypatch, capsys, *flags) -> list[str]:
    """The warning lines Qwen_finetuning.py prints under its config (it stops before training)."""
    monkeypatch.setattr(qwen_sft.training, "train", lambda cfg, script_name: None)
    monkeypatch.setattr(sys, "argv", ["Qwen_finetuning.py", "--preset", "tiny_cpu", "--dataset_path", str(dataset),
                                      *map(str, flags)])
    runpy.run_path(str(ROOT / "Qwen_finetuning.py"))["main"]()
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]


def test_a_longer_sequence_length_than_the_mix_was_filtered_for_warns(mix, monkeypatch, capsys):
    assert training_lines(mix, monkeypatch, capsys) == [  # training's default, 2048
        f"warning: --max_seq_length 2048 differs from the 1024 the mix {mix} was filtered for (MAX_SEQ_LENGTH in its "
        "manifest); rebuild the mix with the same --max_seq_length, or give training the mix's"]


def test_another_system_prompt_than_the_mix_was_measured_with_warns(mix, monkeypatch, capsys):
    lines = training_lines(mix, monkeypatch, capsys, "--max_seq_length", MIX_LENGTH, "--system_prompt", "Be brief.")
    assert lines == [f"warning: --system_prompt 'Be brief.' differs from the '{DEFAULT_SYSTEM_PROMPT[:40]}…' the mix "
                     f"{mix} was measured with (SYSTEM_PROMPT in its manifest); rebuild the mix with the same "
                     "--system_prompt, or give training the mix's"]


def test_the_mixs_own_settings_are_silent(mix, monkeypatch, capsys):
    assert training_lines(mix, monkeypatch, capsys, "--max_seq_length", MIX_LENGTH) == []


def test_a_file_without_a_manifest_is_not_checked(mix, tmp_path, monkeypatch, capsys):
    own = tmp_path / "mine.jsonl"
    shutil.copy(mix, own)
    assert training_lines(own, monkeypatch, capsys) == []


@pytest.mark.parametrize("manifest", ["{not json", json.dumps({"stage": "data_integration", "config": 5}),
                                      json.dumps({"stage": "data_integration", "config": {"MAX_SEQ_LENGTH": "long"}})])
def test_a_mix_manifest_that_cannot_be_read_is_one_warning(manifest, mix, tmp_path, monkeypatch, capsys):
    copied = tmp_path / "mix.jsonl"
    shutil.copy(mix, copied)
    (tmp_path / "mix.jsonl.manifest.json").write_text(manifest, encoding="utf-8")
    lines = training_lines(copied, monkeypatch, capsys)
    assert len(lines) == 1 and lines[0].startswith(f"warning: {tmp_path / 'mix.jsonl.manifest.json'}: cannot be read "
                                                   "as the mix's manifest ("), lines
    assert lines[0].endswith(f"so training's MAX_SEQ_LENGTH and SYSTEM_PROMPT are not checked against {copied}; "
                             "rebuild the mix to restore it")


def test_another_stages_manifest_is_not_a_mix(mix, tmp_path, monkeypatch, capsys):
    """inference.py's answers, trained on: its manifest records no mix settings."""
    answers = tmp_path / "answers.jsonl"
    shutil.copy(mix, answers)
    manifest = json.loads(mix.with_name("mix.jsonl.manifest.json").read_text(encoding="utf-8"))
    manifest["stage"], manifest["output"]["path"] = "inference", str(answers)
    (tmp_path / "answers.jsonl.manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert training_lines(answers, monkeypatch, capsys) == []
