"""Data-parallel training under torchrun and accelerate launch, on CPU with the gloo backend."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT, without_flags

FLAGS = [
    "--base_model", "tiny", "--load_in_4bit", "false", "--dataset_path", str(FIXTURES / "learning_20.jsonl"),
    "--max_steps", "4", "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "2",
    "--gradient_accumulation_steps", "2", "--optim", "adamw_torch",
]
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


def launch(launcher: str, workdir: Path, *extra):
    result = subprocess.run(
        [*LAUNCHERS[launcher], str(ROOT / "Qwen_finetuning.py"), *without_flags(FLAGS, extra), *extra],
        cwd=workdir, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_train_one_adapter(tmp_path, launcher):
    result = launch(launcher, tmp_path)
    assert result.stdout.count("effective batch size: 2 per device x 2 accumulation x 2 processes = 8") == 1
    assert result.stdout.count("config:") == 1  # only the main process prints
    manifest = json.loads((tmp_path / "Qwen_finetuning_model" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["effective_batch_size"] == 8
    per_process = manifest["tokens"]["real_tokens_per_process"]
    assert len(per_process) == 2 and all(tokens > 0 for tokens in per_process)  # both ranks trained
    assert manifest["tokens"]["batches"] >= 2 * 4 * 2  # 2 processes x 4 steps x 2 micro-batches
    assert manifest["final_eval_loss"] > 0
    # Written once, by the main process: no second adapter, no leftovers of a competing write.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Qwen_finetuning_model", "Qwen_finetuning_tokenizer",
                                                         "outputs"]
    event_files = list((tmp_path / "outputs" / "runs").rglob("events.out.tfevents.*"))
    assert event_files and len({name.name.split(".")[-2] for name in event_files}) == 1  # one writer process

    if launcher == "torchrun":  # resume under the launcher: continue the finished run for two more steps
        resumed = launch(launcher, tmp_path, "--max_steps", "6", "--resume_from_checkpoint", "auto")
        assert "resuming from outputs/checkpoint-4" in resumed.stdout
        assert json.loads((tmp_path / "Qwen_finetuning_model" / "manifest.json").read_text())["global_step"] == 6
