"""Generated flag values for every stage script (NaN, inf, negatives, huge, empty, Unicode, text of any kind): the
stage either runs or stops with one line (a UserError, exit code 2), never a traceback.

In-process, each script's main() runs with the model load replaced by a stop (ReachedModelLoad): everything a
stage checks happens before it loads a model (settings.RULES, planning, the output policy, the inputs), so that is
where a bad value must be caught. Values that get through must then pass the libraries' own checks (numpy's seeds,
transformers' decoding processors and training arguments, PEFT's LoRA config), as the model stage would meet them.
A few end-to-end runs with the tiny model back that up.
"""

import contextlib
import importlib
import json
import os
import runpy
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qwen_sft.cli
from conftest import FIXTURES, ROOT, run_script, without_flags
from qwen_sft.cli import UserError, parse_config
from qwen_sft.inherit import TRAINING_DEFAULTS

HUB = FIXTURES / "hub"
ODD_VALUES = ["nan", "inf", "-inf", "NaN", "1e309", "-1e309", "-1", "0", "-0", "0.0", "-0.5", "1e-320", "2147483648",
              "4294967296", "9" * 40, "", " ", "auto", "none", "true", "false", "-", "[]", "{}", "[1]", "[null]",
              '{"a": 1}', "a=b", "=", ",", ",,", "é", "日本語", "\u2028", "\u200b", "\x1b[31m", "\x7f", "💥",
              "tiny", ".", ".."]
VALUE = st.one_of(st.sampled_from(ODD_VALUES), st.integers().map(str),
                  st.floats(allow_nan=True, allow_infinity=True).map(str),
                  st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12))
# A path flag's value stays inside the temporary folder the example runs in (an output could be written there).
PATH_VALUE = VALUE.filter(lambda text: "/" not in text and not text.startswith("~"))


class ReachedModelLoad(Exception):
    """The stage got past every check, to where it loads a model (or draws a mix): the values were accepted."""


def stop(*args, **kwargs):
    raise ReachedModelLoad


MODEL_LOADS = {  # where each stage leaves its checks for the slow part
    "data_integration.py": "qwen_sft.mix.stage._draw_in_parallel",
    "data_set_generation.py": "qwen_sft.mix.stage._draw_in_parallel",
    "Qwen_finetuning.py": "qwen_sft.training.load_model",
    "evaluate.py": "qwen_sft.fast_generation.load_generation_model",
    "inference.py": "qwen_sft.inference.load_generation_model",
    "chat.py": "qwen_sft.chat.load_generation_model",
    "export_model.py": "qwen_sft.export.load_adapter_tokenizer",
}
BASE_FLAGS = {  # what makes each stage reach its model load from the example's folder (see workdir)
    "data_integration.py": ["--my_report_data_path", "mine.json", "--total_samples", "10", "--sources",
                            f"orca={HUB / 'slimorca.jsonl'},pubmed={HUB / 'pubmedqa_pqa_labeled.jsonl'}"],
    "data_set_generation.py": ["--my_report_data_path", "mine.json", "--total_samples", "10"],
    "Qwen_finetuning.py": ["--dataset_path", "data.jsonl", "--preset", "tiny_cpu"],
    "evaluate.py": ["--adapter_dir", "adapter"],
    "inference.py": ["--adapter_dir", "adapter"],
    "chat.py": ["--adapter_dir", "adapter"],
    "export_model.py": ["--adapter_dir", "adapter"],
}


def make_workdir(folder: Path) -> None:
    shutil.copy(FIXTURES / "learning_20.jsonl", folder / "data.jsonl")
    shutil.copy(HUB / "reports.json", folder / "mine.json")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "tiny"}', encoding="utf-8")
    config = {**TRAINING_DEFAULTS, "DATASET_PATH": "data.jsonl", "MAX_SEQ_LENGTH": 1024}
    manifest = {"stage": "train", "base_model": "tiny", "load_in_4bit": False, "config": config}
    (folder / "adapter" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


@contextlib.contextmanager
def in_fresh_folder():
    before = Path.cwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            make_workdir(Path(folder))
            yield
        finally:
            os.chdir(before)


def the_libraries_accept(cfg) -> None:
    """What the model stage would do first with the accepted values, without a model: the libraries' own checks of
    seeds, decoding settings (also export's Modelfile values), and training and LoRA arguments. Raises if one
    refuses a value that the stage's checks let through."""
    import numpy as np
    from transformers.generation.logits_process import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    for name in ("SEED", "SPLIT_SEED", "GENERATION_SEED"):
        if name in cfg:
            np.random.seed(cfg[name])  # transformers.set_seed seeds numpy so
    if "TEMPERATURE" in cfg and cfg.TEMPERATURE != 0:
        TemperatureLogitsWarper(cfg.TEMPERATURE)
        TopPLogitsWarper(cfg.TOP_P)
    if "REPETITION_PENALTY" in cfg:
        RepetitionPenaltyLogitsProcessor(cfg.REPETITION_PENALTY)
    if cfg.get("NO_REPEAT_NGRAM_SIZE", 0) != 0:
        NoRepeatNGramLogitsProcessor(cfg.NO_REPEAT_NGRAM_SIZE)
    if "OPTIM" in cfg:
        from peft import LoraConfig

        from qwen_sft.training import sft_config

        sft_config(cfg, has_eval=True)
        LoraConfig(r=cfg.LORA_R, lora_alpha=cfg.LORA_ALPHA, lora_dropout=cfg.LORA_DROPOUT,
                   target_modules=cfg.LORA_TARGET_MODULES)


def run_checks(script: str, flags: list[str], monkeypatch) -> str:
    """'accepted' (and the libraries accept the values too) or 'refused' (one line); anything else raises."""
    module, _, name = MODEL_LOADS[script].rpartition(".")
    monkeypatch.setattr(importlib.import_module(module), name, stop)
    configs = []
    monkeypatch.setattr(qwen_sft.cli, "parse_config", lambda *args, **kwargs: configs.append(
        parse_config(*args, **kwargs)) or configs[-1])
    main = runpy.run_path(str(ROOT / script))["main"]
    monkeypatch.setattr(sys, "argv", [script, *without_flags(BASE_FLAGS[script], flags), *flags])
    with in_fresh_folder():
        try:
            main()
        except ReachedModelLoad:
            the_libraries_accept(configs[0])
            return "accepted"
        except UserError as error:
            assert "\n" not in str(error) and str(error).strip(), repr(str(error))
            return "refused"
    return "accepted"


def flag_names(script: str) -> list[str]:
    constants = runpy.run_path(str(ROOT / script))
    return [name for name in constants if name.isupper() and not name.startswith("DEFAULT_")]


@pytest.mark.parametrize("script", list(MODEL_LOADS))
def test_the_base_flags_reach_the_model_load(script, monkeypatch):
    assert run_checks(script, [], monkeypatch) == "accepted"  # so a refusal below is the generated value's


@pytest.mark.parametrize("script", list(MODEL_LOADS))
def test_generated_flag_values_are_accepted_or_one_line(script, monkeypatch, capsys):
    names = flag_names(script)

    @st.composite
    def flags(draw):
        chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
        given_flags = []
        for name in chosen:
            path_like = name.endswith(("_DIR", "_PATH", "_FILE")) or name == "SOURCES"
            given_flags += [f"--{name.lower()}", draw(PATH_VALUE if path_like else VALUE)]
        return given_flags

    outcomes = []

    @settings(max_examples=100)
    @given(flags())
    def check(given_flags):
        outcomes.append(run_checks(script, given_flags, monkeypatch))
        capsys.readouterr()  # the printed configs

    check()
    print(f"{script}: {len(outcomes)} generated cases, {outcomes.count('refused')} refused in one line")
    assert "refused" in outcomes and "accepted" in outcomes  # the generator reaches both sides


@pytest.fixture(scope="module")
def quick_adapter(tmp_path_factory):
    """An adapter of the tiny model after two steps: enough to load and generate with."""
    workdir = tmp_path_factory.mktemp("quick")
    result = run_script("Qwen_finetuning.py", "--preset", "tiny_cpu", "--max_steps", 2, "--eval_ratio", 0,
                        "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 1, "--save_steps", 1000,
                        "--logging_steps", 1, "--dataset_path", FIXTURES / "learning_20.jsonl", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "Qwen_finetuning_model"


EDGE_VALUES = st.sampled_from(["0", "1", "1e-9", "0.999", "3", "1e6"])  # valid, at or near the ends of a range


@pytest.mark.slow
@settings(max_examples=6)
@example((("--temperature", "1e-9"), ("--top_p", "1e-9"), ("--repetition_penalty", "1e6"),
           ("--no_repeat_ngram_size", "1")))
@given(st.lists(st.sampled_from(["--temperature", "--top_p", "--repetition_penalty", "--no_repeat_ngram_size"]),
                min_size=1, max_size=4, unique=True).flatmap(
    lambda names: st.tuples(*[st.tuples(st.just(name), st.one_of(EDGE_VALUES, VALUE)) for name in names])))
def test_generated_decoding_values_end_to_end_answer_or_are_one_line(quick_adapter, given_flags):
    flags = [item for pair in given_flags for item in pair]
    result = run_script("inference.py", "--adapter_dir", quick_adapter, "--max_new_tokens", 8, *flags, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if result.returncode:
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --")
    else:
        assert "[answer]" in result.stdout
