"""The output policy (qwen_sft/artifacts.py) and the one-line answers to bad files, folders and flags: no stage
replaces an input of its own run, a file or folder it did not write, or leaves a manifest describing another file."""

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ORCA, PUBMED, REPORTS, ROOT, one_line_error, run_script
from qwen_sft import artifacts
from qwen_sft.artifacts import (
    FILE,
    FOLDER,
    Output,
    atomic_directory,
    atomic_file,
    claim_outputs,
    clean_leftovers,
    manifest_path_for,
    sha256_file,
)
from qwen_sft.cli import UserError, parse_config
from qwen_sft.records import line_starts, read_records

ROW = {"instruction": "q", "input": "", "output": "a"}


def claim(outputs: list[Output], inputs: dict | None = None, stage: str = "export", overwrite: bool = False) -> dict:
    """claim_outputs for the outputs, released at once; returns where each would be written."""
    with claim_outputs(inputs or {}, outputs, stage, overwrite) as targets:
        return targets


def write_ours(folder: Path, files: dict[str, str]) -> None:
    with atomic_directory(folder) as temporary:
        for name, text in files.items():
            (temporary / name).write_text(text, encoding="utf-8")
        (temporary / "manifest.json").write_text('{"stage": "export"}', encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- folders


def test_a_folder_we_wrote_is_replaced_whole_and_the_users_files_are_carried_over(tmp_path, capsys):
    merged = tmp_path / "Qwen_finetuning_merged"
    write_ours(merged, {"model.safetensors": "v1", "Modelfile": "v1"})
    gguf = b"GGUF\x00" + os.urandom(4096)
    (merged / "model-q4_k_m.gguf").write_bytes(gguf)  # the README's llama.cpp step writes here
    (merged / "notes").mkdir()
    (merged / "notes" / "todo.txt").write_text("mine", encoding="utf-8")

    write_ours(merged, {"model.safetensors": "v2"})  # a re-export without a Modelfile
    assert (merged / "model.safetensors").read_text() == "v2"
    assert not (merged / "Modelfile").exists()  # ours, and not written this time: gone with the old folder
    assert (merged / "model-q4_k_m.gguf").read_bytes() == gguf
    assert (merged / "notes" / "todo.txt").read_text() == "mine"
    assert json.loads((merged / "manifest.json").read_text())["files"] == {"model.safetensors": sha256_file(
        merged / "model.safetensors")}
    assert "did not write: model-q4_k_m.gguf, notes" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["Qwen_finetuning_merged"]  # no leftovers

    (merged / "Modelfile").write_text("the user's own", encoding="utf-8")
    write_ours(merged, {"model.safetensors": "v3", "Modelfile": "v3"})  # carried over again, not listed as ours
    assert (merged / "model-q4_k_m.gguf").read_bytes() == gguf
    assert (merged / "Modelfile").read_text() == "v3" and (merged / "Modelfile.user").read_text() == "the user's own"


def test_a_folder_we_did_not_write_is_refused_unless_overwrite(tmp_path):
    mywork = tmp_path / "mywork"
    mywork.mkdir()
    (mywork / "dataset.jsonl").write_text(json.dumps(ROW) + "\n", encoding="utf-8")
    adapter_dir = Output("--adapter_dir", mywork, FOLDER)
    with pytest.raises(UserError, match=r"--adapter_dir .*mywork: the folder exists and this toolkit did not write it "
                                        r"\(no manifest.json of ours\); .*--overwrite_output true"):
        claim([adapter_dir], stage="train")
    claim([adapter_dir], stage="train", overwrite=True)
    claim([Output("--adapter_dir", tmp_path / "new", FOLDER)], stage="train")  # missing: fine
    (tmp_path / "empty").mkdir()
    claim([Output("--adapter_dir", tmp_path / "empty", FOLDER)], stage="train")
    (mywork / "manifest.json").write_text("{}", encoding="utf-8")  # not ours: no stage
    with pytest.raises(UserError):
        claim([adapter_dir], stage="train")
    with pytest.raises(UserError, match="is a file, not a folder"):
        claim([Output("--output_dir", mywork / "dataset.jsonl", FOLDER)], stage="train", overwrite=True)

    with atomic_directory(mywork) as folder:  # with --overwrite_output: the user's files stay
        (folder / "adapter_config.json").write_text("{}", encoding="utf-8")
        (folder / "manifest.json").write_text('{"stage": "train"}', encoding="utf-8")
    assert (mywork / "dataset.jsonl").read_text(encoding="utf-8") == json.dumps(ROW) + "\n"
    assert (mywork / "manifest.json.user").read_text(encoding="utf-8") == "{}"  # the user's manifest.json, kept


def test_outputs_may_not_be_inputs_or_each_other(tmp_path):
    work = tmp_path / "work"
    (work / "adapter").mkdir(parents=True)
    output_dir = Output("--output_dir", work, FOLDER)
    with pytest.raises(UserError, match="--output_dir .*work is the input --adapter_dir"):
        claim([output_dir], {"--adapter_dir": str(work)})
    with pytest.raises(UserError, match="--output_dir .*work holds the input --adapter_dir"):
        claim([output_dir], {"--adapter_dir": str(work / "adapter")})
    with pytest.raises(UserError, match="--adapter_dir .*x and --tokenizer_dir .*x are the same or nested"):
        claim([Output("--adapter_dir", tmp_path / "x", FOLDER), Output("--tokenizer_dir", tmp_path / "x", FOLDER)])
    with pytest.raises(UserError, match="the same or nested"):
        claim([Output("--adapter_dir", tmp_path / "x", FOLDER), Output("--tokenizer_dir", tmp_path / "x/t", FOLDER)])
    link = tmp_path / "link.json"
    link.symlink_to(REPORTS)
    with pytest.raises(UserError, match="is the input"):  # another name for the same file
        claim([Output("--output_file", link)], {"--my_report_data_path": str(REPORTS)})
    claim([Output("--output_dir", tmp_path / "a", FOLDER)], {"--adapter_dir": str(tmp_path / "b")})


# ---------------------------------------------------------------------------------------------------- files


def test_an_output_file_we_did_not_write_or_that_was_changed_is_refused(tmp_path):
    output = tmp_path / "mix.jsonl"
    output_file = Output("--output_file", output, FILE)
    output.write_text("the user's own rows\n", encoding="utf-8")
    with pytest.raises(UserError, match="--output_file .*mix.jsonl: the file exists and this toolkit did not write"):
        claim([output_file], stage="t")
    claim([output_file], stage="t", overwrite=True)
    with atomic_file(output, manifest=lambda written: {"stage": "t", "output": {"sha256": sha256_file(written)}}) as f:
        f.write("ours\n")
    claim([output_file], stage="t")
    with pytest.raises(UserError, match=r"written by another stage \(t, says its manifest\), not by inference"):
        claim([output_file], stage="inference")
    output.write_text("ours, edited by hand\n", encoding="utf-8")
    with pytest.raises(UserError, match="or it was changed since"):
        claim([output_file], stage="t")
    with pytest.raises(UserError, match="is a folder"):
        claim([Output("--output_file", tmp_path, FILE)], stage="t", overwrite=True)


def describe(written):
    return {"stage": "t", "output": {"sha256": sha256_file(written)}}


def test_file_and_manifest_are_one_unit_when_the_manifest_or_a_rename_fails(tmp_path, monkeypatch):
    output = tmp_path / "mix.jsonl"
    with atomic_file(output, manifest=describe) as handle:
        handle.write("old\n")
    old_data, old_manifest = output.read_bytes(), manifest_path_for(output).read_bytes()

    def disk_full(written):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=r"mix.jsonl: cannot write \(the disk is full\); the previous output"):
        with atomic_file(output, manifest=disk_full) as handle:
            handle.write("new\n")
    assert output.read_bytes() == old_data and manifest_path_for(output).read_bytes() == old_manifest

    real_replace, calls = os.replace, []

    def killed_between_renames(source, destination):  # the data lands, then the process "dies"
        calls.append(destination)
        if len(calls) == 2:
            raise OSError(errno.EIO, "killed")
        real_replace(source, destination)

    monkeypatch.setattr(artifacts.os, "replace", killed_between_renames)
    with pytest.raises(UserError):
        with atomic_file(output, manifest=describe) as handle:
            handle.write("new\n")
    monkeypatch.undo()
    assert output.read_text() == "new\n"
    assert manifest_path_for(output).read_bytes() == old_manifest  # the old file kept it up to its last moment
    claim([Output("--output_file", output, FILE)], stage="t")  # the next run completes the swap, then claims
    assert json.loads(manifest_path_for(output).read_text())["output"]["sha256"] == sha256_file(output)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mix.jsonl", "mix.jsonl.manifest.json"]


def test_readers_say_when_a_file_does_not_match_its_manifest(tmp_path, capsys):
    dataset = tmp_path / "mix.jsonl"
    with atomic_file(dataset, manifest=describe) as handle:
        handle.write(json.dumps(ROW) + "\n")
    read_records(dataset)
    assert "warning" not in capsys.readouterr().out
    dataset.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n", encoding="utf-8")
    read_records(dataset)
    assert capsys.readouterr().out.strip().splitlines() == [
        f"warning: {dataset} does not match its manifest {manifest_path_for(dataset)} (sha256 differs): the file was "
        "changed after it was written, so the manifest's counts do not describe it"
    ]


def test_leftovers_of_dead_processes_are_cleaned_and_a_half_swapped_folder_restored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".mix.jsonl.partial-{pid}").write_text("half")
    (tmp_path / f".mix.jsonl.partial-{os.getpid()}").write_text("a live run's")  # this process: kept
    (tmp_path / f".adapter.partial-{pid}").mkdir()
    old = tmp_path / f".adapter.old-{pid}"
    old.mkdir()
    (old / "adapter_config.json").write_text("{}")
    clean_leftovers(tmp_path / "mix.jsonl")
    clean_leftovers(tmp_path / "adapter")
    assert sorted(path.name for path in tmp_path.iterdir()) == [f".mix.jsonl.partial-{os.getpid()}", "adapter"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------------------------------- records


def test_json_array_line_numbers_take_linear_time(tmp_path):
    """Each row's line is found by binary search over line starts computed once, not by counting newlines from
    the start of the file for every row (507 s for these 100,000 rows)."""
    rows = [dict(ROW, instruction=f"q{i}") for i in range(100_000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    started = time.perf_counter()
    records = read_records(path)
    elapsed = time.perf_counter() - started
    assert len(records) == 100_000 and elapsed < 3, elapsed  # ~0.6 s here
    assert line_starts("a\nb\n\nc") == [0, 2, 4, 5]


@pytest.mark.parametrize("name", ["bom.json", "bom.jsonl"])
def test_a_byte_order_mark_is_accepted_and_lines_still_count_from_1(tmp_path, name):
    def with_bom(rows) -> bytes:
        text = json.dumps(rows, indent=1) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
        return b"\xef\xbb\xbf" + text.encode()

    path = tmp_path / name
    path.write_bytes(with_bom([ROW, {"instruction": "x"}]))
    line = 7 if name.endswith(".json") else 2  # the array: "[", then 5 lines of the first row
    with pytest.raises(UserError, match=rf"{name}:{line}: field \"output\" is missing"):
        read_records(path)
    path.write_bytes(with_bom([ROW, ROW]))
    assert len(read_records(path)) == 2


def test_a_bom_json_array_source_blames_the_right_line(tmp_path):
    rows = [json.loads(line) for line in ORCA.read_text(encoding="utf-8").splitlines()]
    rows[2] = {"conversations": "text"}  # line 4, after "[" and two rows
    source = tmp_path / "orca.json"
    source.write_bytes(b"\xef\xbb\xbf" + ("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n").encode())
    result = run_script("data_integration.py", "--my_report_data_path", REPORTS, "--sources",
                        f"orca={source},pubmed={PUBMED}", "--ratios", "reports=0,orca=1,pubmed=0", "--total_samples",
                        5, "--fatal_bad_rows", "true", "--output_file", tmp_path / "mix.jsonl")
    one_line_error(result, f"orca: {source}:4: not in the SlimOrca schema")


def test_a_folder_given_as_a_file_is_named_as_a_folder(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}: is a folder, not a file"):
        read_records(tmp_path)


# ---------------------------------------------------------------------------------------------------- flags


def config_of(tmp_path, argv, **constants):
    script = tmp_path / "stage.py"
    script.write_text("".join(f"{name} = {value!r}  # {name.lower()}\n" for name, value in constants.items()))
    return parse_config({"__file__": str(script), **constants}, argv, quiet=True)


def test_repeated_flags_and_keys_are_errors_that_name_them(tmp_path):
    ratios = {"reports": 0.5, "orca": 0.5}
    with pytest.raises(UserError, match="--seed is given more than once"):
        config_of(tmp_path, ["--seed", "1", "--seed", "2"], SEED=42)
    with pytest.raises(UserError, match="--ratios names 'orca' more than once"):
        config_of(tmp_path, ["--ratios", "orca=0.5,orca=0.5"], RATIOS=ratios)
    with pytest.raises(UserError, match="--ratios names 'orca' more than once"):
        config_of(tmp_path, ["--ratios", '{"orca": 0.5, "orca": 0.5}'], RATIOS=ratios)
    assert config_of(tmp_path, ["--ratios", "orca=1"], RATIOS=ratios).RATIOS == {"orca": 1.0}


def test_a_value_starting_with_two_dashes_is_passed_with_equals(tmp_path):
    assert config_of(tmp_path, ["--instruction=--foo bar"], INSTRUCTION="x").INSTRUCTION == "--foo bar"
    with pytest.raises(UserError, match=r"--instruction needs a value \(one that starts with -- is passed as "
                                        r"--instruction=VALUE\)"):
        config_of(tmp_path, ["--instruction", "--foo"], INSTRUCTION="x", FOO="y")


# ---------------------------------------------------------------------------------------------------- inference, chat


def test_a_prompt_beyond_the_models_context_is_refused_and_the_answer_budget_trimmed(capsys):
    from qwen_sft.inference import fit_context

    assert fit_context([100, 200], 512, 32_768, ["a:1", "a:2"]) == 512
    assert fit_context([100, 32_500], 512, 32_768, ["a:1", "a:2"]) == 268
    assert "max_new_tokens lowered from 512 to 268: the longest prompt (a:2) is 32,500 tokens" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"a:2: the prompt is 200,000 tokens but the model's context is 32,768 "
                                        r"\(max_position_embeddings\); shorten it"):
        fit_context([100, 200_000], 512, 32_768, ["a:1", "a:2"])
    assert fit_context([200_000], 512, None, ["x"]) == 512  # a model that does not say


def test_chat_reads_lines_that_are_not_utf8_and_runs_only_known_commands(monkeypatch, capsys):
    import io

    from qwen_sft.chat import is_command, read_line

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\ncaf\xe9 \xff\n"), encoding="utf-8"))
    assert read_line() == "hello"
    assert read_line() == "caf\ufffd \ufffd"
    assert "that line was not UTF-8 text" in capsys.readouterr().out
    assert is_command("/save x.jsonl") and is_command("/help") and is_command("/system be brief")
    assert not is_command("/usr/bin 是什么") and not is_command("/etc/hosts")


def test_chat_save_to_a_file_that_is_not_utf8_is_refused_and_the_file_kept(tmp_path):
    from transformers import AutoTokenizer

    from qwen_sft.chat import ChatSession, run_command
    from qwen_sft.tiny import tiny_path

    target = tmp_path / "latin1.txt"
    target.write_bytes(b"caf\xe9\n")
    session = ChatSession(AutoTokenizer.from_pretrained(tiny_path()), "system", 4096, 512)
    session.add("q", "a", complete=True)
    with pytest.raises(UserError, match="latin1.txt is not UTF-8 text .byte 3., so rows cannot be appended"):
        session.save(target)
    run_command(session, f"/save {target}")  # the session goes on
    assert target.read_bytes() == b"caf\xe9\n" and session.unsaved


@pytest.mark.slow
def test_inference_refuses_a_prompt_longer_than_the_context_in_one_line(learned_adapter, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": "hi"}) + "\n" + json.dumps({"instruction": "总结", "input":
                       "word " * 40_000}) + "\n", encoding="utf-8")
    result = run_script("inference.py", "--adapter_dir", learned_adapter / "Qwen_finetuning_model",
                        "--instruction_file", prompts, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1 and re.fullmatch(
        rf"error: {re.escape(str(prompts))}:2: the prompt is \d+,\d{{3}} tokens but the model's context is 32,768 "
        r"\(max_position_embeddings\); shorten it", lines[0]), lines
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prompts.jsonl"]


@pytest.mark.slow
def test_piped_chat_survives_bytes_that_are_not_utf8(learned_adapter, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "chat.py"), "--adapter_dir", str(learned_adapter / "Qwen_finetuning_model"),
         "--max_new_tokens", "8", "--temperature", "0"],
        input=b"hello\ncaf\xe9 \xff\n/usr/bin \xe6\x98\xaf\xe4\xbb\x80\xe4\xb9\x88\n", capture_output=True,
        cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stdout = result.stdout.decode()
    assert stdout.count("助手> ") == 3  # hello, the Latin-1 line and "/usr/bin 是什么" were all answered
    assert "[that line was not UTF-8 text; its undecodable bytes are shown as \ufffd]" in stdout
    assert b"Traceback" not in result.stderr


@pytest.mark.slow
def test_re_exporting_keeps_the_gguf_files_the_readme_puts_in_the_merged_folder(learned_adapter, tmp_path):
    adapter = learned_adapter / "Qwen_finetuning_model"
    first = run_script("export_model.py", "--adapter_dir", adapter, "--dtype", "float32", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    gguf = tmp_path / "Qwen_finetuning_merged" / "qwen-ft-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(10_000))
    data = gguf.read_bytes()
    second = run_script("export_model.py", "--adapter_dir", adapter, "--dtype", "float32", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert gguf.read_bytes() == data and "did not write: qwen-ft-Q4_K_M.gguf" in second.stdout
    files = json.loads((tmp_path / "Qwen_finetuning_merged" / "manifest.json").read_text())["files"]
    assert "config.json" in files and "qwen-ft-Q4_K_M.gguf" not in files
    assert sorted(path.name for path in tmp_path.iterdir()) == ["Qwen_finetuning_merged"]
