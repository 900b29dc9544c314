"""Later stages inherit what training fixed. A setting left at `auto` in evaluate.py, inference.py, chat.py or
export_model.py takes the value recorded in the adapter's manifest.json; an explicit value wins, with one line when
it differs from training's.

`inherit_from_adapter` is the hook those stages pass to `parse_config`, so the printed config says which values
came from the adapter. It is the only place `auto` is settled: it keeps the manifest it read as
`cfg.adapter_manifest`, and the model loaders take every setting as an explicit value.
"""

from __future__ import annotations

from pathlib import Path

from . import defaults
from .adapter_manifest import ADAPTER_MANIFEST, read_adapter_manifest
from .errors import UserError
from .template import DEFAULT_SYSTEM_PROMPT
from .values import format_value, parse_value

AUTO = "auto"
# Qwen_finetuning.py's defaults: what a manifest written before training recorded a setting stands for.
TRAINING_DEFAULTS = {
    "BASE_MODEL": defaults.BASE_MODEL,
    "DATASET_PATH": defaults.MIX_FILE,
    "SYSTEM_PROMPT": DEFAULT_SYSTEM_PROMPT,
    "MAX_SEQ_LENGTH": defaults.MAX_SEQ_LENGTH,
    "LOAD_IN_4BIT": defaults.LOAD_IN_4BIT,
    "EVAL_RATIO": defaults.EVAL_RATIO,
    "SPLIT_SEED": defaults.SPLIT_SEED,
}
# Training records these at the top of the manifest (an adapter without a manifest names its base in
# adapter_config.json); the rest under "config".
TOP_LEVEL = {"BASE_MODEL": "base_model", "LOAD_IN_4BIT": "load_in_4bit"}
# A stage setting that inherits a training setting of another name.
TRAINED_AS = {"MAX_CONTEXT_TOKENS": "MAX_SEQ_LENGTH"}
FROM_ADAPTER = "from the adapter"
FALLBACK = "today's default: the adapter's manifest does not record it"
SHOWN_CHARACTERS = 40  # a long value (a system prompt) is shortened in an override line


def trained_value(manifest: dict, name: str):
    """The value training recorded for the training setting `name`, or None where the manifest predates it."""
    if name in TOP_LEVEL:
        return manifest.get(TOP_LEVEL[name])
    config = manifest.get("config")
    return config.get(name) if isinstance(config, dict) else None


def _checked(value, name: str, manifest_file: Path):
    """A recorded value of the type training's default has (a manifest edited by hand may hold anything)."""
    default = TRAINING_DEFAULTS[name]
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[type(default)]
        key = TOP_LEVEL.get(name, f"config {name}")
        raise UserError(f"{manifest_file}: {key} is {value!r}, not {kind}; restore the file from training, or pass "
                        f"--{name.lower()}")
    return value


def shown(value) -> str:
    """A setting's value as an override line shows it (a long text shortened)."""
    if not isinstance(value, str):
        return format_value(value)
    return repr(value if len(value) <= SHOWN_CHARACTERS else value[:SHOWN_CHARACTERS] + "…")


def inherited_settings(values: dict) -> dict[str, str]:
    """The stage's settings that training fixed, each with the name training recorded it under."""
    return {name: TRAINED_AS.get(name, name) for name in values if TRAINED_AS.get(name, name) in TRAINING_DEFAULTS}


def overrides(manifest: dict, values: dict) -> list[str]:
    """One line per setting whose value differs from the one the adapter was trained with."""
    lines = []
    for name, trained_name in inherited_settings(values).items():
        recorded = trained_value(manifest, trained_name)
        if recorded is not None and values[name] != recorded:
            lines.append(f"--{name.lower()} {shown(values[name])} differs from the {shown(recorded)} the adapter "
                         f"was trained with ({trained_name}); pass --{name.lower()} auto to inherit it")
    return lines


def inherit_from_adapter(values, notes: dict) -> list[str]:
    """parse_config's hook for the stages after training: resolve each `auto` setting training fixed in `values`
    (parse_config's Config) from values["ADAPTER_DIR"]'s manifest, kept as values.adapter_manifest; parse explicit
    ones with the type training's default has, and note where each came from in `notes`. Returns the lines to print
    under the config: overrides, and settings an older manifest does not record (they take today's defaults)."""
    adapter_dir = values["ADAPTER_DIR"]
    manifest = values.adapter_manifest = read_adapter_manifest(adapter_dir)
    manifest_file = Path(adapter_dir) / ADAPTER_MANIFEST
    has_manifest = manifest_file.is_file()
    unrecorded, missing = [], []
    for name, trained_name in inherited_settings(values).items():
        default = TRAINING_DEFAULTS[trained_name]
        if values[name] != AUTO:
            if isinstance(values[name], str) and not isinstance(default, str):
                try:
                    values[name] = parse_value(values[name], default, f"--{name.lower()}")
                except UserError as error:
                    raise UserError(f"{error} (or auto: as the adapter was trained)") from None
            continue
        recorded = trained_value(manifest, trained_name)
        if recorded is not None:
            values[name], notes[name] = _checked(recorded, trained_name, manifest_file), FROM_ADAPTER
        elif has_manifest:
            values[name], notes[name] = default, FALLBACK
            missing.append(trained_name)
        else:
            unrecorded.append(f"--{name.lower()}")
    if unrecorded:
        flags = ", ".join(unrecorded)
        raise UserError(f"{manifest_file}: not found, so {flags} cannot be inherited from training (auto); put the "
                        f"manifest back, or give {flags} the values the adapter was trained with")
    lines = [f"warning: {line}" for line in overrides(manifest, values)]
    if missing:
        lines.append(f"note: {manifest_file} does not record {', '.join(missing)} (an older version wrote it); "
                     "today's defaults are used, marked in the config above")
    return lines
