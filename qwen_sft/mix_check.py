"""Training checks the mix it trains on. data_integration.py and data_set_generation.py record in the mix's manifest
the MAX_SEQ_LENGTH its rows were filtered for and the SYSTEM_PROMPT they were measured with; a training value that
differs gets one warning line under the printed config, as an override of the adapter's value does in the later
stages (inherit.py). A dataset without a manifest (your own file) is not checked; a mix manifest that cannot be read
gets a warning, since the mix itself may be fine.
"""

from __future__ import annotations

import json
from pathlib import Path

from .artifacts import MIX_STAGES, find_manifest, manifest_path_for
from .inherit import shown

CHECKED = {"MAX_SEQ_LENGTH": (int, "filtered for"), "SYSTEM_PROMPT": (str, "measured with")}


def check_against_mix(values: dict, notes: dict) -> list[str]:
    """parse_config's hook for training: one warning line per setting that differs from the mix's (or one for a
    mix manifest that cannot be read)."""
    return [f"warning: {line}" for line in mix_differences(values)]


def mix_differences(values: dict) -> list[str]:
    dataset = Path(values["DATASET_PATH"])
    if not dataset.is_file():
        return []  # training itself says the dataset is missing
    recorded = mix_config(dataset)
    if isinstance(recorded, str):
        return [recorded]
    lines = []
    for name, (_, how) in CHECKED.items():
        if name in recorded and values[name] != recorded[name]:
            flag = f"--{name.lower()}"
            lines.append(f"{flag} {shown(values[name])} differs from the {shown(recorded[name])} the mix {dataset} was "
                         f"{how} ({name} in its manifest); rebuild the mix with the same {flag}, or give training "
                         "the mix's")
    return lines


def mix_config(dataset: Path) -> dict | str:
    """The checked settings the mix at `dataset` was written with (empty: not a mix of this toolkit), or the line
    saying why its manifest cannot be read."""
    found = find_manifest(dataset)
    if found is None:
        own = manifest_path_for(dataset)
        return unreadable(own, dataset, "not a JSON manifest of that file") if own.is_file() else {}
    try:
        manifest = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # changed since find_manifest read it
        return unreadable(found, dataset, str(error))
    if manifest["stage"] not in MIX_STAGES:
        return {}
    config = manifest.get("config")
    if not isinstance(config, dict):
        return unreadable(found, dataset, "its config is not a JSON object")
    for name, (kind, _) in CHECKED.items():
        if name in config and type(config[name]) is not kind:
            return unreadable(found, dataset, f"its config {name} is {json.dumps(config[name])[:40]}")
    return {name: config[name] for name in CHECKED if name in config}


def unreadable(manifest: Path, dataset: Path, why: str) -> str:
    return (f"{manifest}: cannot be read as the mix's manifest ({why}), so training's MAX_SEQ_LENGTH and "
            f"SYSTEM_PROMPT are not checked against {dataset}; rebuild the mix to restore it")
