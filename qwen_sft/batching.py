"""How rows become batches: the padding share of a batch shape (for the start-up hint), and what packing changed.

The speed presets for GPUs are in presets.py.
"""

from __future__ import annotations

import math

from .cli import say

PADDING_HINT_SHARE = 0.2  # above this share of padded token slots, the start-up line suggests a fix


def padding_share(lengths: list[int], batch_size: int, group_size: int, seed: int) -> float:
    """Share of token slots that are padding when random batches of `batch_size` rows are padded to their longest
    row; with `group_size`, rows are first grouped by length as transformers' LengthGroupedSampler does."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed)
    if group_size:
        order = get_length_grouped_indices(lengths, group_size, generator=generator)
    else:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    slots = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[index] for index in order[start:start + batch_size]]
        slots += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / slots if slots else 0.0


def report_padding(cfg, lengths: list[int]) -> None:
    """One line on the expected padding share of unpacked batches, with a hint when it wastes too much."""
    group_size = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps if cfg.group_by_length else 0
    share = padding_share(lengths, cfg.per_device_train_batch_size, group_size, cfg.seed)
    line = (f"padding: about {share:.0%} of token slots (batches of {cfg.per_device_train_batch_size} rows"
            f"{', grouped by length' if group_size else ''})")
    if share > PADDING_HINT_SHARE:
        line += ("; hint: --group_by_length true batches rows of similar length, and --packing true (Unsloth, "
                 "CUDA) removes padding; see README, Training speed")
    say(line)


def report_packing(cfg, examples: int, packed_rows: int, world_size: int) -> None:
    """What packing changed: examples per packed row, per optimizer step, and optimizer steps per epoch."""
    rows_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    per_row = examples / max(packed_rows, 1)
    say(f"packing: {examples} examples in {packed_rows} rows of up to {cfg.max_seq_length} tokens ({per_row:.1f} per "
        f"row): about {rows_per_step * per_row:.0f} examples per optimizer step, "
        f"{math.ceil(packed_rows / rows_per_step)} steps per epoch (unpacked: {rows_per_step} and "
        f"{math.ceil(examples / rows_per_step)})")
