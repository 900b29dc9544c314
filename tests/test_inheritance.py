"""Later stages inherit what training fixed: `auto` settings come from the adapter's manifest, an explicit value
that differs from training's prints one line, an older manifest falls back to today's defaults with a line, and
`auto` without a manifest is one line with exit code 2."""

import inspect
import io
import json
import runpy
import sys

import pytest
from transformers import AutoTokenizer

from conftest import FIXTURES, ROOT, run_script
from qwen_sft.cli import parse_config
from qwen_sft.data import split_records
from qwen_sft.inherit import TRAINING_DEFAULTS, inherit_from_adapter
from qwen_sft.records import read_records
from qwen_sft.template import DEFAULT_SYSTEM_PROMPT, build_messages

SYSTEM = "You are X, a terse test assistant."
LENGTH = 1024
STAGES = ("evaluate.py", "inference.py", "chat.py", "export_model.py")


def stage_config(script: str, argv: list[str]):
    """The stage's config as its main() resolves it (the script's constants, the flags, the adapter's manifest)."""
    return parse_config(runpy.run_path(str(ROOT / script)), argv, resolve=inherit_from_adapter)


def fake_adapter(folder, config: dict | None, **top_level):
    """An adapter folder whose manifest records `config` (None: no manifest.json at all)."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny"}), encoding="utf-8")
    if config is not None:
        manifest = {"stage": "train", "base_model": "tiny", **top_level, "config": config}
        (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def test_the_fallbacks_are_the_training_stages_defaults():
    training = runpy.run_path(str(ROOT / "Qwen_finetuning.py"))
    assert TRAINING_DEFAULTS == {name: training[name] for name in TRAINING_DEFAULTS}


@pytest.mark.parametrize("script", STAGES)
def test_no_stage_after_training_declares_what_training_fixed(script):
    constants = runpy.run_path(str(ROOT / script))
    inherited = [name for name in (*TRAINING_DEFAULTS, "MAX_CONTEXT_TOKENS") if name in constants]
    assert "SYSTEM_PROMPT" in inherited and "BASE_MODEL" in inherited
    assert all(constants[name] == "auto" for name in inherited), {name: constants[name] for name in inherited}


def test_auto_takes_the_manifests_values_and_the_config_says_so(tmp_path, capsys):
    adapter = fake_adapter(tmp_path / "adapter", {"SYSTEM_PROMPT": SYSTEM, "MAX_SEQ_LENGTH": LENGTH, "EVAL_RATIO": 0.25,
                                                  "SPLIT_SEED": 7, "DATASET_PATH": "data.jsonl"}, load_in_4bit=False)
    cfg = stage_config("evaluate.py", ["--adapter_dir", str(adapter)])
    assert (cfg.system_prompt, cfg.max_seq_length, cfg.eval_ratio, cfg.split_seed, cfg.dataset_path) == (
        SYSTEM, LENGTH, 0.25, 7, "data.jsonl")
    assert (cfg.load_in_4bit, cfg.base_model, cfg.generation_seed) == (False, "tiny", 42)
    out = capsys.readouterr().out
    for line in (f"SYSTEM_PROMPT = {SYSTEM}   (from the adapter)", f"MAX_SEQ_LENGTH = {LENGTH}   (from the adapter)",
                 "SPLIT_SEED = 7   (from the adapter)", "LOAD_IN_4BIT = false   (from the adapter)",
                 "BASE_MODEL = tiny   (from the adapter)", "GENERATION_SEED = 42\n"):
        assert line in out
    assert "warning" not in out and "note" not in out
    # chat's context budget is training's sequence length
    assert stage_config("chat.py", ["--adapter_dir", str(adapter)]).max_context_tokens == LENGTH


def test_an_explicit_value_that_differs_from_training_prints_one_line(tmp_path, capsys):
    adapter = fake_adapter(tmp_path / "adapter", {"SYSTEM_PROMPT": SYSTEM, "MAX_SEQ_LENGTH": LENGTH})
    cfg = stage_config("inference.py", ["--adapter_dir", str(adapter), "--max_seq_length", "512",
                                        "--system_prompt", SYSTEM])
    assert cfg.max_seq_length == 512 and cfg.system_prompt == SYSTEM  # parsed with training's type
    out = capsys.readouterr().out
    assert "MAX_SEQ_LENGTH = 512   (from the command line)" in out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --max_seq_length 512 differs from the 1024 the adapter was trained with "
                        "(MAX_SEQ_LENGTH); pass --max_seq_length auto to inherit it"]  # the same prompt: no line


def test_an_older_manifest_without_a_key_falls_back_with_one_line(tmp_path, capsys):
    adapter = fake_adapter(tmp_path / "adapter", {"MAX_SEQ_LENGTH": LENGTH})  # no SYSTEM_PROMPT, no load_in_4bit
    cfg = stage_config("chat.py", ["--adapter_dir", str(adapter)])
    assert cfg.system_prompt == DEFAULT_SYSTEM_PROMPT and cfg.load_in_4bit is True and cfg.max_context_tokens == LENGTH
    out = capsys.readouterr().out
    assert "LOAD_IN_4BIT = true   (today's default: the adapter's manifest does not record it)" in out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {adapter / 'manifest.json'} does not record SYSTEM_PROMPT, LOAD_IN_4BIT (an older "
                     "version wrote it); today's defaults are used, marked in the config above"]


def test_explicit_values_need_no_manifest(tmp_path):
    adapter = fake_adapter(tmp_path / "adapter", None)
    cfg = stage_config("export_model.py", ["--adapter_dir", str(adapter), "--system_prompt", SYSTEM,
                                           "--max_seq_length", "512"])
    assert (cfg.system_prompt, cfg.max_seq_length, cfg.base_model) == (SYSTEM, 512, "tiny")  # base: adapter_config


def test_the_loaders_take_every_setting_explicitly():
    """`auto` is settled at parse time only: a loader has no default to settle again from the manifest."""
    from qwen_sft.fast_generation import load_generation_model
    from qwen_sft.modeling import load_adapter_model

    for loader in (load_adapter_model, load_generation_model):
        parameters = inspect.signature(loader).parameters
        for name in ("base_model", "backend", "load_in_4bit", "max_seq_length"):
            assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, (loader.__name__, name)
            assert parameters[name].default is inspect.Parameter.empty, (loader.__name__, name)


@pytest.fixture
def untrained_adapter(tmp_path):
    """A LoRA on the tiny model, saved as training saves one (adapter, tokenizer with its template, manifest)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_sft.tiny import tiny_path

    folder = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path()),
                   LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_path()).save_pretrained(folder)
    manifest = {"stage": "train", "base_model": "tiny", "load_in_4bit": False,
                "config": {**TRAINING_DEFAULTS, "SYSTEM_PROMPT": SYSTEM, "MAX_SEQ_LENGTH": LENGTH}}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


@pytest.mark.parametrize("script", ["inference.py", "chat.py"])
def test_a_stage_reads_the_adapters_manifest_once(script, untrained_adapter, tmp_path, monkeypatch):
    """Parse time reads it and settles `auto`; the stage and the loaders use what it read."""
    import qwen_sft.adapter_manifest as adapter_manifest

    reads, read = [], adapter_manifest._read_json_object
    monkeypatch.setattr(adapter_manifest, "_read_json_object", lambda path: reads.append(path.name) or read(path))
    (tmp_path / "prompts.jsonl").write_text('{"instruction": "hi"}\n', encoding="utf-8")
    flags = {"inference.py": ["--instruction_file", "prompts.jsonl", "--output_file", "answers.jsonl"],
             "chat.py": ["--history_file", ""]}[script]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # chat: end of input at once
    monkeypatch.setattr(sys, "argv", [script, "--adapter_dir", str(untrained_adapter), "--max_new_tokens", "2",
                                      "--backend", "hf", *flags])
    runpy.run_path(str(ROOT / script), run_name="__main__")
    assert reads == ["manifest.json"]


FLAGS = "--system_prompt, --load_in_4bit, --max_seq_length"
BAD_AUTO_INPUT = {  # case: (the adapter's manifest config, None = no manifest, "none" = no adapter; flags; the line)
    "no manifest": (None, [], f"{{adapter}}/manifest.json: not found, so {FLAGS} cannot be inherited from training "
                              f"(auto); put the manifest back, or give {FLAGS} the values the adapter was trained with"),
    "no adapter": ("none", [], "{adapter}: no LoRA adapter there; run Qwen_finetuning.py first (or pass --adapter_dir)"),
    "a manifest value of the wrong type": ({"MAX_SEQ_LENGTH": "long"}, [],
                                           "{adapter}/manifest.json: config MAX_SEQ_LENGTH is 'long', not an "
                                           "integer; restore the file from training, or pass --max_seq_length"),
    "a bad flag value": ({}, ["--load_in_4bit", "maybe"],
                         "--load_in_4bit expects true or false, got 'maybe' (or auto: as the adapter was trained)"),
}


@pytest.mark.parametrize("case", BAD_AUTO_INPUT)
def test_bad_auto_input_is_one_line_exit_2(case, tmp_path):
    config, flags, message = BAD_AUTO_INPUT[case]
    adapter = tmp_path / "adapter"
    if config != "none":
        fake_adapter(adapter, config)
    result = run_script("inference.py", "--adapter_dir", adapter, *flags, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"error: {message.format(adapter=adapter)}"]
    assert "config:" not in result.stdout  # nothing half-resolved is printed


# ------------------------------------------------------------------- trained with --system_prompt X, 1024 tokens


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step tiny run with a system prompt and sequence length of its own, and a quarter held out."""
    workdir = tmp_path_factory.mktemp("inherit")
    result = run_script(
        "Qwen_finetuning.py", "--base_model", "tiny", "--load_in_4bit", "false", "--max_steps", "1",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--optim", "adamw_torch",
        "--gradient_checkpointing", "false", "--eval_ratio", "0.25", "--dataset_path", FIXTURES / "learning_20.jsonl",
        "--system_prompt", SYSTEM, "--max_seq_length", LENGTH, cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def full_lengths(tokenizer, records, system_prompt):
    return sorted(len(tokenizer(tokenizer.apply_chat_template(build_messages(record, system_prompt, with_answer=True),
                                                              tokenize=False).removesuffix("\n"),
                                add_special_tokens=False)["input_ids"]) for record in records)


@pytest.mark.slow
def test_evaluate_with_no_flags_uses_trainings_prompt_length_and_split(trained):
    result = run_script("evaluate.py", "--max_new_tokens", "2", "--compare_base", "false", cwd=trained)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in (f"SYSTEM_PROMPT = {SYSTEM}   (from the adapter)", f"MAX_SEQ_LENGTH = {LENGTH}   (from the adapter)",
                 "EVAL_RATIO = 0.25   (from the adapter)", "SPLIT_SEED = 42   (from the adapter)",
                 f"DATASET_PATH = {FIXTURES / 'learning_20.jsonl'}   (from the adapter)"):
        assert line in result.stdout
    assert "warning" not in result.stdout
    metrics = json.loads((trained / "evaluation_results" / "metrics.json").read_text(encoding="utf-8"))
    _, eval_records = split_records(read_records(FIXTURES / "learning_20.jsonl"), 0.25, 42)
    assert metrics["dataset"]["eval_rows"] == len(eval_records) == 5
    # The samples were built with X: their token lengths are those of X's conversations, not the default prompt's.
    tokenizer = AutoTokenizer.from_pretrained(trained / "Qwen_finetuning_model")
    lengths = full_lengths(tokenizer, eval_records, SYSTEM)
    assert lengths != full_lengths(tokenizer, eval_records, DEFAULT_SYSTEM_PROMPT)
    assert (metrics["length_stats"]["min"], metrics["length_stats"]["max"]) == (lengths[0], lengths[-1])
    assert metrics["config"]["SYSTEM_PROMPT"] == SYSTEM and metrics["config"]["MAX_SEQ_LENGTH"] == LENGTH


@pytest.mark.slow
def test_chat_with_no_flags_prompts_with_x_within_1024_tokens(trained):
    long_message = "token " * 1100  # over the 1024 - 4 prompt tokens the inherited budget leaves
    result = run_script("chat.py", "--show_prompt", "--max_new_tokens", "4", "--history_file", "", cwd=trained,
                        input_text=f"hello\n{long_message}\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"MAX_CONTEXT_TOKENS = {LENGTH}   (from the adapter)" in result.stdout
    assert f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nhello<|im_end|>" in result.stdout
    assert f"max_context_tokens leaves {LENGTH - 4} beside max_new_tokens" in result.stdout


@pytest.mark.slow
def test_inference_with_no_flags_uses_x_and_1024(trained, monkeypatch, capsys):
    import qwen_sft.inference as inference

    seen = {}

    def load(*args, **kwargs):
        seen["load"] = (args, kwargs)
        return load_generation_model(*args, **kwargs)

    def generate(model, tokenizer, conversations, **kwargs):
        seen["conversations"] = conversations
        return generate_batch(model, tokenizer, conversations, **kwargs)

    load_generation_model, generate_batch = inference.load_generation_model, inference.generate_batch
    monkeypatch.setattr(inference, "load_generation_model", load)
    monkeypatch.setattr(inference, "generate_batch", generate)
    (trained / "prompts.jsonl").write_text('{"instruction": "hi"}\n', encoding="utf-8")
    monkeypatch.chdir(trained)
    monkeypatch.setattr(sys, "argv", ["inference.py", "--instruction_file", "prompts.jsonl", "--max_new_tokens", "2",
                                      "--output_file", "answers.jsonl"])
    runpy.run_path(str(ROOT / "inference.py"), run_name="__main__")
    args, kwargs = seen["load"]
    assert (kwargs["load_in_4bit"], kwargs["max_seq_length"], kwargs["base_model"]) == (False, LENGTH, "tiny")
    assert seen["conversations"][0][0] == {"role": "system", "content": SYSTEM}
    assert f"SYSTEM_PROMPT = {SYSTEM}   (from the adapter)" in capsys.readouterr().out


@pytest.mark.slow
def test_export_with_no_flags_writes_x_and_1024_into_the_modelfile(trained):
    result = run_script("export_model.py", "--dtype", "float32", cwd=trained)
    assert result.returncode == 0, result.stderr[-3000:]
    modelfile = (trained / "Qwen_finetuning_merged" / "Modelfile").read_text(encoding="utf-8").splitlines()
    assert f'SYSTEM """{SYSTEM}"""' in modelfile and f"PARAMETER num_ctx {LENGTH}" in modelfile
