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

    def summary(self) -> dict:
        return {
            "real_tokens": self.real_tokens,
            "token_slots": self.token_slots,
            "real_token_share": round(self.real_tokens / self.token_slots, 4) if self.token_slots else None,
            "batches": self.batches,
        }


def peak_gpu_memory_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


class ProgressCallback(TrainerCallback):
    """One line per log step: loss, learning rate, real tokens/s, real-token share and peak GPU memory."""

    def __init__(self, counter: TokenCountingCollator):
        self.counter = counter
        self.last_time = None
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_tokens = time.perf_counter(), self.counter.real_tokens

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
        if self.received:
            control.should_save = True
            control.should_training_stop = True
