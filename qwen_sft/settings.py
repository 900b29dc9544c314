"""Each setting's valid values, in one table for every stage.

parse_config checks a stage's resolved config against RULES before the stage starts: values from flags, from the
constants at the top of the script, from a preset, and those inherited from an adapter's manifest alike. A setting
absent from the table is checked where it is used, before any model loads (SOURCES, RATIOS, KEYWORDS and
DOMAIN_SOURCES by mix/plan.py, PRESET by presets.py, BACKEND by modeling.py, DTYPE, GGUF and SYSTEM_PROMPT's quotes
by export.py, RESUME_FROM_CHECKPOINT and MAX_STEPS by training.py, FAST_GENERATION by fast_generation.py,
BASE_MODEL where it loads), or takes any value of its type (booleans, free text). LORA_TARGET_MODULES is checked
again against the model's modules right after it loads (modeling.check_target_modules).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .inherit import FROM_ADAPTER
from .values import FROM_COMMAND_LINE, format_value

LARGEST_COUNT = 2**31 - 1  # the tokenizers, torch and C code count in 32-bit signed integers
LARGEST_SEED = 2**32 - 1  # numpy's seeds (transformers.set_seed seeds numpy too)


@dataclass(frozen=True)
class Rule:
    holds: Callable[[object], bool]
    wants: str  # what a valid value is, completing "--flag must be ..."
    choices: Callable[[], list[str]] | None = None  # the valid names, where they are a list
    most: int | None = None  # the largest valid integer, where there is one
    common: tuple[str, ...] = ()  # names among choices() that pass without calling it

    def describe(self, value) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices())
        if self.most is not None and isinstance(value, int) and value > self.most:
            return f"at most {self.most:,}"
        return self.wants


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def count(low: int, auto: bool = False) -> Rule:
    """An integer from `low` to LARGEST_COUNT (or `auto`, where the stage settles it)."""
    wanted = f"at least {low}" + (" (or auto)" if auto else "")
    return Rule(lambda value: (auto and value == "auto") or (
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= LARGEST_COUNT), wanted,
        most=LARGEST_COUNT)


def at_least(low: float, above: bool = False) -> Rule:
    """A finite number of at least `low` (above it, with `above`)."""
    wanted = f"a number above {low:g}" if above else f"{low:g} or more"
    return Rule(lambda value: _number(value) and (value > low if above else value >= low), wanted)


def share(low_open: bool, high_open: bool) -> Rule:
    """A number between 0 and 1, each end in or out."""
    wanted = f"in {'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    return Rule(lambda value: _number(value) and (0 < value if low_open else 0 <= value)
                and (value < 1 if high_open else value <= 1), wanted)


def one_of(choices: Callable[[], list[str]], common: tuple[str, ...] = ()) -> Rule:
    """One of the names `choices()` lists (called only to check, as it may import a library). A `common` name (the
    defaults and presets) passes without that import, so that a run's bad input is refused in a fraction of a second
    rather than after importing transformers."""
    return Rule(lambda value: value in common or value in choices(), "", choices, common=common)


def path_text() -> Rule:
    return Rule(lambda value: isinstance(value, str) and value.strip() != "" and "\0" not in value,
                "a path (not empty)")


def _replaceable_folder(value) -> bool:
    """Not the current folder nor one above it: an output folder is replaced whole, by a rename."""
    if not path_text().holds(value):
        return False
    here = Path.cwd()
    return Path(value).resolve() not in (here, *here.parents)


def output_folder() -> Rule:
    return Rule(_replaceable_folder, "a folder other than the current one or one above it")


def _optimizers() -> list[str]:
    from transformers.training_args import OptimizerNames

    return [name.value for name in OptimizerNames]


def _schedulers() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    return [name.value for name in SchedulerType]


SEED = Rule(lambda value: isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= LARGEST_SEED,
            f"from 0 to {LARGEST_SEED}")

RULES: dict[str, Rule] = {
    # where files are read and written
    "ADAPTER_DIR": path_text(),
    "DATASET_PATH": path_text(),
    "MY_REPORT_DATA_PATH": path_text(),
    "OUTPUT_DIR": output_folder(),
    "OUTPUT_FILE": path_text(),
    "TOKENIZER_DIR": output_folder(),
    # lengths and sizes
    "MAX_SEQ_LENGTH": count(1),
    "MAX_CONTEXT_TOKENS": count(1),
    "MAX_NEW_TOKENS": count(1),
    "BATCH_SIZE": count(1),
    "EVAL_BATCH_SIZE": count(1),
    "GEN_BATCH_SIZE": count(1),
    "MAX_GEN_SAMPLES": count(-1),
    "TOTAL_SAMPLES": count(1),
    "SHUFFLE_BUFFER": count(1),
    "MIN_OUTPUT_CHARS": count(0),
    "BAD_ROW_REPORT_LIMIT": count(0),
    "MAX_ROWS_READ": count(0),
    # seeds and splits
    "SEED": SEED,
    "SPLIT_SEED": SEED,
    "GENERATION_SEED": SEED,
    "EVAL_RATIO": share(low_open=False, high_open=True),
    # decoding (generation, and export's Modelfile)
    "TEMPERATURE": at_least(0),
    "TOP_P": share(low_open=True, high_open=False),
    "REPETITION_PENALTY": at_least(0, above=True),
    "NO_REPEAT_NGRAM_SIZE": count(0),
    # the hub
    "HUB_TIMEOUT_SECONDS": at_least(0, above=True),
    "NETWORK_RETRY_SECONDS": at_least(0),
    # training
    "LORA_R": count(1),
    "LORA_ALPHA": count(1),
    "LORA_DROPOUT": share(low_open=False, high_open=True),
    "LEARNING_RATE": at_least(0, above=True),
    "WARMUP_STEPS": at_least(0),
    "WEIGHT_DECAY": at_least(0),
    "NEFTUNE_NOISE_ALPHA": at_least(0),
    "NUM_TRAIN_EPOCHS": at_least(0),
    "LOGGING_STEPS": count(1),
    "EVAL_STEPS": count(1),
    "SAVE_STEPS": count(1),
    "SAVE_TOTAL_LIMIT": count(1),
    "PER_DEVICE_TRAIN_BATCH_SIZE": count(1, auto=True),
    "GRADIENT_ACCUMULATION_STEPS": count(1, auto=True),
    "OPTIM": one_of(_optimizers, common=("adamw_8bit", "adamw_torch")),
    "LR_SCHEDULER_TYPE": one_of(_schedulers, common=("linear", "cosine")),
    "LORA_TARGET_MODULES": Rule(lambda value: bool(value) and all(
        isinstance(name, str) and name.strip() for name in value), "a list of module names (not empty)"),
}


def problems(values: dict, notes: dict) -> list[str]:
    """One line per value in `values` that RULES refuses; `notes` says where a value came from."""
    found = []
    for name, value in values.items():
        rule = RULES.get(name)
        if rule is None or rule.holds(value):
            continue
        shown = repr(value) if isinstance(value, str) else format_value(value)
        where = f" ({notes[name]})" if notes.get(name) not in (None, FROM_COMMAND_LINE) else ""
        if notes.get(name) == FROM_ADAPTER:
            where = f" (from {Path(values['ADAPTER_DIR']) / 'manifest.json'}: fix it, or pass --{name.lower()})"
        found.append(f"--{name.lower()} must be {rule.describe(value)}, got {shown}{where}")
    return found


def check_settings(values: dict, notes: dict) -> None:
    """Every value RULES refuses, in one UserError."""
    found = problems(values, notes)
    if found:
        raise UserError("; ".join(found))
