"""Training under faults: exact resumes on the default 4-bit path, corrupt checkpoints, locks, step counts, kills.

The runs use the default 4-bit path (NF4 base, adamw_8bit, NEFTune, gradient checkpointing, evaluations during
training, best model at the end) on the tiny model, kept short: 6 steps of 2 rows of at most 128 tokens.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import FIXTURES, ROOT, run_script
from qwen_sft.cli import Config, UserError
from qwen_sft.locking import lock_path
from qwen_sft.training import find_resume_checkpoint, train

pytestmark = pytest.mark.slow

SHORT_4BIT = {"BASE_MODEL": "tiny", "DATASET_PATH": str(FIXTURES / "learning_20.jsonl"), "MAX_STEPS": 6,
              "SAVE_STEPS": 4, "SAVE_TOTAL_LIMIT": 10, "PER_DEVICE_TRAIN_BATCH_SIZE": 2,
              "GRADIENT_ACCUMULATION_STEPS": 1, "MAX_SEQ_LENGTH": 128, "EVAL_RATIO": 0.1, "EVAL_STEPS": 2,
              "LOGGING_STEPS": 1}
SHORT_4BIT_FLAGS = [arg for name, value in SHORT_4BIT.items() for arg in (f"--{name.lower()}", str(value))]


def config(workdir: Path, **overrides) -> Config:
    import Qwen_finetuning as stage

    values = {name: getattr(stage, name) for name in dir(stage) if name.isupper()}
    values.update(SHORT_4BIT, OUTPUT_DIR=str(workdir / "outputs"), ADAPTER_DIR=str(workdir / "adapter"),
                  TOKENIZER_DIR=str(workdir / "tokenizer"), **overrides)
    assert values["LOAD_IN_4BIT"] and values["OPTIM"] == "adamw_8bit"  # the default path is the one under test
    return Config(values)


def assert_same_adapter(first: Path, second: Path, tolerance=1e-5):
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[name].float() - b[name].float()).abs().max().item() for name in a)
    assert worst <= tolerance, f"adapters differ by up to {worst:.2e}"


def dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run; it starts over a stale lock of a dead run, which it must take over."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    lock_path(workdir / "outputs").write_text(json.dumps({"pid": dead_pid(), "host": "gone", "started": "x"}))
    seen = {}

    class RecordLock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.setdefault("lock", json.loads(lock_path(workdir / "outputs").read_text()))

    with contextlib.redirect_stdout(io.StringIO()) as out:
        train(config(workdir), "Qwen_finetuning.py", callbacks=[RecordLock()])
    return workdir, seen["lock"], out.getvalue()


def test_a_stale_lock_is_taken_over_and_the_lock_names_its_owner(uninterrupted):
    workdir, lock, out = uninterrupted
    assert f"taking over the lock {lock_path(workdir / 'outputs')} left by a run that is gone (PID" in out
    assert lock["pid"] == os.getpid() and lock["host"] and lock["started"]
    manifest = json.loads((workdir / "adapter" / "manifest.json").read_text())
    assert manifest["global_step"] == 6 and manifest["best_checkpoint"].endswith("checkpoint-6")  # final weights
    assert not lock_path(workdir / "outputs").exists() and not lock_path(workdir / "adapter").exists()


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    hold = (f"import time\nfrom qwen_sft.locking import folder_lock\n"
            f"with folder_lock({str(tmp_path / 'adapter')!r}, '--adapter_dir'):\n"
            "    print('held', flush=True)\n    time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as refused:
            train(config(tmp_path), "Qwen_finetuning.py")
    finally:
        holder.kill()
        holder.wait()
    message = str(refused.value)
    assert f"--adapter_dir {tmp_path / 'adapter'} is in use by another run (PID {holder.pid}" in message
    assert "\n" not in message
    assert not (tmp_path / "outputs").exists()  # refused before anything was written
    assert not lock_path(tmp_path / "outputs").exists()  # the lock it took first is given back


class SigtermAtStep(TrainerCallback):
    """Sends this process SIGTERM(s) as step `step` starts, as `kill PID` would."""

    def __init__(self, step: int, signals: int = 1):
        self.step, self.signals = step, signals

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            for _ in range(self.signals):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # the handler runs between the two, as with two separate `kill`s


def test_4bit_resume_from_a_sigterm_checkpoint_is_exact(uninterrupted, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        train(config(tmp_path), "Qwen_finetuning.py", callbacks=[SigtermAtStep(3)])
    assert stopped.value.code == 130
    assert sorted(p.name for p in (tmp_path / "outputs").glob("checkpoint-*")) == ["checkpoint-3"]  # off schedule
    assert not (tmp_path / "adapter").exists()
    train(config(tmp_path, RESUME_FROM_CHECKPOINT="auto"), "Qwen_finetuning.py")
    assert "resuming from " + str(tmp_path / "outputs" / "checkpoint-3") in capsys.readouterr().out
    assert_same_adapter(uninterrupted[0] / "adapter", tmp_path / "adapter")


def test_4bit_resume_from_a_scheduled_checkpoint_skips_a_corrupt_one_and_is_exact(uninterrupted, tmp_path, capsys):
    shutil.copytree(uninterrupted[0] / "outputs", tmp_path / "outputs")
    shutil.rmtree(tmp_path / "outputs" / "runs")
    optimizer = tmp_path / "outputs" / "checkpoint-6" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])  # cut short, as a full disk leaves it
    train(config(tmp_path, RESUME_FROM_CHECKPOINT="auto"), "Qwen_finetuning.py")
    out = capsys.readouterr().out
    checkpoints = tmp_path / "outputs"
    assert f"skipping {checkpoints / 'checkpoint-6'}: incomplete or corrupt checkpoint (optimizer.pt: it is " \
           "truncated" in out
    assert f"resuming from {checkpoints / 'checkpoint-4'}" in out
    assert_same_adapter(uninterrupted[0] / "adapter", tmp_path / "adapter")


def corrupt_optimizer(folder):
    data = bytearray((folder / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor
    (folder / "optimizer.pt").write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:-8]),
     "adapter_model.safetensors: its size does not match its header"),
    (lambda f: (f / "trainer_state.json").write_text("{}"), "trainer_state.json: it has no global_step"),
    (lambda f: (f / "scheduler.pt").write_bytes((f / "scheduler.pt").read_bytes()[:50]),
     "scheduler.pt: it is truncated"),
    (corrupt_optimizer, "optimizer.pt: its member"),
])
def test_auto_falls_back_past_a_corrupt_checkpoint_naming_it(uninterrupted, tmp_path, capsys, damage, reason):
    for step in (4, 6):
        shutil.copytree(uninterrupted[0] / "outputs" / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    damage(tmp_path / "checkpoint-6")
    assert find_resume_checkpoint("auto", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    skipped = f"skipping {tmp_path / 'checkpoint-6'}: incomplete or corrupt checkpoint ({reason}"
    assert skipped in capsys.readouterr().out
    with pytest.raises(UserError, match=f"checkpoint-6: not a usable checkpoint \\({reason}"):
        find_resume_checkpoint(str(tmp_path / "checkpoint-6"), str(tmp_path))


def test_a_second_sigterm_stops_at_once_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:  # SystemExit, not the KeyboardInterrupt behind a traceback
        train(config(tmp_path), "Qwen_finetuning.py", callbacks=[SigtermAtStep(6, signals=2)])
    assert stopped.value.code == 130
    out = capsys.readouterr().out
    assert f"stopped at once by a second SIGTERM at step 5, without saving; resume from " \
           f"{tmp_path / 'outputs' / 'checkpoint-4'} with --resume_from_checkpoint auto\n" in out
    assert not (tmp_path / "adapter").exists() and not lock_path(tmp_path / "outputs").exists()


def test_resuming_a_finished_run_trains_no_further(uninterrupted, capsys):
    workdir = uninterrupted[0]
    before = (workdir / "adapter" / "manifest.json").read_bytes()
    train(config(workdir, RESUME_FROM_CHECKPOINT="auto"), "Qwen_finetuning.py")
    assert "the run is complete: " + str(workdir / "outputs" / "checkpoint-6") + " is step 6 of 6" \
           in capsys.readouterr().out
    assert not (workdir / "outputs" / "checkpoint-7").exists()
    assert (workdir / "adapter" / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("steps", [0, -2])
def test_max_steps_must_be_positive_or_minus_one(tmp_path, steps):
    with pytest.raises(UserError, match=f"--max_steps must be 1 or more optimizer steps, or -1 to train "
                                        f"--num_train_epochs epochs; got {steps}"):
        train(config(tmp_path, MAX_STEPS=steps), "Qwen_finetuning.py")
    assert list(tmp_path.iterdir()) == []


# Kills of the real stage script, in its own session so that any process it leaves behind can be found.

def start_stage(workdir: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "Qwen_finetuning.py"), *SHORT_4BIT_FLAGS, *extra], cwd=workdir,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def wait_for(process: subprocess.Popen, ready, timeout=240):
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def assert_nothing_left_running(process: subprocess.Popen):
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)


def test_kills_at_load_mid_run_and_at_the_adapter_write_leave_no_half_adapter_and_reruns_finish(tmp_path):
    adapter = tmp_path / "Qwen_finetuning_model"
    process = start_stage(tmp_path)  # SIGKILL while loading the model: only the lock, with its owner, is there
    lock = lock_path(tmp_path / "outputs")
    wait_for(process, lambda: lock.exists() and lock.stat().st_size > 0)
    process.kill()
    process.wait()
    assert_nothing_left_running(process)
    assert not adapter.exists()

    process = start_stage(tmp_path)  # rerun; SIGTERM after the first checkpoint
    wait_for(process, lambda: (tmp_path / "outputs" / "checkpoint-4" / "trainer_state.json").is_file())
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "taking over the lock" in out
    assert "Resume with: python Qwen_finetuning.py --resume_from_checkpoint auto" in out
    assert_nothing_left_running(process)
    assert not adapter.exists() and not lock_path(tmp_path / "outputs").exists()

    process = start_stage(tmp_path, "--resume_from_checkpoint", "auto")  # SIGKILL while the adapter is written
    def writing_adapter():  # a hidden sibling other than the lock: the adapter's temporary folder
        return any(not path.name.endswith(".lock") for path in tmp_path.glob(".Qwen_finetuning_model.*"))

    wait_for(process, writing_adapter)
    process.kill()
    process.wait()
    assert_nothing_left_running(process)
    assert not adapter.exists()

    rerun = run_script("Qwen_finetuning.py", *SHORT_4BIT_FLAGS, "--resume_from_checkpoint", "auto", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "the run is complete: outputs/checkpoint-6 is step 6 of 6; writing its adapter without training" \
           in rerun.stdout
    assert json.loads((adapter / "manifest.json").read_text())["global_step"] == 6
    assert load_file(adapter / "adapter_model.safetensors")
