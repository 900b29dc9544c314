"""Named presets (`--preset NAME`): each sets its flag group, flags given win, and an unknown name is one line."""

import pytest

from conftest import ROOT, run_script
from qwen_sft.cli import FROM_COMMAND_LINE, UserError, _constant_comments, parse_config
from qwen_sft.presets import PRESETS, apply_preset, with_preset

SCRIPTS = {"training": "Qwen_finetuning.py", "evaluate": "evaluate.py", "inference": "inference.py",
           "chat": "chat.py"}


def test_preset_sets_its_flags_but_command_line_flags_win_and_the_config_says_which():
    values = {"PRESET": "h200_fast", "PACKING": False, "GRADIENT_CHECKPOINTING": True,
              "PER_DEVICE_TRAIN_BATCH_SIZE": 2, "GRADIENT_ACCUMULATION_STEPS": 1}
    notes = {"PRESET": FROM_COMMAND_LINE, "GRADIENT_ACCUMULATION_STEPS": FROM_COMMAND_LINE}
    assert with_preset("training")(values, notes) == []
    assert values == {"PRESET": "h200_fast", "PACKING": True, "GRADIENT_CHECKPOINTING": False,
                      "PER_DEVICE_TRAIN_BATCH_SIZE": 4, "GRADIENT_ACCUMULATION_STEPS": 1}
    assert notes["PACKING"] == "preset h200_fast" and notes["GRADIENT_ACCUMULATION_STEPS"] == FROM_COMMAND_LINE


def test_the_preset_is_applied_before_the_next_hook_and_printed_in_the_config(capsys):
    seen = {}
    script = {"__file__": str(ROOT / "Qwen_finetuning.py")}
    exec(compile((ROOT / "Qwen_finetuning.py").read_text(encoding="utf-8").split("\ndef main")[0], "stage", "exec"),
         script)
    cfg = parse_config(script, ["--preset", "tiny_cpu", "--max_steps", "5"],
                       resolve=with_preset("training", then=lambda values, notes: seen.update(values) or []))
    assert seen["BASE_MODEL"] == "tiny" and cfg.max_steps == 5 and cfg.load_in_4bit is False
    assert "  BASE_MODEL = tiny   (preset tiny_cpu)" in capsys.readouterr().out


def test_tiny_cpu_is_the_tiny_run_in_fp32_and_greedy_turns_penalties_off():
    values = {"PRESET": "tiny_cpu", "BASE_MODEL": "Qwen/Qwen2.5-7B-Instruct", "LOAD_IN_4BIT": True,
              "OPTIM": "adamw_8bit", "GRADIENT_CHECKPOINTING": True, "MAX_STEPS": 5, "EVAL_STEPS": 50,
              "SAVE_STEPS": 50, "LOGGING_STEPS": 10}
    apply_preset(values, {"MAX_STEPS": FROM_COMMAND_LINE}, "training")
    assert values == {"PRESET": "tiny_cpu", "BASE_MODEL": "tiny", "LOAD_IN_4BIT": False, "OPTIM": "adamw_torch",
                      "GRADIENT_CHECKPOINTING": False, "MAX_STEPS": 5, "EVAL_STEPS": 10, "SAVE_STEPS": 10,
                      "LOGGING_STEPS": 10}
    values = {"PRESET": "greedy", "TEMPERATURE": 0.8, "REPETITION_PENALTY": 1.3, "NO_REPEAT_NGRAM_SIZE": 3}
    apply_preset(values, {}, "chat")
    assert (values["TEMPERATURE"], values["REPETITION_PENALTY"], values["NO_REPEAT_NGRAM_SIZE"]) == (0.0, 1.0, 0)


def test_none_changes_nothing_and_a_preset_of_another_stage_is_refused():
    values = {"PRESET": "none", "TEMPERATURE": 0.8}
    apply_preset(values, {}, "inference")
    assert values == {"PRESET": "none", "TEMPERATURE": 0.8}
    with pytest.raises(UserError, match="^--preset must be none or one of greedy, got 'tiny_cpu'$"):
        apply_preset({"PRESET": "tiny_cpu"}, {}, "inference")


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
