"""An adapter folder's training manifest, read and checked: what inherit.py settles `auto` settings from and what
modeling.py's loaders read the base model from (below both, so that neither imports the other to read it)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

ADAPTER_MANIFEST = "manifest.json"


def read_adapter_manifest(adapter_dir: str) -> dict:
    """The training manifest of an adapter folder; a missing or incomplete folder is a UserError."""
    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{folder}: no LoRA adapter there; run Qwen_finetuning.py first (or pass --adapter_dir)")
    manifest_file = folder / ADAPTER_MANIFEST
    if manifest_file.is_file():
        manifest = _read_json_object(manifest_file)
        if not isinstance(manifest.get("base_model"), str) or not manifest["base_model"]:
            raise UserError(f"{manifest_file}: names no base_model; restore the file from training (or delete it to "
                            "fall back on adapter_config.json), or re-run Qwen_finetuning.py")
        for key in ("config", "dataset"):  # the later stages read settings and the dataset's sha256 from these
            if key in manifest and not isinstance(manifest[key], dict):
                raise UserError(f"{manifest_file}: {key} is {json.dumps(manifest[key])[:40]}, not a JSON object; "
                                "restore the file from training, or re-run Qwen_finetuning.py")
        return manifest
    adapter_config = _read_json_object(folder / "adapter_config.json")
    if not isinstance(adapter_config.get("base_model_name_or_path"), str):
        raise UserError(f"{folder / 'adapter_config.json'}: names no base_model_name_or_path; re-run "
                        "Qwen_finetuning.py")
    return {"base_model": adapter_config["base_model_name_or_path"]}


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        message = f"{path}: not valid JSON ({error}); restore it from training or re-run Qwen_finetuning.py"
        raise UserError(message) from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object; restore it from training or re-run Qwen_finetuning.py")
    return value
