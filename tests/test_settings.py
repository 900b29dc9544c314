"""Settings are checked against one table (qwen_sft/settings.py) before any model loads: flags, constants, presets and
values inherited from an adapter's manifest alike, with one line and exit code 2."""

import json
import runpy
import subprocess
import sys

import pytest

from conftest import FIXTURES, ROOT, one_line_error, run_script
from qwen_sft.cli import UserError, parse_config
from qwen_sft.inherit import inherit_from_adapter
from qwen_sft.settings import RULES

SCRIPTS = ("data_integration.py", "data_set_generation.py", "Qwen_finetuning.py", "evaluate.py", "inference.py",
           "chat.py", "export_model.py")
# Settings of a number type that the table leaves to the code that uses them (see settings.py's docstring).
CHECKED_WHERE_USED = {"RATIOS", "KEYWORDS", "SOURCES", "DOMAIN_SOURCES", "MAX_STEPS"}


def fake_adapter(folder, **config):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny"}), encoding="utf-8")
    manifest = {"stage": "train", "base_model": "tiny", "config": config}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_number_setting_has_a_rule_and_every_default_keeps_it(script):
    constants = {name: value for name, value in runpy.run_path(str(ROOT / script)).items()
                 if name.isupper() and not name.startswith("DEFAULT_")}
    numbers = {name for name, value in constants.items()
               if isinstance(value, (int, float, list)) and not isinstance(value, bool)}
    assert numbers - CHECKED_WHERE_USED <= set(RULES), numbers - set(RULES)
    refused = [name for name, value in constants.items()
               if name in RULES and value != "auto" and not RULES[name].holds(value)]
    assert not refused


def test_export_refuses_modelfile_values_no_model_can_use_before_loading(tmp_path):
    adapter = fake_adapter(tmp_path / "adapter", MAX_SEQ_LENGTH=64)
    result = run_script("export_model.py", "--adapter_dir", adapter, "--output_dir", tmp_path / "merged",
                        "--max_seq_length", 0, "--temperature", "nan", "--top_p", -3, "--repetition_penalty", "inf",
                        cwd=tmp_path, timeout=120)
    one_line_error(result, "--max_seq_length must be at least 1, got 0",
                   "--temperature must be 0 or more, got nan", "--top_p must be in (0, 1], got -3.0",
                   "--repetition_penalty must be a number above 0, got inf")
    assert "backend:" not in result.stdout  # no model was loaded
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]


INHERITED = [("evaluate.py", {"MAX_SEQ_LENGTH": -5}, "--max_seq_length"),
             ("evaluate.py", {"SPLIT_SEED": -1}, "--split_seed"),
             ("inference.py", {"MAX_SEQ_LENGTH": -5}, "--max_seq_length"),
             ("chat.py", {"MAX_SEQ_LENGTH": -5}, "--max_context_tokens"),
             ("export_model.py", {"MAX_SEQ_LENGTH": -5}, "--max_seq_length")]


@pytest.mark.parametrize("script, recorded, flag", INHERITED)
def test_a_value_inherited_from_the_manifest_is_checked_like_a_flag(tmp_path, script, recorded, flag):
    adapter = fake_adapter(tmp_path / "adapter", **recorded)
    constants = runpy.run_path(str(ROOT / script))
    with pytest.raises(UserError, match=f"{flag} must be .*, got -[15] \\(from {adapter / 'manifest.json'}: fix it"):
        parse_config(constants, ["--adapter_dir", str(adapter)], quiet=True, resolve=inherit_from_adapter)


@pytest.mark.parametrize("manifest_value", [None, "data.jsonl", 5])
def test_an_adapter_manifest_whose_dataset_is_not_an_object_is_one_line(tmp_path, manifest_value):
    adapter = fake_adapter(tmp_path / "adapter", MAX_SEQ_LENGTH=64)
    manifest = json.loads((adapter / "manifest.json").read_text(encoding="utf-8"))
    (adapter / "manifest.json").write_text(json.dumps({**manifest, "dataset": manifest_value}), encoding="utf-8")
    result = run_script("evaluate.py", "--adapter_dir", adapter, "--dataset_path", FIXTURES / "learning_20.jsonl",
                        "--output_dir", tmp_path / "eval", cwd=tmp_path, timeout=300)
    one_line_error(result, f"{adapter / 'manifest.json'}: dataset is {json.dumps(manifest_value)}, not a "
                           "JSON object", after_progress=True)


def test_lora_target_modules_the_model_lacks_are_one_line_before_training(tmp_path):
    result = run_script("Qwen_finetuning.py", "--preset", "tiny_cpu", "--dataset_path", FIXTURES / "learning_20.jsonl",
                        "--lora_target_modules", "q_proj,nonexistent_proj", cwd=tmp_path, timeout=300)
    one_line_error(result, "--lora_target_modules: the model has no module named nonexistent_proj; its linear "
                           "layers are down_proj, gate_proj, k_proj, ", after_progress=True)
    assert not (tmp_path / "Qwen_finetuning_model").exists() and not list((tmp_path / "outputs").glob("checkpoint-*"))


@pytest.mark.parametrize("files", [5, "notes.txt", [1], {"a": 1}])
def test_an_output_folder_manifest_with_a_malformed_file_list_claims_nothing(tmp_path, files):
    """A file list that is not what this toolkit writes makes no file ours: the rerun keeps the user's file."""
    from qwen_sft.artifacts import FOLDER, Output, atomic_directory, claim_outputs

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "manifest.json").write_text(json.dumps({"stage": "export", "files": files}), encoding="utf-8")
    (merged / "notes.txt").write_text("mine", encoding="utf-8")
    with claim_outputs({}, [Output("--output_dir", merged, FOLDER)], "export", overwrite=False) as targets:
        with atomic_directory(targets["--output_dir"]) as folder:
            (folder / "model.safetensors").write_bytes(b"weights")
            (folder / "manifest.json").write_text('{"stage": "export"}', encoding="utf-8")
    assert (merged / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (merged / "model.safetensors").read_bytes() == b"weights"


def test_the_common_names_are_valid_and_spare_the_library_import():
    """Each rule's common names are among its library's own, and the training defaults parse without importing
    transformers (4-5 s), so that a bad dataset is refused at once."""
    ruled = [rule for rule in RULES.values() if rule.common]
    assert ruled  # OPTIM and LR_SCHEDULER_TYPE
    for rule in ruled:
        assert set(rule.common) <= set(rule.choices())
    probe = ("import runpy, sys; from qwen_sft.cli import parse_config; "
             f"parse_config(runpy.run_path({str(ROOT / 'Qwen_finetuning.py')!r}), [], quiet=True); "
             "print('transformers' in sys.modules)")
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "False"
