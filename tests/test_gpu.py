"""The GPU path, small: train the tiny model on the GPU backend (Unsloth when installed), then evaluate and
answer from the saved adapter. Skipped without CUDA; the full-size run is bench/run_h200.sh."""

import importlib.util
import json

import pytest

from conftest import FIXTURES, run_script

pytestmark = pytest.mark.gpu
BACKEND = "unsloth" if importlib.util.find_spec("unsloth") else "hf"


def test_train_evaluate_infer_on_gpu(tmp_path):
    dataset = FIXTURES / "learning_20.jsonl"
    trained = run_script("Qwen_finetuning.py", "--preset", "tiny", "--backend", BACKEND, "--dataset_path", dataset,
                         cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    manifest = json.loads((tmp_path / "Qwen_finetuning_model" / "manifest.json").read_text())
    assert manifest["backend"] == BACKEND and manifest["global_step"] == 30
    assert manifest["throughput"]["peak_gpu_memory_gib"] > 0

    evaluated = run_script("evaluate.py", "--preset", "tiny", "--dataset_path", dataset, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "evaluation_results" / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0 and "base" in metrics and "delta" in metrics

    answered = run_script("inference.py", "--max_new_tokens", "16", "--temperature", "0", cwd=tmp_path)
    assert answered.returncode == 0, answered.stderr[-3000:]
