"""What a long training run shows and records: real-token counts, a one-line summary per log step, and a
clean stop on SIGINT/SIGTERM that saves a checkpoint first."""

from __future__ import annotations

import contextlib
import signal
import time

from transformers import TrainerCallback


class TokenCountingCollator:
    """Wraps the trainer's collator and counts real (non-pad) tokens and token slots on the host, sync-free."""

    def __init__(self, collator):
        self.collator = collator
        self.real_tokens = 0
        self.token_slots = 0
        self.batches = 0

    def __call__(self, features):
        batch = self.collator(features)
        slots = batch["input_ids"].numel()
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else slots  # padding-free: no pads
        self.real_tokens += real
        self.token_slots += slots
        self.batches += 1
        return batch

    def summary(self, accelerator) -> dict:
        """Counts summed over every process."""
        per_process = gather_over_ranks(accelerator, [self.real_tokens, self.token_slots, self.batches])
        real, slots, batches = (int(value) for value in per_process.sum(0))
        return {
            "real_tokens": real,
            "token_slots": slots,
            "real_token_share": round(real / slots, 4) if slots else None,
            "batches": batches,
            "real_tokens_per_process": [int(value) for value in per_process[:, 0]],
        }


def gather_over_ranks(accelerator, values: list[float]):
    """A (processes x len(values)) tensor of every process's values; a collective, so every rank must call it."""
    import torch

    local = torch.tensor([values], dtype=torch.float64, device=accelerator.device)
    return accelerator.gather(local).cpu()


def peak_gpu_memory_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def peak_gpu_memory_reserved_gib() -> float | None:
    """The allocator's peak reservation: what the GPU must hold, fragmentation included."""
    import torch

    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None


def synchronized_time() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class ProgressCallback(TrainerCallback):
    """One line per log step: loss, learning rate, real tokens/s, real-token share and peak GPU memory.

    It also measures steady-state throughput from the end of step `warmup_steps` (past compilation and
    warm-up) to the end of training, synchronizing the GPU only at those two points.
    """

    def __init__(self, counter: TokenCountingCollator, warmup_steps: int = 5):
        self.counter = counter
        self.warmup_steps = warmup_steps
        self.last_time = None
        self.last_tokens = 0
        self.started = None
        self.initial_step = 0
        self.first_step_s = None
        self.steady_start = None  # (time, real tokens, token slots, step)
        self.steady = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last_time = time.perf_counter()
        self.initial_step = state.global_step  # non-zero when resuming
        self.last_tokens = self.counter.real_tokens
        self.first_step_s, self.steady_start, self.steady = None, None, {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_s is None:
            self.first_step_s = synchronized_time() - self.started
        if self.steady_start is None and state.global_step - self.initial_step == self.warmup_steps:
            self.steady_start = (synchronized_time(), self.counter.real_tokens, self.counter.token_slots,
                                 state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.steady_start or state.global_step <= self.steady_start[3]:
            return
        start_time, start_real, start_slots, start_step = self.steady_start
        elapsed = synchronized_time() - start_time
        self.steady = {
            "measured_steps": f"{start_step + 1}-{state.global_step}",
            "real_tokens_per_s": round((self.counter.real_tokens - start_real) / elapsed, 1),
            "token_slots_per_s": round((self.counter.token_slots - start_slots) / elapsed, 1),
        }

    def summary(self, accelerator) -> dict:
        """Rates summed over every process; peak memory is the largest process's."""
        steady = dict(self.steady)
        peak, reserved = peak_gpu_memory_gib(), peak_gpu_memory_reserved_gib()
        rates = gather_over_ranks(
            accelerator,
            [steady.get("real_tokens_per_s", 0), steady.get("token_slots_per_s", 0), peak or 0, reserved or 0],
        )
        if steady:
            steady["real_tokens_per_s"], steady["token_slots_per_s"] = (round(float(v), 1) for v in rates[:, :2].sum(0))
        return {
            "time_to_first_step_s": round(self.first_step_s, 2) if self.first_step_s is not None else None,
            "steady_state": steady,
            "peak_gpu_memory_gib": round(float(rates[:, 2].max()), 2) if peak is not None else None,
            "peak_gpu_memory_reserved_gib": round(float(rates[:, 3].max()), 2) if reserved is not None else None,
        }

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        rate = (self.counter.real_tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, self.counter.real_tokens
        parts = [
            f"step {state.global_step}/{state.max_steps}",
            f"loss {logs['loss']:.4f}",
            f"lr {logs.get('learning_rate', 0):.2e}",
            f"{rate:,.0f} tok/s",
        ]
        if self.counter.token_slots:
            parts.append(f"real tokens {self.counter.real_tokens / self.counter.token_slots:.0%}")
        peak = peak_gpu_memory_gib()
        if peak is not None:
            parts.append(f"peak {peak:.1f} GiB")
        from tqdm.auto import tqdm

        tqdm.write(" | ".join(parts))


class StopOnSignal(TrainerCallback):
    """On the first SIGINT/SIGTERM, finish the current step, save a checkpoint and stop; a second one aborts."""

    def __init__(self):
        self.received = None

    def _handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: saving a checkpoint after this step (press Ctrl-C again to abort)")

    @contextlib.contextmanager
    def installed(self):
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.received is not None
        if args.world_size > 1:  # every process must stop at the same step, or the next collective hangs
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(stop)], device=args.device)
            dist.all_reduce(flag)
            stop = bool(flag.item())
        if stop:
            control.should_save = True
            control.should_training_stop = True
