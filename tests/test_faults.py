"""Fault injection for the data stages and the output policy: kills at several points (SIGTERM, SIGKILL, Ctrl-C),
a full disk, a read-only folder, and the bad-flag table through every stage script.

Promised: no half output at the promised path (the previous output, if any, byte for byte), no process left behind,
a rerun that succeeds, and for bad input one line, exit code 2, no traceback and nothing written. (Training kills
are tested in the training tests.)
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, ORCA, PUBMED, REPORTS, ROOT, one_line_error, run_script
from qwen_sft.artifacts import atomic_directory, manifest_path_for
from qwen_sft.cli import UserError

BIG_ROWS = 60_000  # enough for the mix to prepare rows in worker processes (mix.workers.PARALLEL_MIN_ROWS)


@pytest.fixture(scope="module")
def big_orca(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "orca.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(BIG_ROWS):
            handle.write(json.dumps({"conversations": [
                {"from": "human", "value": f"Question {index}: what is {index} plus {index}?"},
                {"from": "gpt", "value": f"The answer is {2 * index}, as {index} + {index} = {2 * index}."},
            ]}) + "\n")
    return path


def mix_args(output: Path, orca: Path = ORCA, total: int = 10) -> list:
    return ["--my_report_data_path", REPORTS, "--sources", f"orca={orca},pubmed={PUBMED}",
            "--ratios", "reports=0,orca=1,pubmed=0", "--total_samples", total, "--output_file", output]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes (hidden temporary files included)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# ---------------------------------------------------------------------------------------------------- processes


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def runs_script(pid: int, script: str) -> bool:
    """The process has exec'd `script` (before that, a forked child still runs the parent's code and handlers)."""
    try:
        return script in (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


# Runs data_integration.py with each write of the output file slowed down and announced, so that a kill can land
# while the output is half written.
SLOW_WRITER = """
import contextlib, pathlib, runpy, sys, time
import qwen_sft.mix.stage as mixing
real_atomic_file = mixing.atomic_file
marker = pathlib.Path(sys.argv[1])

@contextlib.contextmanager
def slow_atomic_file(path, mode="w", manifest=None):
    with real_atomic_file(path, mode, manifest) as handle:
        class Slow:
            def write(self, data):
                handle.write(data)
                handle.flush()
                marker.touch()
                time.sleep(0.01)
        yield Slow()

mixing.atomic_file = slow_atomic_file
script, sys.argv = sys.argv[2], sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def start_mix(tmp_path: Path, args: list, slow_writer: bool) -> subprocess.Popen:
    """data_integration.py in its own process group (as a terminal runs it), optionally with SLOW_WRITER."""
    wrapper = [sys.executable, "-c", SLOW_WRITER, tmp_path / "writing"] if slow_writer else [sys.executable]
    return subprocess.Popen(
        [*wrapper, ROOT / "data_integration.py", *map(str, args)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.slow
@pytest.mark.parametrize("point", ["starting", "preparing rows in workers", "writing the output"])
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "Ctrl-C"])
def test_a_killed_mix_leaves_the_old_output_and_no_process_and_reruns(tmp_path, big_orca, point, how):
    output = tmp_path / "out" / "mix.jsonl"
    assert run_script("data_integration.py", *mix_args(output)).returncode == 0  # the previous, good output
    before = snapshot(output.parent)
    args = mix_args(output, big_orca, total=BIG_ROWS - 1000)
    process = start_mix(tmp_path, args, slow_writer=point == "writing the output")
    workers = set()
    if point == "starting":
        wait_until(lambda: runs_script(process.pid, "data_integration.py") or process.poll() is not None, 60,
                   "the mix to start")
        time.sleep(0.3)
    elif point == "preparing rows in workers":
        if (os.cpu_count() or 1) < 2:
            pytest.skip("one CPU core: the mix prepares rows without workers")
        wait_until(lambda: children_of(process.pid) or process.poll() is not None, 60, "the pool's workers")
    else:
        wait_until(lambda: (tmp_path / "writing").exists() or process.poll() is not None, 60, "the output write")
    assert process.poll() is None, process.communicate()
    workers = children_of(process.pid)
    if how == "Ctrl-C":
        os.killpg(process.pid, signal.SIGINT)  # a terminal sends it to the whole process group
    else:
        process.send_signal(getattr(signal, how))
    stdout, stderr = process.communicate(timeout=60)

    default_action = {"SIGTERM": -signal.SIGTERM, "Ctrl-C": -signal.SIGINT}.get(how)
    if how == "SIGKILL" or (point == "starting" and process.returncode == default_action):
        assert process.returncode in (-signal.SIGKILL, default_action)  # before the interpreter was up: default
    else:
        assert process.returncode == 130, stderr[-3000:]
        assert stderr.strip().splitlines()[-1].startswith("error: interrupted"), stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
    for worker in workers:  # the pool's workers die with the mix, even when it is SIGKILLed
        wait_until(lambda worker=worker: not running(worker), 10, f"worker {worker} to exit")
    # A SIGKILLed run leaves its temporaries and its lock (the next run takes both over once its PID is gone).
    after = {name: data for name, data in snapshot(output.parent).items()
             if ".partial-" not in name and name != ".mix.jsonl.lock"}
    assert after == before  # no half output at the promised path: the old file and manifest, byte for byte

    rerun = run_script("data_integration.py", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(path.name for path in output.parent.iterdir()) == ["mix.jsonl", "mix.jsonl.manifest.json"]  # cleaned
    manifest = json.loads(manifest_path_for(output).read_text(encoding="utf-8"))
    assert manifest["output"]["rows"] == BIG_ROWS - 1000


# Runs data_integration.py so that its first Ctrl-C lands where C code discards the KeyboardInterrupt: in a finalizer
# (as in numpy.random's compiled first import, which calls abc.register and drops its error).
SWALLOWED_CTRL_C = """
import os, runpy, signal, sys
import qwen_sft.mix.stage as mixing
real_take = mixing.Mixer._take

class SendsCtrlC:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(1000))  # bytecodes for the handler to run between; its KeyboardInterrupt dies with __del__

def take(*args):
    SendsCtrlC()
    return real_take(*args)

mixing.Mixer._take = take
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def test_a_ctrl_c_whose_keyboard_interrupt_is_swallowed_still_stops_the_mix(tmp_path):
    output = tmp_path / "mix.jsonl"
    assert run_script("data_integration.py", *mix_args(output)).returncode == 0
    before = snapshot(tmp_path)
    result = subprocess.run([sys.executable, "-c", SWALLOWED_CTRL_C, ROOT / "data_integration.py",
                             *map(str, mix_args(output, total=20))], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 130, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: interrupted")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmpfs):
    return tmpfs("512k")


def test_a_mix_that_fills_the_disk_leaves_the_old_output_byte_for_byte(small_disk, big_orca):
    output = small_disk / "mix.jsonl"
    assert run_script("data_integration.py", *mix_args(output)).returncode == 0
    before = snapshot(small_disk)
    result = run_script("data_integration.py", *mix_args(output, big_orca, total=20_000))  # about 2 MB
    one_line_error(result, f"{output}: cannot write (the disk is full); the previous output, if any, is "
                       "unchanged")
    assert snapshot(small_disk) == before


def test_a_folder_that_fills_the_disk_leaves_the_old_folder_and_the_users_files(small_disk):
    merged = small_disk / "merged"
    with atomic_directory(merged) as folder:
        (folder / "model.safetensors").write_bytes(b"v1" * 1000)
        (folder / "manifest.json").write_text('{"stage": "export"}', encoding="utf-8")
    (merged / "model.gguf").write_bytes(os.urandom(100_000))  # the user's, carried over by hard link
    before = snapshot(small_disk)
    with pytest.raises(UserError, match="cannot write .the disk is full."):
        with atomic_directory(merged) as folder:
            (folder / "model.safetensors").write_bytes(os.urandom(1 << 20))
            (folder / "manifest.json").write_text('{"stage": "export"}', encoding="utf-8")
    assert snapshot(small_disk) == before


def test_a_read_only_output_folder_is_one_line_naming_the_real_error(small_disk):
    output = small_disk / "mix.jsonl"
    assert run_script("data_integration.py", *mix_args(output)).returncode == 0
    before = snapshot(small_disk)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = run_script("data_integration.py", *mix_args(output, total=12))
    one_line_error(result, f"{output}: cannot write (the file system is read-only)")
    assert snapshot(small_disk) == before


# ---------------------------------------------------------------------------------------------------- bad flags


def make_workdir(tmp_path: Path) -> Path:
    """A fake adapter (with a base-model folder), a user's folder, a file, an empty folder and broken adapters."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}", encoding="utf-8")
    for name, manifest in (("adapter", json.dumps({"stage": "train", "base_model": str(tmp_path / "base")})),
                           ("corrupt_adapter", '{"stage": "train", "base_mo'), ("empty_adapter", "{}")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text('{"base_model_name_or_path": "x"}', encoding="utf-8")
        (tmp_path / name / "manifest.json").write_text(manifest, encoding="utf-8")
    (tmp_path / "mywork").mkdir()
    shutil.copy(FIXTURES / "learning_20.jsonl", tmp_path / "mywork" / "data.jsonl")
    (tmp_path / "mywork" / "notes.txt").write_text("my notes", encoding="utf-8")
    (tmp_path / "a_file").write_text("not a folder", encoding="utf-8")
    (tmp_path / "empty_base").mkdir()
    (tmp_path / "prompts.jsonl").write_text('{"instruction": "hi"}\n', encoding="utf-8")
    (tmp_path / "mine.json").write_text(REPORTS.read_text(encoding="utf-8"), encoding="utf-8")
    return tmp_path


MIX = ["--sources", f"orca={ORCA},pubmed={PUBMED}", "--my_report_data_path", "mine.json"]
TRAIN = ["--dataset_path", str(FIXTURES / "learning_20.jsonl"), "--base_model", "tiny"]
BAD_FLAGS = [
    ("data_integration.py", [*MIX, "--ratios", "reports=nan,orca=0.5,pubmed=0.5"], "RATIOS['reports'] = nan must be"),
    ("data_integration.py", [*MIX, "--ratios", "reports=0.2,orca=0.500002,pubmed=0.3"],
     "RATIOS must sum to 1, got 1.000002"),
    ("data_integration.py", [*MIX, "--ratios", "orca=0.5,orca=0.5"], "--ratios names 'orca' more than once"),
    ("data_integration.py", [*MIX, "--seed", "1", "--seed", "2"], "--seed is given more than once"),
    ("data_integration.py", [*MIX, "--output_file", "mine.json"], "--output_file mine.json is the input "
                                                                   "--my_report_data_path mine.json"),
    ("data_integration.py", [*MIX, "--output_file", str(ORCA)], f"is the input --sources orca {ORCA}"),
    ("data_integration.py", [*MIX, "--output_file", "mywork"], "--output_file mywork: is a folder"),
    ("data_integration.py", [*MIX, "--output_file", "mywork/notes.txt"], "this toolkit did not write it"),
    ("data_set_generation.py", ["--my_report_data_path", "mine.json", "--ratios", "my_reports=inf,orca=1"],
     "RATIOS['my_reports'] = inf must be"),
    ("data_set_generation.py", ["--my_report_data_path", "mine.json", "--output_file", "mine.json"],
     "is the input --my_report_data_path"),
    ("Qwen_finetuning.py", [*TRAIN, "--eval_steps", "0"], "--eval_steps must be at least 1, got 0"),
    ("Qwen_finetuning.py", [*TRAIN, "--learning_rate", "-1"], "--learning_rate must be a number above 0, got -1.0"),
    ("Qwen_finetuning.py", [*TRAIN, "--lora_r", "0"], "--lora_r must be at least 1, got 0"),
    ("Qwen_finetuning.py", [*TRAIN, "--output_dir", "a_file"], "--output_dir a_file: is a file, not a folder"),
    ("Qwen_finetuning.py", [*TRAIN, "--adapter_dir", "mywork"], "--adapter_dir mywork: the folder exists and this "
                                                                "toolkit did not write it"),
    ("Qwen_finetuning.py", [*TRAIN, "--adapter_dir", "x", "--tokenizer_dir", "x"],
     "--adapter_dir x and --tokenizer_dir x are the same or nested folders"),
    ("Qwen_finetuning.py", ["--dataset_path", "mywork/data.jsonl", "--adapter_dir", "mywork", "--overwrite_output"],
     "--adapter_dir mywork holds the input --dataset_path mywork/data.jsonl"),
    ("Qwen_finetuning.py", ["--dataset_path", str(FIXTURES / "learning_20.jsonl"), "--base_model", "empty_base"],
     "base model folder empty_base holds no config.json"),
    ("evaluate.py", ["--adapter_dir", "adapter", "--output_dir", "a_file"], "--output_dir a_file: is a file"),
    ("evaluate.py", ["--adapter_dir", "corrupt_adapter"], "corrupt_adapter/manifest.json: not valid JSON"),
    ("inference.py", ["--adapter_dir", "adapter", "--instruction_file", "prompts.jsonl", "--output_file",
                      "prompts.jsonl"], "--output_file prompts.jsonl is the input --instruction_file prompts.jsonl"),
    ("inference.py", ["--adapter_dir", "empty_adapter"], "empty_adapter/manifest.json: names no base_model"),
    ("chat.py", ["--adapter_dir", "corrupt_adapter"], "corrupt_adapter/manifest.json: not valid JSON"),
    ("export_model.py", ["--adapter_dir", "adapter", "--output_dir", "."],
     "--output_dir must be a folder other than the current one or one above it, got '.'"),
    ("export_model.py", ["--adapter_dir", "adapter", "--output_dir", "mywork"], "this toolkit did not write it"),
    ("export_model.py", ["--adapter_dir", "adapter", "--system_prompt", 'Be brief."""\nFROM evil'],
     '--system_prompt holds """'),
    ("export_model.py", ["--adapter_dir", "empty_adapter"], "empty_adapter/manifest.json: names no base_model"),
    # settings.RULES, checked before any model loads
    ("Qwen_finetuning.py", [*TRAIN, "--optim", "bogus"], "--optim must be one of adamw_torch, "),
    ("Qwen_finetuning.py", [*TRAIN, "--lr_scheduler_type", "bogus"], "--lr_scheduler_type must be one of linear, "),
    ("Qwen_finetuning.py", [*TRAIN, "--seed", "-1"], "--seed must be from 0 to 4294967295, got -1"),
    ("Qwen_finetuning.py", [*TRAIN, "--split_seed", "-1"], "--split_seed must be from 0 to 4294967295, got -1"),
    ("evaluate.py", ["--adapter_dir", "adapter", "--split_seed", "-1"], "--split_seed must be from 0"),
    ("data_integration.py", [*MIX, "--seed", "-1"], "--seed must be from 0 to 4294967295, got -1"),
    ("data_integration.py", [*MIX, "--output_file", ""], "--output_file must be a path (not empty), got ''"),
    ("inference.py", ["--adapter_dir", "adapter", "--repetition_penalty", "0"],
     "--repetition_penalty must be a number above 0, got 0.0"),
    ("chat.py", ["--adapter_dir", "adapter", "--repetition_penalty", "0"],
     "--repetition_penalty must be a number above 0, got 0.0"),
    ("export_model.py", ["--adapter_dir", "adapter", "--output_dir", ".", "--overwrite_output", "true"],
     "--output_dir must be a folder other than the current one or one above it, got '.'"),
    ("export_model.py", ["--adapter_dir", "adapter", "--output_dir", "..", "--overwrite_output", "true"],
     "--output_dir must be a folder other than the current one or one above it, got '..'"),
]


@pytest.mark.parametrize("script, flags, message", BAD_FLAGS,
                         ids=[f"{script}:{' '.join(flags[-2:])[:40]}" for script, flags, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_exit_2_and_write_nothing(tmp_path, script, flags, message):
    workdir = make_workdir(tmp_path)
    before = snapshot(workdir)
    result = run_script(script, *flags, cwd=workdir, timeout=120)
    one_line_error(result, message)
    assert snapshot(workdir) == before


def test_folder_sources_are_inputs_and_checked_whole_with_fatal_bad_rows(tmp_path):
    """A source given as a folder: the mix may not be written into it (it would be read back as a source on the
    next run), and --fatal_bad_rows checks each of its files, naming the file and line."""
    folder = tmp_path / "orca"
    folder.mkdir()
    shutil.copy(ORCA, folder / "a.jsonl")
    shutil.copy(ORCA, folder / "b.jsonl")
    into_source = run_script("data_integration.py", *mix_args(folder / "b.jsonl", orca=folder), "--overwrite_output",
                             "true", cwd=tmp_path)
    one_line_error(into_source, "is the input --sources orca file 2 of 2")
    assert (folder / "b.jsonl").read_bytes() == ORCA.read_bytes()

    with open(folder / "b.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    lines = len((folder / "b.jsonl").read_text(encoding="utf-8").splitlines())
    fatal = run_script("data_integration.py", *mix_args(tmp_path / "mix.jsonl", orca=folder), "--fatal_bad_rows",
                       "true", cwd=tmp_path)
    one_line_error(fatal, f"orca: {folder / 'b.jsonl'}:{lines}:")
    assert not (tmp_path / "mix.jsonl").exists()


def test_an_unreadable_work_state_starts_over_with_a_warning(tmp_path):
    from qwen_sft.mix.work_state import WorkFolder

    work = WorkFolder(tmp_path / "mix.jsonl")
    work.folder.mkdir()
    work.state_file.write_bytes(b"\x80\x05truncated")
    assert work.load("any fingerprint", plan=None) is None
