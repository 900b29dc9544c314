"""Token-weighted gradient accumulation: one optimizer step over the same rows gives the same LoRA gradients
whether they come as one batch of B or as k micro-batches of B/k, although the rows' answers differ in length.
The check itself is bench/accumulation_check.py, which the GPU record runs too."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

if torch.cuda.is_available() and importlib.util.find_spec("unsloth"):
    import unsloth  # noqa: F401  (patches transformers and TRL, so it comes before them)

from bench.accumulation_check import (
    compare_splits,
    lora_gradients,
    mean_of_means_gradients,
    relative_difference,
    rows_of_similar_length,
)
from qwen_sft.accumulation import TokenWeightedAccumulation
from qwen_sft.modeling import load_base_model


@pytest.mark.slow
def test_accumulation_is_token_weighted_hf_backend(tmp_path):
    rows = rows_of_similar_length(load_base_model("tiny", "hf", False, 128)[1])[:4]
    result = compare_splits("hf", rows, 4, False, tmp_path)
    assert all(split["relative_difference"] < 1e-4 for split in result["splits"].values()), result
    # The check can tell: per-row means averaged (no token weighting) differ clearly.
    whole, _ = lora_gradients("hf", rows, 4, 1, False, tmp_path / "whole")
    assert relative_difference(whole, mean_of_means_gradients("hf", rows, tmp_path)) > 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_accumulation_is_token_weighted_on_gpu(tmp_path, packing):
    """On the GPU backend (Unsloth when installed): 8 rows, packed 2 per row when packing, in one step."""
    backend = "unsloth" if importlib.util.find_spec("unsloth") else "hf"
    if packing and backend != "unsloth":
        pytest.skip("packing needs Unsloth")
    rows = rows_of_similar_length(load_base_model("tiny", backend, False, 128)[1])
    result = compare_splits(backend, rows, 4 if packing else 8, packing, tmp_path)
    print(result)
    assert all(split["relative_difference"] < 0.02 for split in result["splits"].values()), result


def test_missing_token_count_is_supplied():
    """Where the trainer's own count is missing (as Unsloth reported on the H200), the mixin counts the loss tokens:
    labels shifted by one, -100 excluded, over every micro-batch of the step."""

    class CountlessTrainer:
        def get_batch_samples(self, epoch_iterator, num_batches, device=None):
            return [next(epoch_iterator) for _ in range(num_batches)], None

    class Trainer(TokenWeightedAccumulation, CountlessTrainer):
        model_accepts_loss_kwargs = True
        args = SimpleNamespace(device=torch.device("cpu"), average_tokens_across_devices=True, world_size=1)

    batches = [{"labels": torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, -100]])},
               {"labels": torch.tensor([[9, -100, 4, 4, 4, 4]])}]
    trainer = Trainer()
    _, count = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    assert int(count) == 3 + 4 and trainer.steps_counted_here == 1
    Trainer.model_accepts_loss_kwargs = False  # the loss ignores a count: leave it to training_step's division
    assert trainer.get_batch_samples(iter(batches), 2)[1] is None


def test_every_loss_gets_a_token_count_evaluation_batches_too():
    """TRL's prediction_step asks for an evaluation batch's loss without a count, and Unsloth then warns that "each
    micro-batch loss is a mean". The stage's compute_loss counts that batch's loss tokens instead (the same mean)."""

    class Trainer(TokenWeightedAccumulation):
        model_accepts_loss_kwargs = True
        args = SimpleNamespace(device=torch.device("cpu"), average_tokens_across_devices=True, world_size=1)

    batch = {"labels": torch.tensor([[-100, 5, 6, -100], [7, -100, -100, 8]])}
    assert int(Trainer().loss_token_count(batch, None)) == 2 + 1  # labels shifted by one, -100 excluded
    assert Trainer().loss_token_count(batch, 11) == 11  # the trainer's own count (a training step's) stays
    assert Trainer().loss_token_count({"input_ids": batch["labels"]}, None) is None  # no labels: no loss to weigh
    Trainer.model_accepts_loss_kwargs = False  # a loss that ignores the count gets none
    assert Trainer().loss_token_count(batch, None) is None
