"""Each default is written once: a value that two stage scripts share is a constant of qwen_sft/defaults.py (or
template.DEFAULT_SYSTEM_PROMPT) that both name, so that changing it in one place changes it everywhere."""

import ast
import runpy
from collections import defaultdict

from conftest import ROOT
from qwen_sft import defaults

STAGE_SCRIPTS = ("data_integration.py", "data_set_generation.py", "Qwen_finetuning.py", "evaluate.py",
                 "inference.py", "chat.py", "export_model.py")
# Values that say "off" or "decide later" rather than choose something, so they are not shared defaults
NEUTRAL = {False, True, "auto", "none", ""}


def literal_constants(script: str) -> dict[str, object]:
    """The script's UPPER_CASE constants whose value is written as a literal in it."""
    constants = {}
    for node in ast.parse((ROOT / script).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper():
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # a name (defaults.X) or an expression: not a literal
                pass
    return constants


def test_no_two_stage_scripts_write_the_same_default():
    writers = defaultdict(list)
    for script in STAGE_SCRIPTS:
        for name, value in literal_constants(script).items():
            if not (isinstance(value, (bool, str)) and value in NEUTRAL):
                writers[(name, repr(value))].append(script)
    shared = {key: scripts for key, scripts in writers.items() if len(scripts) > 1}
    assert shared == {}, "name these in qwen_sft/defaults.py and import them"


def test_the_scripts_take_the_shared_values():
    """A negative control for the test above: the scripts' values are the package's (so it parsed them)."""
    training, mix, chat = (runpy.run_path(str(ROOT / script))
                           for script in ("Qwen_finetuning.py", "data_integration.py", "chat.py"))
    assert training["MAX_SEQ_LENGTH"] == mix["MAX_SEQ_LENGTH"] == defaults.MAX_SEQ_LENGTH == 2048
    assert training["DATASET_PATH"] == mix["OUTPUT_FILE"] == defaults.MIX_FILE
    assert chat["TEMPERATURE"] == defaults.TEMPERATURE and "MAX_SEQ_LENGTH" not in literal_constants("Qwen_finetuning.py")
    assert literal_constants("Qwen_finetuning.py")["SEED"] == 3407  # a literal it alone writes is still read
