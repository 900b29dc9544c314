"""Token-weighted gradient accumulation: one optimizer step over the same rows gives the same LoRA gradients
whether they come as one batch of B or as k micro-batches of B/k, although the rows' answers differ in length."""

import importlib.util

import pytest
import torch
from transformers import TrainerCallback, set_seed

from qwen_sft.modeling import LORA_TARGET_MODULES, add_lora, load_base_model
from qwen_sft.template import tokenize_example
from qwen_sft.training import sft_trainer_class

SYSTEM = "You answer."
MAX_LENGTH = 128
ANSWER_WORDS = [1, 13, 1, 12, 2, 10, 1, 13]  # answer lengths far apart, so a mean of means would differ


def rows_of_similar_length(tokenizer):
    """8 rows of 45-64 tokens each (any two fit in one 128-token packed row, no three do), whose answers differ
    up to tenfold in length."""
    rows = []
    for words in ANSWER_WORDS:
        answer = " ".join(["yes"] * words)
        instruction = "say"
        while True:
            example, _ = tokenize_example(tokenizer, {"instruction": instruction, "input": "", "output": answer},
                                          SYSTEM, MAX_LENGTH)
            if len(example["input_ids"]) >= 45:
                break
            instruction += " please"
        assert len(example["input_ids"]) <= 64
        rows.append(example)
    return rows


class GradientCapture(TrainerCallback):
    def __init__(self):
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {name: param.grad.detach().float().cpu().clone()
                          for name, param in model.named_parameters() if param.requires_grad}


def lora_gradients(backend, rows, batch, accumulation, packing, tmp_path):
    """The LoRA gradients of the first optimizer step (before clipping) over `rows`."""
    from datasets import Dataset
    from trl import SFTConfig

    model, tokenizer = load_base_model("tiny", backend, False, MAX_LENGTH)
    set_seed(0)
    model = add_lora(model, backend, 8, 16, 0.0, LORA_TARGET_MODULES, 0, False)
    on_gpu = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(tmp_path / f"{batch}x{accumulation}"), max_steps=1, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, optim="adamw_torch", max_grad_norm=0,
        report_to=[], save_strategy="no", max_length=MAX_LENGTH, completion_only_loss=True, packing=packing,
        padding_free=packing, seed=0, data_seed=0, dataloader_num_workers=0, use_cpu=not on_gpu,
        bf16=on_gpu, logging_steps=1, disable_tqdm=True,
    )
    capture = GradientCapture()
    trainer = sft_trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, callbacks=[capture])
    steps_per_epoch = len(trainer.get_train_dataloader()) // accumulation
    assert steps_per_epoch == 1, "one optimizer step must take every row"
    trainer.train()
    return capture.gradients


def relative_difference(first: dict, second: dict) -> float:
    difference = sum((first[name] - second[name]).norm() ** 2 for name in first) ** 0.5
    return float(difference / sum(first[name].norm() ** 2 for name in first) ** 0.5)


def mean_of_means_gradients(backend, rows, tmp_path):
    """What an untoken-weighted step gives: the mean over micro-batches of each micro-batch's mean loss."""
    per_row = [lora_gradients(backend, [row], 1, 1, False, tmp_path / f"row{i}") for i, row in enumerate(rows)]
    return {name: sum(grads[name] for grads in per_row) / len(per_row) for name in per_row[0]}


@pytest.mark.slow
def test_accumulation_is_token_weighted_hf_backend(tmp_path):
    _, tokenizer = load_base_model("tiny", "hf", False, MAX_LENGTH)
    rows = rows_of_similar_length(tokenizer)[:4]
    whole = lora_gradients("hf", rows, 4, 1, False, tmp_path)
    for batch, accumulation in ((2, 2), (1, 4)):
        split = lora_gradients("hf", rows, batch, accumulation, False, tmp_path)
        assert relative_difference(whole, split) < 1e-4, (batch, accumulation)
    # The test can tell: per-row means averaged (each row one micro-batch, no token weighting) differ clearly.
    assert relative_difference(whole, mean_of_means_gradients("hf", rows, tmp_path)) > 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_accumulation_is_token_weighted_on_gpu(tmp_path, packing):
    """On the GPU backend (Unsloth when installed): 8 rows (4 packed rows of 2 when packing) in one step."""
    backend = "unsloth" if importlib.util.find_spec("unsloth") else "hf"
    if packing and backend != "unsloth":
        pytest.skip("packing needs Unsloth")
    _, tokenizer = load_base_model("tiny", backend, False, MAX_LENGTH)
    rows = rows_of_similar_length(tokenizer)
    whole_batch = 4 if packing else 8
    whole = lora_gradients(backend, rows, whole_batch, 1, packing, tmp_path)
    for batch in (whole_batch // 2, 1):
        split = lora_gradients(backend, rows, batch, whole_batch // batch, packing, tmp_path)
        print(f"{backend} packing={packing} {batch}x{whole_batch // batch}: relative difference "
              f"{relative_difference(whole, split):.2e}")
        assert relative_difference(whole, split) < 0.02, batch  # bf16 noise; a mean of means is off by > 10%


def test_missing_token_count_is_supplied():
    """Where the trainer's own count is missing (as Unsloth reported on the H200), the mixin counts the loss tokens:
    labels shifted by one, -100 excluded, over every micro-batch of the step."""
    from types import SimpleNamespace

    from qwen_sft.accumulation import TokenWeightedAccumulation

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
