"""Named presets (`--preset NAME`): each sets its flag group, flags given win, and an unknown name is one line."""

import pytest

from conftest import ROOT, run_script
from qwen_sft.cli import Config, UserError, _constant_comments
from qwen_sft.presets import PRESETS, apply_preset

SCRIPTS = {"training": "Qwen_finetuning.py", "evaluate": "evaluate.py", "inference": "inference.py",
           "chat": "chat.py"}


def test_preset_sets_its_flags_but_command_line_flags_win(capsys):
    cfg = Config(PRESET="h200_fast", PACKING=False, GRADIENT_CHECKPOINTING=True, PER_DEVICE_TRAIN_BATCH_SIZE=2,
                 GRADIENT_ACCUMULATION_STEPS=1)  # as parse_config resolved the flags below
    apply_preset(cfg, ["--preset", "h200_fast", "--gradient-accumulation-steps=1"], "training")
    assert cfg.packing is True and cfg.gradient_checkpointing is False
    assert cfg.per_device_train_batch_size == 4 and cfg.gradient_accumulation_steps == 1
    assert capsys.readouterr().out == (
        "preset h200_fast: --packing true --gradient_checkpointing false --per_device_train_batch_size 4\n")


def test_tiny_cpu_is_the_tiny_run_in_fp32_and_greedy_turns_penalties_off():
    cfg = Config(PRESET="tiny_cpu", BASE_MODEL="Qwen/Qwen2.5-7B-Instruct", LOAD_IN_4BIT=True, OPTIM="adamw_8bit",
                 GRADIENT_CHECKPOINTING=True, MAX_STEPS=5, EVAL_STEPS=50, SAVE_STEPS=50, LOGGING_STEPS=10)
    apply_preset(cfg, ["--preset=tiny_cpu", "--max_steps", "5"], "training")
    assert cfg == Config(PRESET="tiny_cpu", BASE_MODEL="tiny", LOAD_IN_4BIT=False, OPTIM="adamw_torch",
                         GRADIENT_CHECKPOINTING=False, MAX_STEPS=5, EVAL_STEPS=10, SAVE_STEPS=10, LOGGING_STEPS=10)
    cfg = Config(PRESET="greedy", TEMPERATURE=0.8, REPETITION_PENALTY=1.3, NO_REPEAT_NGRAM_SIZE=3)
    apply_preset(cfg, [], "chat")
    assert (cfg.temperature, cfg.repetition_penalty, cfg.no_repeat_ngram_size) == (0.0, 1.0, 0)


def test_none_changes_nothing_and_a_preset_of_another_stage_is_refused():
    cfg = Config(PRESET="none", TEMPERATURE=0.8)
    assert apply_preset(cfg, [], "inference") == Config(PRESET="none", TEMPERATURE=0.8)
    with pytest.raises(UserError, match="^--preset must be none or one of greedy, got 'tiny_cpu'$"):
        apply_preset(Config(PRESET="tiny_cpu"), [], "inference")


@pytest.mark.parametrize("stage", SCRIPTS)
def test_each_preset_sets_only_settings_its_script_has(stage):
    constants = _constant_comments((ROOT / SCRIPTS[stage]).read_text(encoding="utf-8"))
    assert "PRESET" in constants
    for name, values in PRESETS[stage].items():
        assert set(values) <= set(constants), (name, set(values) - set(constants))


@pytest.mark.parametrize("stage", SCRIPTS)
def test_unknown_preset_exits_2_with_one_line(stage, tmp_path):
    result = run_script(SCRIPTS[stage], "--preset", "fast", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: --preset must be none or one of {', '.join(PRESETS[stage])}, got 'fast'"
    assert not any(tmp_path.iterdir())
