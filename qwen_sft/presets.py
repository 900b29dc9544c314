"""Named presets: a flag set that a stage script takes as `--preset NAME`.

A preset sets only the settings not given on the command line, so the constants at the top of each script stay
the defaults and any flag given wins. The printed config marks what it set.
"""

from __future__ import annotations

from .batching import parse_batch_flags
from .cli import FROM_COMMAND_LINE, UserError

# The tiny model's pipeline check: 30 steps, evaluated and saved every 10, with the seed's NF4 and 8-bit AdamW
TINY_RUN = {"BASE_MODEL": "tiny", "MAX_STEPS": 30, "EVAL_STEPS": 10, "SAVE_STEPS": 10, "LOGGING_STEPS": 10}
# Greedy without penalties: reproducible answers, and a model repeats the answers it was trained on exactly
GREEDY = {"TEMPERATURE": 0.0, "REPETITION_PENALTY": 1.0, "NO_REPEAT_NGRAM_SIZE": 0}

PRESETS = {
    "training": {
        # Flag sets for common GPUs. Both pack rows padding-free, which needs the Unsloth backend (a CUDA GPU), and
        # are what `auto` chooses for packed rows on those cards (tests/test_batch_choice.py).
        # bench/train_throughput.py measures them (README, Training speed).
        # 48 GB and up (H100, H200): no activation recompute (about 30 GiB of activations for 4 packed 2,048-token rows)
        "h200_fast": {"PACKING": True, "GRADIENT_CHECKPOINTING": False, "PER_DEVICE_TRAIN_BATCH_SIZE": 4,
                      "GRADIENT_ACCUMULATION_STEPS": 2},
        # 24 GB (RTX 3090/4090, L4, A10): Unsloth's gradient checkpointing, 4 packed rows x 2 accumulation steps
        "gpu24": {"PACKING": True, "GRADIENT_CHECKPOINTING": True, "PER_DEVICE_TRAIN_BATCH_SIZE": 4,
                  "GRADIENT_ACCUMULATION_STEPS": 2},
        # The seed's split, one flag away from `auto`: 2 rows x 4 accumulation steps with recomputation (any GPU)
        "seed": {"PER_DEVICE_TRAIN_BATCH_SIZE": 2, "GRADIENT_ACCUMULATION_STEPS": 4, "GRADIENT_CHECKPOINTING": True},
        "tiny": TINY_RUN,  # scripts/demo_cpu.sh, the GPU test
        # quickest on a CPU: fp32 (no 4-bit dequantizing), torch's AdamW, no activation recompute (the tests)
        "tiny_cpu": {**TINY_RUN, "LOAD_IN_4BIT": False, "OPTIM": "adamw_torch", "GRADIENT_CHECKPOINTING": False},
    },
    "evaluate": {
        "tiny": {"MAX_NEW_TOKENS": 32, "MAX_GEN_SAMPLES": 8},  # a quick look at the tiny model's answers
    },
    "inference": {"greedy": GREEDY},
    "chat": {"greedy": GREEDY},
}


def apply_preset(values: dict, notes: dict, stage: str) -> None:
    """Set `values["PRESET"]`'s settings for `stage`, except those `notes` marks as given on the command line."""
    name, presets = values["PRESET"], PRESETS[stage]
    if name == "none":
        return
    if name not in presets:
        raise UserError(f"--preset must be none or one of {', '.join(presets)}, got {name!r}")
    for key, value in presets[name].items():
        if notes.get(key) != FROM_COMMAND_LINE:
            values[key], notes[key] = value, f"preset {name}"


def with_preset(stage: str, then=None):
    """parse_config's `resolve` hook: the stage's preset first, so the printed config shows what it set, then `then`
    (e.g. the later stages' inheritance from the adapter)."""

    def resolve(values: dict, notes: dict) -> list[str]:
        apply_preset(values, notes, stage)
        if stage == "training":
            parse_batch_flags(values)
        return then(values, notes) if then is not None else []

    return resolve
