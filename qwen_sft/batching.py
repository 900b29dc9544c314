"""How rows become batches: the padding share of a batch shape (for the start-up hint), what packing changed, and
the `auto` batch shape (micro-batch, accumulation, recomputation) chosen for the GPU found.

The speed presets for GPUs are in presets.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cli import say
from .values import parse_scalar

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


# ---- `auto` batch shape: the micro-batch, the accumulation and recomputation that fit the GPU found ----

AUTO = "auto"
SEED_ROWS_PER_STEP = 8  # the seed's 2 x 4: rows one optimizer step takes, over every process
SEED_MICRO_BATCH = 2  # the seed's split, kept where memory cannot be sized (CPU, unreadable model config)
BATCH_FLAGS = {"PER_DEVICE_TRAIN_BATCH_SIZE": 1, "GRADIENT_ACCUMULATION_STEPS": 1, "GRADIENT_CHECKPOINTING": True}
HEADROOM = 0.9  # plan for at most this share of the free memory: the allocator's fragmentation needs the rest
# Past this many tokens in an average micro-batch the GPU is no busier, so a larger one only costs memory: packed
# 8 x 2,048 ran at the speed of 4 x 2,048 with 1.8x the memory (bench/results/train_throughput.json, c vs c_8x1).
BUSY_TOKENS = 8192


def parse_batch_flags(values: dict) -> None:
    """The three batch settings as `auto`, or as the integer / boolean given (a flag arrives as text)."""
    for name, like in BATCH_FLAGS.items():
        value = values[name]
        if isinstance(value, str):
            word = value.strip().lower()
            values[name] = AUTO if word == AUTO else parse_scalar(word, like, f"--{name.lower()} (or auto)")


@dataclass(frozen=True)
class BatchShape:
    micro_batch: int
    accumulation: int
    recompute: bool

    def __str__(self) -> str:
        return f"{self.micro_batch} × {self.accumulation}, {'recomputation' if self.recompute else 'no recomputation'}"


@dataclass(frozen=True)
class ModelSize:
    """What a training step's memory scales with: the decoder's shape and the LoRA parameters."""

    layers: int
    hidden: int
    intermediate: int
    lora_parameters: int

    @property
    def width(self) -> int:
        return self.layers * (self.hidden + self.intermediate)


@dataclass(frozen=True)
class Rows:
    """What the micro-batches will hold: rows up to `longest` tokens, `mean` on average, packed or not."""

    longest: int
    mean: float
    packed: bool


@dataclass(frozen=True)
class MemoryModel:
    """GPU memory a training step needs beyond the loaded base model: a fixed part, the LoRA weights with their
    gradients and AdamW state, and activations per token of the micro-batch, in bytes per token per unit of
    layers × (hidden + intermediate). Fitted on measured peaks (bench/README.md, the `default` part)."""

    fixed_gib: float
    bytes_per_lora_parameter: float
    activation_bytes: dict  # (packed, recompute) -> bytes per token per unit of ModelSize.width

    def need_gib(self, size: ModelSize, micro_batch: int, rows: Rows, recompute: bool) -> float:
        activations = micro_batch * rows.longest * size.width * self.activation_bytes[rows.packed, recompute]
        return self.fixed_gib + (size.lora_parameters * self.bytes_per_lora_parameter + activations) / 2**30


# Unsloth, NF4, bf16, fitted on the 7B shape's peaks with about 5% to spare: above the loaded model (5.2 GiB), rows
# of up to 1,087 tokens took 1.0 GiB at 2 x 4 and 2.8 GiB at 8 x 1 with recomputation, 15.6 GiB at 4 x 2 and 30.9 GiB
# at 8 x 1 without (H100: bench/results/train_default_path.json; 4 x 2 from issue #25's table); packed 4 x 2,048 tokens
# without recomputation 29.6 GiB (bench/results/train_throughput.json).
UNSLOTH_QLORA = MemoryModel(fixed_gib=0.5, bytes_per_lora_parameter=8.0,
                            activation_bytes={(False, False): 6.3, (False, True): 0.5,
                                              (True, False): 6.3, (True, True): 0.5})


def model_size(config, lora_r: int, target_modules: list[str]) -> ModelSize | None:
    """The model's shape from its config (a transformers PretrainedConfig), or None where it is not a decoder
    this can size."""
    try:
        hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
        intermediate, heads = int(config.intermediate_size), int(config.num_attention_heads)
        key_value = int(getattr(config, "num_key_value_heads", None) or heads) * (hidden // heads)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, key_value), "v_proj": (hidden, key_value),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
              "down_proj": (intermediate, hidden)}
    per_layer = sum(lora_r * sum(shapes[name]) for name in target_modules if name in shapes)
    return ModelSize(layers, hidden, intermediate, layers * per_layer)


def rows_per_process(world_size: int) -> int:
    """The seed's rows per optimizer step shared among the processes (at least one each)."""
    return max(1, SEED_ROWS_PER_STEP // world_size)


def fill_split(micro_batch, accumulation, rows: int, most: int) -> tuple[int, int]:
    """The explicit half of the split kept, the `auto` half derived so that a step takes about `rows` rows (a
    micro-batch of at most `most`)."""
    if micro_batch == AUTO and accumulation == AUTO:
        micro_batch = min(SEED_MICRO_BATCH, most)
    if micro_batch == AUTO:
        return max(1, rows // accumulation), accumulation
    return micro_batch, accumulation if accumulation != AUTO else max(1, rows // micro_batch)


@dataclass(frozen=True)
class BatchChoice:
    shape: BatchShape
    reason: str
    auto: frozenset  # the settings `auto` decided
    need_gib: float | None = None
    free_gib: float | None = None
    loaded_gib: float | None = None  # GPU memory the loaded model held when the choice was made

    def line(self) -> str:
        if not self.auto:
            return f"batch: {self.shape} (as given)"
        return f"batch: auto chose {self.shape}: {self.reason}"

    def record(self) -> dict:
        return {"micro_batch": self.shape.micro_batch, "accumulation": self.shape.accumulation,
                "recompute": self.shape.recompute, "auto": sorted(self.auto), "reason": self.reason,
                "need_gib": self.need_gib, "free_gib": self.free_gib, "loaded_gib": self.loaded_gib}


def choose_batch(settings: dict, world_size: int, train_rows: int, rows_seen: Rows,
                 size: ModelSize | None, free_gib: float | None, memory: MemoryModel = UNSLOTH_QLORA) -> BatchChoice:
    """The batch shape: explicit settings kept, `auto` ones chosen. A step keeps the seed's 8 rows (over every
    process); the micro-batch is the largest that fits `free_gib` (up to BUSY_TOKENS on average), without
    recomputation where that fits too. Without a GPU or a model shape (`free_gib` or `size` None), `auto` keeps the
    seed's 2 × 4 with recomputation."""
    micro, accumulation, recompute = (settings[name] for name in BATCH_FLAGS)
    auto = frozenset(name for name in BATCH_FLAGS if settings[name] == AUTO)
    rows = rows_per_process(world_size)
    most = max(1, min(rows, train_rows // world_size))  # every process needs one whole micro-batch
    if not auto:
        return BatchChoice(BatchShape(micro, accumulation, recompute), "as given", auto)
    if size is None or free_gib is None:
        micro, accumulation = fill_split(micro, accumulation, rows, most)
        why = "no CUDA GPU" if free_gib is None else "the model's shape is unknown"
        return BatchChoice(BatchShape(micro, accumulation, True if recompute == AUTO else recompute),
                           f"the seed's split ({why})", auto)
    if micro == AUTO and accumulation == AUTO:
        busy = max(1, int(BUSY_TOKENS // max(rows_seen.mean, 1)))
        micro_batches = [count for count in range(min(most, busy), 0, -1) if rows % count == 0]
    else:
        micro_batches = [fill_split(micro, accumulation, rows, most)[0]]
    candidates = [(candidate, flag) for candidate in micro_batches
                  for flag in ((False, True) if recompute == AUTO else (recompute,))]
    budget = free_gib * HEADROOM
    for candidate, flag in candidates:
        need = memory.need_gib(size, candidate, rows_seen, flag)
        if need <= budget:
            break
    shape = BatchShape(candidate, fill_split(candidate, accumulation, rows, most)[1] if accumulation == AUTO
                       else accumulation, flag)
    verdict = "needed of" if need <= budget else "needed, more than the estimate allows of"
    return BatchChoice(shape, f"{need:.0f} GiB {verdict} {free_gib:.0f} free (rows up to {rows_seen.longest} tokens)",
                       auto, round(need, 2), round(free_gib, 2))


def step_down(choice: BatchChoice) -> BatchChoice | None:
    """After an out-of-memory in the first step: half the micro-batch (twice the accumulation), or, at a
    micro-batch of one, recomputation; None where `auto` chose neither or there is no step left."""
    shape, auto = choice.shape, choice.auto
    split_is_auto = {"PER_DEVICE_TRAIN_BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS"} <= auto
    if split_is_auto and shape.micro_batch > 1:
        half = shape.micro_batch // 2
        smaller = BatchShape(half, shape.accumulation * shape.micro_batch // half, shape.recompute)
    elif "GRADIENT_CHECKPOINTING" in auto and not shape.recompute:
        smaller = BatchShape(shape.micro_batch, shape.accumulation, True)
    else:
        return None
    return BatchChoice(smaller, f"stepped down from {shape} after running out of memory", auto)


def allocated_gpu_gib() -> float | None:
    import torch

    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


def free_gpu_gib() -> float | None:
    """What this process may still allocate on its GPU: the device's free memory, within the share that
    torch.cuda.set_per_process_memory_fraction allows (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    allowed = torch.cuda.get_per_process_memory_fraction() * total - torch.cuda.memory_reserved()
    return min(free, allowed) / 2**30
