"""Token-weighted gradient accumulation: every answer token of an optimizer step weighs the same, however the
step's rows are split into micro-batches.

transformers' Trainer counts the step's loss tokens (`num_items_in_batch`) and the loss divides its sum by that
count. When the count is missing, each micro-batch loss is a mean and a short answer in a small micro-batch weighs
more than the same tokens in a large one. Where a trainer leaves the count out, we count the tokens ourselves,
exactly as the loss selects them: labels shifted by one, -100 (prompt, padding and, in padding-free packed rows,
each example's first token) excluded.

Unsloth 2026.10.9 warns "`num_items_in_batch` could not be counted ... each micro-batch loss is a mean" whenever
its compute_loss gets no count while gradient accumulation is above 1. On the default path that was evaluation:
TRL's SFTTrainer.prediction_step calls compute_loss without a count (an evaluation batch needs none: its loss is
its own mean). `loss_token_count` gives every loss a count, evaluation batches theirs, so the warning cannot fire.
"""

from __future__ import annotations


def count_loss_tokens(batches: list[dict]):
    """The tokens the causal-LM loss of these micro-batches averages over (a tensor, no device sync)."""
    return sum(
        ((batch["shift_labels"] if "shift_labels" in batch else batch["labels"][..., 1:]) != -100).sum()
        for batch in batches
    )


class TokenWeightedAccumulation:
    """Trainer mixin: supplies `num_items_in_batch` when the trainer (or a library patching it) leaves it None."""

    steps_counted_here = 0

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        # Only where the loss consumes the count; otherwise training_step divides by the accumulation steps.
        if num_items is None and batches and "labels" in batches[0] and self.model_accepts_loss_kwargs:
            num_items = count_loss_tokens(batches).to(self.args.device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                num_items = self.accelerator.gather(num_items).sum()  # every rank's tokens, as Trainer counts
            self.steps_counted_here += 1
        return batches, num_items

    def loss_token_count(self, inputs: dict, num_items_in_batch):
        """The count a loss divides its sum by: the trainer's, or where it gives none (an evaluation batch, any
        micro-batch a library left uncounted) this batch's loss tokens, over every process as training counts.
        For one evaluation batch that is its mean, as before."""
        if num_items_in_batch is not None or "labels" not in inputs or not self.model_accepts_loss_kwargs:
            return num_items_in_batch
        count = count_loss_tokens([inputs]).to(self.args.device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()  # the loss is scaled back by the process count
        return count
