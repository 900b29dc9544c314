"""The output rule's cases (qwen_sft/artifacts.py, claim_outputs): one stage never replaces another's folder, a
manifest path is checked like its output, locks never write through a link, writes follow links and keep modes,
appending appends, no output sits inside an input, and export holds the adapter still while it reads it."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from conftest import FIXTURES, ORCA, PUBMED, REPORTS, one_line_error, run_script
from qwen_sft import artifacts, export
from qwen_sft.artifacts import (
    FOLDER,
    WORKDIR,
    Output,
    append_to_file,
    atomic_directory,
    atomic_file,
    claim_outputs,
    find_manifest,
    legacy_manifest_path_for,
    manifest_path_for,
    sha256_file,
    warn_if_manifest_differs,
    write_workdir_manifest,
)
from qwen_sft.cli import Config, UserError
from qwen_sft.locking import folder_lock, lock_path


def snapshot(folder: Path) -> dict:
    """Every path under `folder`: a file's bytes and mode, a link's target, a folder's mode."""
    tree = {}
    for path in sorted(folder.rglob("*")):
        status = path.lstat()
        if stat.S_ISLNK(status.st_mode):
            tree[str(path.relative_to(folder))] = ("link", os.readlink(path))
        elif stat.S_ISREG(status.st_mode):
            tree[str(path.relative_to(folder))] = ("file", path.read_bytes(), stat.S_IMODE(status.st_mode))
        else:
            tree[str(path.relative_to(folder))] = ("other", stat.S_IFMT(status.st_mode))
    return tree


def fake_adapter(folder: Path, base: str = "tiny") -> Path:
    """An adapter folder as training writes it, enough for the stages' checks before any model loads."""
    with atomic_directory(folder) as temporary:
        (temporary / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
        (temporary / "adapter_model.safetensors").write_bytes(os.urandom(256))
        (temporary / "manifest.json").write_text(json.dumps({"stage": "train", "base_model": base}))
    return folder


def fake_export(folder: Path) -> Path:
    with atomic_directory(folder) as temporary:
        (temporary / "model.safetensors").write_bytes(os.urandom(256))
        (temporary / "model-q8_0.gguf").write_bytes(os.urandom(256))
        (temporary / "Modelfile").write_text("FROM ./model-q8_0.gguf\n")
        (temporary / "manifest.json").write_text(json.dumps({"stage": "export"}))
    return folder


def mix_args(output, *extra) -> list:
    return ["--my_report_data_path", REPORTS, "--sources", f"orca={ORCA},pubmed={PUBMED}", "--ratios",
            "reports=0,orca=1,pubmed=0", "--total_samples", 5, "--output_file", output, *extra]


# ---------------------------------------------------------------------------------------------------- 2: stages


def test_export_into_a_copy_of_the_adapter_is_refused(tmp_path):
    adapter = fake_adapter(tmp_path / "A")
    shutil.copytree(adapter, tmp_path / "copy_of_A")
    before = snapshot(tmp_path)
    result = run_script("export_model.py", "--adapter_dir", "A", "--output_dir", "copy_of_A", cwd=tmp_path)
    one_line_error(result, "--output_dir copy_of_A: the folder was written by another stage (train, says its "
                            "manifest.json), not by export")
    assert snapshot(tmp_path) == before


def test_training_into_an_export_folder_is_refused(tmp_path):
    merged = fake_export(tmp_path / "Qwen_finetuning_merged")
    before = snapshot(tmp_path)
    result = run_script("Qwen_finetuning.py", "--dataset_path", FIXTURES / "learning_20.jsonl", "--base_model", "tiny",
                        "--tokenizer_dir", merged.name, cwd=tmp_path)
    one_line_error(result, "--tokenizer_dir Qwen_finetuning_merged: the folder was written by another stage (export")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("files", [["notes.txt", "manifest.json"], {"notes.txt": "0" * 64}],
                         ids=["names only", "a wrong sha256"])
def test_a_forged_manifest_does_not_make_the_users_file_ours(tmp_path, files):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "notes.txt").write_text("my notes")
    (merged / "manifest.json").write_text(json.dumps({"stage": "export", "files": files}))
    with claim_outputs({}, [Output("--output_dir", merged, FOLDER)], "export", overwrite=False):
        fake_export(merged)
    assert (merged / "notes.txt").read_text() == "my notes"
    assert json.loads((merged / "manifest.json").read_text())["files"]["model.safetensors"] == sha256_file(
        merged / "model.safetensors")


def test_a_listed_file_changed_since_is_the_users(tmp_path):
    merged = fake_export(tmp_path / "merged")
    (merged / "Modelfile").write_text("FROM ./model-q8_0.gguf\nPARAMETER num_ctx 8192  # mine\n")
    with claim_outputs({}, [Output("--output_dir", merged, FOLDER)], "export", overwrite=False):
        fake_export(merged)
    assert (merged / "Modelfile.user").read_text().endswith("# mine\n")
    assert (merged / "Modelfile").read_text() == "FROM ./model-q8_0.gguf\n"


# ---------------------------------------------------------------------------------------------------- 3: manifests


def test_a_mix_never_replaces_a_users_file_named_like_a_manifest(tmp_path):
    (tmp_path / "release.manifest.json").write_text('{"mine": true}')  # the old, shared manifest name
    first = run_script("data_integration.py", *mix_args("release.jsonl"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "release.manifest.json").read_text() == '{"mine": true}'
    assert json.loads((tmp_path / "release.jsonl.manifest.json").read_text())["output"]["sha256"] == sha256_file(
        tmp_path / "release.jsonl")

    (tmp_path / "answers.jsonl.manifest.json").write_text("my notes about answers.jsonl")
    refused = run_script("data_integration.py", *mix_args("answers.jsonl"), cwd=tmp_path)
    one_line_error(refused, "answers.jsonl.manifest.json: this toolkit did not write it about answers.jsonl")
    assert not (tmp_path / "answers.jsonl").exists()
    forced = run_script("data_integration.py", *mix_args("answers.jsonl", "--overwrite_output", "true"), cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (tmp_path / "answers.jsonl.manifest.json.user").read_text() == "my notes about answers.jsonl"


def describe(written):
    return {"stage": "data_integration", "output": {"path": Path(written).name.split(".partial")[0].lstrip("."),
                                                    "sha256": sha256_file(written)}}


def test_mix_json_and_mix_jsonl_each_keep_their_own_manifest(tmp_path):
    for name in ("mix.json", "mix.jsonl"):
        with claim_outputs({}, [Output("--output_file", tmp_path / name)], "data_integration", overwrite=False):
            with atomic_file(tmp_path / name, manifest=describe) as handle:
                handle.write(f"{name}\n")
    for name in ("mix.json", "mix.jsonl"):
        manifest = json.loads(manifest_path_for(tmp_path / name).read_text())
        assert manifest["output"]["sha256"] == sha256_file(tmp_path / name)


def test_a_mix_with_a_manifest_of_the_old_name_is_still_found_and_replaced_cleanly(tmp_path, capsys):
    mix = tmp_path / "mix.jsonl"
    mix.write_text("old rows\n")
    legacy = legacy_manifest_path_for(mix)
    legacy.write_text(json.dumps({"stage": "data_set_generation",
                                  "output": {"path": str(mix), "sha256": sha256_file(mix)}}))
    (tmp_path / "mix.json").write_text("another file\n")
    assert find_manifest(mix) == legacy and find_manifest(tmp_path / "mix.json") is None  # not mix.json's
    mix.write_text("edited\n")
    warn_if_manifest_differs(mix)
    assert "does not match its manifest" in capsys.readouterr().out
    mix.write_text("old rows\n")
    with claim_outputs({}, [Output("--output_file", mix)], "data_integration", overwrite=False):  # ours: either
        with atomic_file(mix, manifest=describe) as handle:  # data stage may replace the other's mix
            handle.write("new rows\n")
    assert not legacy.exists() and find_manifest(mix) == manifest_path_for(mix)
    assert (tmp_path / "mix.json").read_text() == "another file\n"


# ---------------------------------------------------------------------------------------------------- 4: locks


def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path):
    important = tmp_path / "important.txt"
    important.write_text("important")
    lock_path(tmp_path / "outputs").symlink_to(important)
    with pytest.raises(UserError, match=r"\.outputs\.lock: the lock file of --output_dir is a symbolic link"):
        with folder_lock(tmp_path / "outputs", "--output_dir"):
            pass
    assert important.read_text() == "important" and lock_path(tmp_path / "outputs").is_symlink()
    result = run_script("Qwen_finetuning.py", "--dataset_path", FIXTURES / "learning_20.jsonl", "--base_model",
                        "tiny", cwd=tmp_path)
    one_line_error(result, "is a symbolic link")
    assert important.read_text() == "important"


def test_a_folder_or_a_users_file_at_the_lock_path_is_one_line(tmp_path):
    lock_path(tmp_path / "outputs").mkdir()
    with pytest.raises(UserError, match="holds something that is not a file"):
        with folder_lock(tmp_path / "outputs", "--output_dir"):
            pass
    hard = tmp_path / "hard.txt"
    hard.write_text("not a lock")
    os.link(hard, lock_path(tmp_path / "adapter"))
    with pytest.raises(UserError, match="holds a file that is not a lock of this toolkit"):
        with folder_lock(tmp_path / "adapter", "--adapter_dir"):
            pass
    assert hard.read_text() == "not a lock" and lock_path(tmp_path / "adapter").read_text() == "not a lock"


def test_a_lock_file_hard_linked_elsewhere_is_never_written_into_nor_removed(tmp_path):
    stale = json.dumps({"pid": 999999999, "host": "gone", "started": "x"})
    other = tmp_path / "other_name"
    other.write_text(stale)
    os.link(other, lock_path(tmp_path / "outputs"))
    with pytest.raises(UserError, match="holds a file that is not a lock of this toolkit"):
        with folder_lock(tmp_path / "outputs", "--output_dir"):
            pass
    assert other.read_text() == stale and lock_path(tmp_path / "outputs").stat().st_nlink == 2


def test_a_lock_whose_owner_was_killed_before_unlinking_its_temporary_name_is_taken_over(tmp_path):
    """SIGKILL between linking the lock into place and unlinking the name it was written under leaves a lock with
    two names; the next run takes it over and removes both (it refused it, as a user's hard link, before)."""
    lock = lock_path(tmp_path / "outputs")
    temporary = lock.with_name(f"{lock.name}.partial-999999999")
    temporary.write_text(json.dumps({"pid": 999999999, "host": "gone", "started": "x"}))
    os.link(temporary, lock)
    with folder_lock(tmp_path / "outputs", "--output_dir"):
        assert not temporary.exists() and json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_shared_readers_keep_writers_out_and_the_last_one_removes_the_lock(tmp_path):
    with folder_lock(tmp_path / "A", "--adapter_dir", shared=True):
        with folder_lock(tmp_path / "A", "--adapter_dir", shared=True):  # a second export of the same adapter
            with pytest.raises(UserError, match="--adapter_dir .*A is in use by another run"):
                with folder_lock(tmp_path / "A", "--adapter_dir"):  # a training run into it
                    pass
        assert lock_path(tmp_path / "A").exists()  # the first reader still holds it
    assert not lock_path(tmp_path / "A").exists()


# ---------------------------------------------------------------------------------------------------- 5: links


def test_chat_save_appends_through_links_and_keeps_hard_links_and_mode(tmp_path):
    from transformers import AutoTokenizer

    from qwen_sft.chat import ChatSession
    from qwen_sft.tiny import tiny_path

    session = ChatSession(AutoTokenizer.from_pretrained(tiny_path()), "system", 4096, 512,
                          inputs={"--adapter_dir": str(tmp_path / "adapter")})
    log = tmp_path / "private" / "chat.jsonl"
    log.parent.mkdir()
    log.write_text('{"messages": []}')  # no final newline: one is added before the rows
    log.chmod(0o600)
    (tmp_path / "link.jsonl").symlink_to(log)
    os.link(log, tmp_path / "hard.jsonl")
    session.add("q", "a", complete=True)
    session.save(str(tmp_path / "link.jsonl"))
    assert (tmp_path / "link.jsonl").is_symlink()
    lines = log.read_text().splitlines()
    assert lines[0] == '{"messages": []}' and json.loads(lines[1])["messages"][-1]["content"] == "a"
    assert (tmp_path / "hard.jsonl").read_text() == log.read_text() and log.stat().st_nlink == 2
    assert stat.S_IMODE(log.stat().st_mode) == 0o600

    session.add("q2", "a2", complete=True)
    with pytest.raises(UserError, match="/dev/null: is a character device, not a regular file"):
        session.save("/dev/null")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="fifo: is a FIFO, not a regular file"):
        session.save(str(fifo))  # refused at once, never blocked waiting for a reader
    (tmp_path / "adapter").mkdir()
    with pytest.raises(UserError, match="/save .*adapter/notes.jsonl is inside the input --adapter_dir"):
        session.save(str(tmp_path / "adapter" / "notes.jsonl"))
    assert session.unsaved  # nothing was saved, so nothing is forgotten


def test_a_failed_append_is_cut_back_off(tmp_path, monkeypatch):
    log = tmp_path / "chat.jsonl"
    log.write_text("row 1\n")

    def disk_full(fd, data):
        os.ftruncate(fd, os.fstat(fd).st_size + 3)  # half a row landed
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(UserError, match="chat.jsonl: cannot write .the disk is full."):
        append_to_file(log, "row 2\n")
    monkeypatch.undo()
    assert log.read_text() == "row 1\n"


def test_a_symlinked_output_folder_is_written_at_its_target(tmp_path):
    bigdisk = tmp_path / "bigdisk"
    fake_export(bigdisk / "merged")
    (tmp_path / "Qwen_finetuning_merged").symlink_to(bigdisk / "merged")
    (bigdisk / "merged").chmod(0o750)
    link = tmp_path / "Qwen_finetuning_merged"
    with claim_outputs({}, [Output("--output_dir", link, FOLDER)], "export", overwrite=False) as claimed:
        assert claimed["--output_dir"] == bigdisk / "merged"
        fake_export(link)
    assert link.is_symlink() and os.readlink(link) == str(bigdisk / "merged")
    assert (bigdisk / "merged" / "model.safetensors").is_file()
    assert stat.S_IMODE((bigdisk / "merged").stat().st_mode) == 0o750
    assert sorted(path.name for path in tmp_path.iterdir()) == ["Qwen_finetuning_merged", "bigdisk"]


def test_a_replaced_file_keeps_its_mode_and_its_link(tmp_path):
    target = tmp_path / "real" / "answers.jsonl"
    target.parent.mkdir()
    with atomic_file(target, manifest=describe) as handle:
        handle.write("v1\n")
    target.chmod(0o600)
    (tmp_path / "answers.jsonl").symlink_to(target)
    with atomic_file(tmp_path / "answers.jsonl", manifest=describe) as handle:
        handle.write("v2\n")
    assert (tmp_path / "answers.jsonl").is_symlink() and target.read_text() == "v2\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(manifest_path_for(target).stat().st_mode) == 0o600  # a private output's manifest too
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UserError, match="fifo: is a FIFO, not a regular file"):
        with atomic_file(tmp_path / "fifo") as handle:
            handle.write("x")
    assert stat.S_ISFIFO((tmp_path / "fifo").lstat().st_mode)


# ---------------------------------------------------------------------------------------------------- 6: inside


def test_an_output_inside_an_input_folder_is_refused(tmp_path):
    adapter = fake_adapter(tmp_path / "a2")
    (tmp_path / "prompts.jsonl").write_text('{"instruction": "hi"}\n')
    before = snapshot(tmp_path)
    result = run_script("inference.py", "--adapter_dir", "a2", "--instruction_file", "prompts.jsonl", "--output_file",
                        "a2/adapter_model.safetensors", "--overwrite_output", "true", cwd=tmp_path)
    one_line_error(result, "--output_file a2/adapter_model.safetensors is inside the input --adapter_dir a2")
    assert snapshot(tmp_path) == before and (adapter / "adapter_model.safetensors").stat().st_size == 256


# ---------------------------------------------------------------------------------------------------- 10: export


def export_config(tmp_path: Path, adapter: Path) -> Config:
    return Config(ADAPTER_DIR=str(adapter), BASE_MODEL="tiny", OUTPUT_DIR=str(tmp_path / "merged"),
                  OVERWRITE_OUTPUT=False, DTYPE="float32", OLLAMA_MODELFILE=False, SYSTEM_PROMPT="be brief",
                  MAX_SEQ_LENGTH=64, TEMPERATURE=0.8, TOP_P=0.9, REPETITION_PENALTY=1.3, GGUF="", LLAMA_CPP_DIR="",
                  BACKEND="hf")


def test_export_refuses_an_adapter_in_training_and_one_that_changes_during_the_merge(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from qwen_sft.tiny import tiny_path

    adapter = fake_adapter(tmp_path / "A")
    cfg = export_config(tmp_path, adapter)
    with folder_lock(adapter, "--adapter_dir"):  # a training run writing the adapter
        with pytest.raises(UserError, match="--adapter_dir .*A is in use by another run"):
            export.export_merged(cfg)

    fake_export(tmp_path / "merged")
    before = snapshot(tmp_path / "merged")

    def merge_while_training_finishes(adapter_dir, base_model, folder, dtype, max_seq_length):
        (Path(adapter_dir) / "adapter_model.safetensors").write_bytes(os.urandom(256))  # a new adapter lands
        (folder / "model.safetensors").write_bytes(b"merged from the old adapter")

    monkeypatch.setattr(export, "load_adapter_tokenizer", lambda _: AutoTokenizer.from_pretrained(tiny_path()))
    monkeypatch.setattr(export, "merge_with_peft", merge_while_training_finishes)
    monkeypatch.setattr(export, "write_portable_tokenizer_config", lambda folder: None)
    monkeypatch.setattr(export, "write_generation_config", lambda folder, tokenizer: None)
    with pytest.raises(UserError, match="adapter_model.safetensors changed during the merge"):
        export.export_merged(cfg)
    assert snapshot(tmp_path / "merged") == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["A", "merged"]  # no lock or temporary left


# ---------------------------------------------------------------------------------------------------- review round 2


def claim_and_write(path: Path, stage: str, text: str, overwrite: bool = False) -> None:
    """What a stage with a file output does: claim it, then write it with its manifest."""
    def manifest(written):
        return {"stage": stage, "output": {"path": str(path), "sha256": sha256_file(written)}}

    with claim_outputs({}, [Output("--output_file", path)], stage, overwrite) as targets:
        with atomic_file(targets["--output_file"], manifest=manifest) as handle:
            handle.write(text)


def test_the_trainers_checkpoint_rotation_never_meets_a_users_checkpoint_folder(tmp_path):
    """Defect 1: the HF Trainer deletes every checkpoint-* folder beyond --save_total_limit; refused even with
    --overwrite_output, since that never removes the user's files."""
    outputs = tmp_path / "outputs"
    ours = {"stage": "train"}
    outputs.mkdir()
    write_workdir_manifest(outputs, ours)
    (outputs / "checkpoint-1").mkdir()  # the trainer's: ours in a folder our training marked
    with claim_outputs({}, [Output("--output_dir", outputs, WORKDIR)], "train", overwrite=False):
        pass
    (outputs / "checkpoint-1-good").mkdir()
    (outputs / "checkpoint-1-good" / "MYNOTES.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"--output_dir .*outputs holds checkpoint-1-good, which training did not "
                                            r"write there; the trainer's checkpoint rotation deletes"):
            with claim_outputs({}, [Output("--output_dir", outputs, WORKDIR)], "train", overwrite):
                pass
    userrun = tmp_path / "userrun"
    (userrun / "checkpoint-1-best").mkdir(parents=True)
    (userrun / "checkpoint-1-best" / "notes.txt").write_text("best")
    with pytest.raises(UserError, match="userrun holds checkpoint-1-best, which training did not write"):
        with claim_outputs({}, [Output("--output_dir", userrun, WORKDIR)], "train", overwrite=True):
            pass
    assert (userrun / "checkpoint-1-best" / "notes.txt").read_text() == "best"


def test_the_work_folder_manifest_is_this_runs(tmp_path):
    """Defect 1: each run records its own config in OUTPUT_DIR's manifest (not the first run's forever)."""
    write_workdir_manifest(tmp_path, {"stage": "train", "config": {"MAX_STEPS": 4}})
    write_workdir_manifest(tmp_path, {"stage": "train", "config": {"MAX_STEPS": 6}})
    assert json.loads((tmp_path / "manifest.json").read_text())["config"] == {"MAX_STEPS": 6}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["manifest.json"]


@pytest.mark.slow
def test_training_keeps_a_users_readme_and_checkpoint_copy_in_output_dir(tmp_path):
    """Defect 1 end to end: TRL's model card never lands in OUTPUT_DIR, and a user's checkpoint copy is refused in one
    line before the trainer's rotation could delete it."""
    flags = ["--base_model", "tiny", "--dataset_path", FIXTURES / "learning_20.jsonl", "--max_seq_length", 128,
             "--per_device_train_batch_size", 2, "--eval_steps", 1, "--save_steps", 1, "--save_total_limit", 1]
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "README.md").write_text("notes")
    first = run_script("Qwen_finetuning.py", *flags, "--max_steps", 2, "--overwrite_output", "true", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (outputs / "README.md").read_text() == "notes"
    shutil.copytree(outputs / "checkpoint-2", outputs / "checkpoint-2-good")
    (outputs / "checkpoint-2-good" / "MYNOTES.txt").write_text("keep")
    before = snapshot(outputs)
    second = run_script("Qwen_finetuning.py", *flags, "--max_steps", 3, cwd=tmp_path)
    one_line_error(second, "outputs holds checkpoint-2-good, which training did not write there")
    assert snapshot(outputs) == before


def test_a_folder_with_a_filesystem_mounted_inside_is_refused(tmp_path, monkeypatch):
    """Defect 2: a folder replaced whole would copy across a mount, then delete into it with the old folder."""
    merged = fake_export(tmp_path / "merged")
    (merged / "bigdisk").mkdir()
    (merged / "bigdisk" / "data.bin").write_bytes(b"on another disk")
    monkeypatch.setattr(artifacts, "_mount_points", lambda: {merged / "bigdisk"})
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"merged: .*bigdisk is a mount point inside it"):
        with claim_outputs({}, [Output("--output_dir", merged, FOLDER)], "export", overwrite=True):
            pass
    with pytest.raises(UserError, match="bigdisk is a mount point inside it"):
        fake_export(merged)
    assert snapshot(tmp_path) == before


def test_a_file_put_at_a_claimed_output_meanwhile_is_not_replaced(tmp_path):
    """Defect 3: the writer re-checks at rename time that the output is still what the claim checked."""
    output = tmp_path / "answers.jsonl"
    with claim_outputs({}, [Output("--output_file", output)], "inference", overwrite=False) as targets:
        output.write_text("the user's, written just now")
        with pytest.raises(UserError, match="answers.jsonl: changed since this run checked it"):
            with atomic_file(targets["--output_file"]) as handle:
                handle.write("ours")
    assert output.read_text() == "the user's, written just now"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["answers.jsonl"]


def test_a_file_output_is_locked_for_the_run(tmp_path):
    """Defect 3: two runs into one file (two mixes) cannot interleave their file and manifest."""
    output = tmp_path / "mix.jsonl"
    with claim_outputs({}, [Output("--output_file", output)], "data_integration", overwrite=False):
        assert lock_path(output).is_file()
        with pytest.raises(UserError, match="--output_file .*mix.jsonl is in use by another run"):
            with claim_outputs({}, [Output("--output_file", output)], "data_integration", overwrite=False):
                pass
    assert not lock_path(output).exists()


@pytest.mark.parametrize("stage, module, function", [("inference", "inference", "_answer_file"),
                                                     ("evaluate", "evaluation", "_evaluate"),
                                                     ("export", "export", "_export")])
def test_stages_write_where_they_claimed(tmp_path, monkeypatch, stage, module, function):
    """Defect 3: each stage gets the claimed target (links followed once, at the claim), not its flag again."""
    import importlib

    stage_module = importlib.import_module(f"qwen_sft.{module}")
    seen = []
    monkeypatch.setattr(stage_module, function, lambda *args: seen.append(args[-1]))
    real = tmp_path / "real"
    (tmp_path / "link").symlink_to(real)
    adapter = fake_adapter(tmp_path / "A")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"INSTRUCTION": "q", "INPUT": "", "OUTPUT": "a"}) + "\n")
    cfg = Config({"ADAPTER_DIR": str(adapter), "OUTPUT_DIR": str(tmp_path / "link"),
                  "OUTPUT_FILE": str(tmp_path / "link"),
                  "DATASET_PATH": str(data), "INSTRUCTION_FILE": str(data), "OVERWRITE_OUTPUT": False,
                  "BASE_MODEL": "tiny", "EVAL_BATCH_SIZE": 1, "GEN_BATCH_SIZE": 1, "MAX_NEW_TOKENS": 1,
                  "MAX_SEQ_LENGTH": 8, "FAST_GENERATION": "false", "DTYPE": "float16", "GGUF": "",
                  "OLLAMA_MODELFILE": False, "SYSTEM_PROMPT": "", "LLAMA_CPP_DIR": ""})
    if stage == "inference":
        stage_module.answer_file(cfg)
    elif stage == "evaluate":
        stage_module.evaluate(cfg)
    else:
        stage_module.export_merged(cfg)
    assert seen == [real]


def test_a_folder_of_hidden_entries_is_not_empty(tmp_path):
    """Defect 5: `.git/` and `.env` are the user's; only a truly empty folder is free."""
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / ".env").write_text("SECRET=1")
    with pytest.raises(UserError, match="project: the folder exists and this toolkit did not write it"):
        with claim_outputs({}, [Output("--output_dir", project, FOLDER)], "export", overwrite=False):
            pass
    (tmp_path / "empty").mkdir()
    with claim_outputs({}, [Output("--output_dir", tmp_path / "empty", FOLDER)], "export", overwrite=False):
        pass


def test_a_copied_mix_script_writes_its_stage_name(tmp_path):
    """Defect 6: the stage comes from the stage, not from the script's file name, so a rerun of the original
    script may replace the copy's mix."""
    from conftest import ROOT

    shutil.copy(ROOT / "data_integration.py", ROOT / "my_copy_of_data_integration.py")
    try:
        copied = run_script("my_copy_of_data_integration.py", *mix_args("mix.jsonl"), cwd=tmp_path)
    finally:
        (ROOT / "my_copy_of_data_integration.py").unlink()
    assert copied.returncode == 0, copied.stderr[-2000:]
    assert json.loads(manifest_path_for(tmp_path / "mix.jsonl").read_text())["stage"] == "data_integration"
    rerun = run_script("data_integration.py", *mix_args("mix.jsonl"), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]


def test_a_file_of_another_stage_is_named_as_such(tmp_path):
    """Defect 6: not "this toolkit did not write it" for a file another stage of the toolkit wrote."""
    output = tmp_path / "out.jsonl"
    claim_and_write(output, "inference", "answers\n")
    with pytest.raises(UserError, match=r"out.jsonl: the file was written by another stage \(inference, says its "
                                        r"manifest\), not by data_integration"):
        claim_and_write(output, "data_integration", "rows\n")


def test_alternating_stages_replace_each_others_manifest(tmp_path):
    """Defect 7: a toolkit manifest about the file being replaced goes with it; no .user pile-up."""
    output = tmp_path / "out.jsonl"
    for stage in ("inference", "data_integration", "inference", "data_integration"):
        claim_and_write(output, stage, f"{stage}\n", overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.manifest.json"]
    assert json.loads(manifest_path_for(output).read_text())["stage"] == "data_integration"


def test_a_legacy_manifest_of_another_file_is_not_this_outputs(tmp_path):
    """Defect 8a: `data.manifest.json` is the legacy manifest of `data.jsonl`, not of a mix into `data`."""
    (tmp_path / "data.jsonl").write_text("rows\n")
    legacy = tmp_path / "data.manifest.json"
    legacy.write_text(json.dumps({"stage": "data_integration", "output": {
        "path": "data.jsonl", "sha256": sha256_file(tmp_path / "data.jsonl")}}))
    kept = legacy.read_bytes()
    with pytest.raises(UserError, match="data.manifest.json: this toolkit did not write it about data"):
        claim_and_write(tmp_path / "data", "data_integration", "new\n")
    assert legacy.read_bytes() == kept
    claim_and_write(tmp_path / "data", "data_integration", "new\n", overwrite=True)
    assert (tmp_path / "data.manifest.json.user").read_bytes() == kept


def test_a_legacy_list_of_names_is_ours_where_the_new_folder_writes_them(tmp_path):
    """Defect 8b: an export folder of an older version (a list of names, no sha256) is replaced, not kept as
    model.safetensors.user at each upgrade; a listed name the new export does not write stays."""
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"old weights")
    (merged / "model-q4_0.gguf").write_bytes(b"old gguf")
    (merged / "manifest.json").write_text(json.dumps({"stage": "export", "files": ["model.safetensors",
                                                                                  "model-q4_0.gguf"]}))
    with claim_outputs({}, [Output("--output_dir", merged, FOLDER)], "export", overwrite=False):
        fake_export(merged)
    names = sorted(path.name for path in merged.iterdir())
    assert names == ["Modelfile", "manifest.json", "model-q4_0.gguf", "model-q8_0.gguf", "model.safetensors"]
    assert (merged / "model.safetensors").read_bytes() != b"old weights"


def test_a_private_output_is_never_readable_while_it_is_written(tmp_path):
    """Defect 10: the temporaries have the final mode from the start."""
    private = tmp_path / "private.jsonl"
    private.write_text("old")
    private.chmod(0o600)
    with atomic_file(private) as handle:
        assert stat.S_IMODE(os.fstat(handle.fileno()).st_mode) == 0o600
        handle.write("new")
    folder = tmp_path / "merged"
    folder.mkdir(mode=0o700)
    folder.chmod(0o700)
    (folder / "manifest.json").write_text(json.dumps({"stage": "export"}))
    with atomic_directory(folder) as temporary:
        assert stat.S_IMODE(temporary.stat().st_mode) == 0o700
        (temporary / "manifest.json").write_text(json.dumps({"stage": "export"}))
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700


@pytest.mark.parametrize("length", [240, 300])
def test_a_name_too_long_is_one_line(tmp_path, length):
    """Defect 11: a name the file system cannot hold (or whose manifest's name it cannot) is refused before work."""
    result = run_script("data_integration.py", *mix_args("a" * length + ".jsonl"), cwd=tmp_path)
    one_line_error(result, "the name is too long")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_users_file_at_the_lock_path_is_kept(tmp_path):
    """Defect 13: a lock file of ours is never empty, so an empty file there is the user's."""
    lock_path(tmp_path / "outputs").write_bytes(b"")
    with pytest.raises(UserError, match="holds a file that is not a lock of this toolkit"):
        with folder_lock(tmp_path / "outputs", "--output_dir"):
            pass
    assert lock_path(tmp_path / "outputs").read_bytes() == b""


def test_export_locks_the_adapter_before_it_reads_the_manifest(tmp_path, monkeypatch):
    """Defect 14: the manifest export reads is the one of the adapter it then merges."""
    adapter = fake_adapter(tmp_path / "A")
    held = []

    def read(folder):
        held.append(lock_path(adapter).exists())
        raise UserError("stop here")

    monkeypatch.setattr(export, "read_adapter_manifest", read)
    cfg = Config({"ADAPTER_DIR": str(adapter), "OUTPUT_DIR": str(tmp_path / "merged"), "DTYPE": "float16",
                  "GGUF": "", "OLLAMA_MODELFILE": False, "LLAMA_CPP_DIR": "", "SYSTEM_PROMPT": ""})
    with pytest.raises(UserError, match="stop here"):
        export.export_merged(cfg)
    assert held == [True]


def test_a_link_swapped_after_the_claim_is_not_followed(tmp_path):
    """Defect 3: a stage that names its output again (training's folders) still writes only where it claimed."""
    (tmp_path / "claimed").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "mine.txt").write_text("mine")
    link = tmp_path / "adapter"
    link.symlink_to(tmp_path / "claimed")
    with claim_outputs({}, [Output("--adapter_dir", link, FOLDER)], "train", overwrite=False):
        link.unlink()
        link.symlink_to(tmp_path / "elsewhere")
        with pytest.raises(UserError, match="adapter: changed since this run checked it"):
            fake_adapter(link)
    assert sorted(path.name for path in (tmp_path / "elsewhere").iterdir()) == ["mine.txt"]


def test_an_output_file_we_may_not_read_is_one_line(tmp_path, monkeypatch):
    """Defect 11: an OSError while checking (a file of the user's we may not read) is one line, not a traceback."""
    output = tmp_path / "out.jsonl"
    claim_and_write(output, "inference", "answers\n")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(artifacts, "sha256_file", unreadable)
    with pytest.raises(UserError, match=r"out.jsonl: cannot use this path \(permission denied\)"):
        claim_and_write(output, "inference", "again\n")
    assert output.read_text() == "answers\n"
