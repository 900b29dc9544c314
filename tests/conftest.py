"""Shared test setup: offline hub, a private tiny-model cache, and one trained tiny adapter for the later stages."""

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The data stages' test sources, in the hub datasets' schemas
HUB = FIXTURES / "hub"
ORCA, PUBMED, REPORTS = HUB / "slimorca.jsonl", HUB / "pubmedqa_pqa_labeled.jsonl", HUB / "reports.json"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("QWEN_SFT_CACHE", str(ROOT / ".pytest_cache" / "qwen_sft"))
# Under pytest-xdist (`make test`: 2 workers on 2 cores, a file's tests on one worker), torch in each worker and in
# the stages it starts runs one thread: two workers of two threads each spin-wait for each other's cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
# The stages the tests start keep freed memory instead of giving it back: a training step's logits over the real
# vocabulary are GBs that glibc would otherwise map and unmap every step (a quarter of a tiny run's CPU time in
# page faults).
os.environ.setdefault("MALLOC_MMAP_MAX_", "0")
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 40))

# Generated cases are derandomized: the same cases on every run, so a generated test can never flake in CI.
settings.register_profile(
    "suite", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("suite")

# The settings that make the tiny model learn 20 rows exactly (README, "Tests": the learning proofs).
LEARNING_FLAGS = [
    "--preset", "tiny_cpu", "--max_steps", "300",
    "--per_device_train_batch_size", "20", "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3",
    "--warmup_steps", "0", "--weight_decay", "0", "--neftune_noise_alpha", "0",
    "--eval_ratio", "0", "--logging_steps", "50", "--save_steps", "1000",
]
# Greedy without penalties, so that the trained tiny model repeats its training answers exactly.
EXACT = ["--preset", "greedy", "--max_new_tokens", "40"]


def without_flags(flags: list[str], extra) -> list[str]:
    """`flags` less the flags (with their values) that `extra` gives again: a flag may be given only once."""
    given = set(extra[::2])
    return [item for flag, value in zip(flags[::2], flags[1::2]) if flag not in given for item in (flag, value)]


def one_line_error(result, *fragments, after_progress: bool = False) -> str:
    """The single `error:` line of a stage that refused its input: exit code 2, no traceback, each fragment in it.
    `after_progress`: a model's build or load may print progress bars before it."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    if after_progress:
        lines = [line for line in lines if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def run_script(script: str, *args, cwd=None, input_text=None, timeout=600, env=None):
    """Run a stage script as a user would; returns the CompletedProcess (text mode)."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd or ROOT,
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def tmpfs(tmp_path):
    """`tmpfs(size)` mounts a tmpfs of `size` (e.g. "4m") in tmp_path and returns it: a disk that fills up.
    Mounting needs root, as CI runs; the test is skipped where it is not allowed."""
    mounts = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode:
            pytest.skip("mounting a tmpfs is not allowed here")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture(scope="session", autouse=True)
def tiny_model_built():
    """The tiny model built before the first test, not by whichever stage a test runs first (which would then print
    the build's progress bars under its one-line error, as a fresh clone's first export did)."""
    from qwen_sft.tiny import tiny_path

    tiny_path()


@pytest.fixture(scope="session")
def learned_adapter(tmp_path_factory):
    """The tiny model trained on tests/fixtures/learning_20.jsonl until it reproduces every answer.

    Returns the folder that holds `Qwen_finetuning_model/` (and the rest of the run's outputs). Under pytest-xdist
    the workers share it: the first to need it trains it, in their common folder, while the other waits.
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this session's folder, above each worker's own
    workdir = shared / "learned"
    with open(shared / "learned.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (workdir / "Qwen_finetuning_model" / "manifest.json").is_file():
            workdir.mkdir(exist_ok=True)
            result = run_script(
                "Qwen_finetuning.py", *LEARNING_FLAGS, "--dataset_path", FIXTURES / "learning_20.jsonl", cwd=workdir
            )
            assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    """The tests write through links and run as root on CI: a suite that left the machine's /dev/null a regular file
    (as a defect in the output rule could) fails, however its tests ended."""
    import stat

    if not stat.S_ISCHR(os.stat(os.devnull).st_mode):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\n{os.devnull} is no longer a character device: a test replaced it", file=sys.stderr)
