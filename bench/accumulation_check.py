"""Is gradient accumulation token-weighted? One optimizer step over the same rows must give the same LoRA
gradients as one batch of B rows or as k micro-batches of B/k, although the rows' answers differ tenfold in
length (a mean of per-micro-batch means would differ by more than 10%). Runs the stage's own trainer class
(`qwen_sft.training.sft_trainer_class`) on the tiny model: on the GPU with Unsloth when it is installed,
unpacked and packed (8 rows of 45-64 tokens, packed 2 per 128-token row), else with transformers + PEFT.

It also records whether the trainer (Unsloth) left `num_items_in_batch` uncounted, so that
`qwen_sft.accumulation` counted it: that is where Unsloth's "could not be counted" warning came from. And it checks
that `qwen_sft.neftune`'s noise reaches the backend's embeddings with the same norm per example packed (position
ids) and unpacked (one example per row).

  python bench/accumulation_check.py --out accumulation_check.json
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SYSTEM = "You answer."
MAX_LENGTH = 128
ANSWER_WORDS = [1, 13, 1, 12, 2, 10, 1, 13]  # answer lengths far apart, so a mean of means would differ


def rows_of_similar_length(tokenizer) -> list[dict]:
    """8 rows of 45-64 tokens each (any two fit in one 128-token packed row, no three do), whose answers differ
    up to tenfold in length."""
    from qwen_sft.template import tokenize_example

    rows = []
    for words in ANSWER_WORDS:
        record = {"instruction": "say", "input": "", "output": " ".join(["yes"] * words)}
        while True:
            example, _ = tokenize_example(tokenizer, record, SYSTEM, MAX_LENGTH)
            if len(example["input_ids"]) >= 45:
                break
            record["instruction"] += " please"
        if len(example["input_ids"]) > 64:
            raise RuntimeError(f"a row of {len(example['input_ids'])} tokens; the check needs 45-64")
        rows.append(example)
    return rows


def lora_gradients(backend: str, rows: list[dict], batch: int, accumulation: int, packing: bool, workdir: Path):
    """(LoRA gradients of the first optimizer step before clipping, steps whose token count qwen_sft supplied)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback, set_seed
    from trl import SFTConfig

    from qwen_sft.modeling import LORA_TARGET_MODULES, add_lora, load_base_model
    from qwen_sft.training import sft_trainer_class

    class GradientCapture(TrainerCallback):
        gradients = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.gradients = {name: param.grad.detach().float().cpu().clone()
                              for name, param in model.named_parameters() if param.requires_grad}

    model, tokenizer = load_base_model("tiny", backend, False, MAX_LENGTH)
    set_seed(0)
    model = add_lora(model, backend, 8, 16, 0.0, LORA_TARGET_MODULES, 0, False)
    on_gpu = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(workdir / f"{batch}x{accumulation}"), max_steps=1, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, optim="adamw_torch", max_grad_norm=0,
        report_to=[], save_strategy="no", max_length=MAX_LENGTH, completion_only_loss=True, packing=packing,
        padding_free=packing, seed=0, data_seed=0, dataloader_num_workers=0, use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(), logging_steps=1, disable_tqdm=True,
    )
    capture = GradientCapture()
    trainer = sft_trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, callbacks=[capture])
    if len(trainer.get_train_dataloader()) != accumulation:
        raise RuntimeError("one optimizer step must take every row")
    trainer.train()
    if capture.gradients is None:
        raise RuntimeError("the trainer never called on_pre_optimizer_step")
    return capture.gradients, trainer.steps_counted_here


def relative_difference(first: dict, second: dict) -> float:
    difference = sum((first[name] - second[name]).norm() ** 2 for name in first) ** 0.5
    return float(difference / sum(first[name].norm() ** 2 for name in first) ** 0.5)


def mean_of_means_gradients(backend: str, rows: list[dict], workdir: Path) -> dict:
    """What a step without token weighting gives: the mean over rows of each row's own mean-loss gradients."""
    per_row = [lora_gradients(backend, [row], 1, 1, False, workdir / f"row{i}")[0] for i, row in enumerate(rows)]
    return {name: sum(grads[name] for grads in per_row) / len(per_row) for name in per_row[0]}


def compare_splits(backend: str, rows: list[dict], whole_batch: int, packing: bool, workdir: Path) -> dict:
    """(B, 1) against (B/2, 2) and (1, B): relative differences of the LoRA gradients, and who counted tokens."""
    whole, _ = lora_gradients(backend, rows, whole_batch, 1, packing, workdir)
    result = {"packing": packing, "rows": len(rows), "whole_batch": whole_batch, "splits": {}}
    for batch in (whole_batch // 2, 1):
        split, counted_here = lora_gradients(backend, rows, batch, whole_batch // batch, packing, workdir)
        result["splits"][f"{batch}x{whole_batch // batch}"] = {
            "relative_difference": round(relative_difference(whole, split), 6),
            "token_count_supplied_by_qwen_sft": counted_here > 0,
        }
    return result


def neftune_norms(backend: str, rows: list[dict], alpha: float = 5.0) -> dict:
    """Per-example NEFTune noise norms through the backend's model: packed in one row vs each example alone."""
    import torch

    from qwen_sft.modeling import LORA_TARGET_MODULES, add_lora, load_base_model
    from qwen_sft.neftune import per_example_neftune

    model, _ = load_base_model("tiny", backend, False, 512)
    model = add_lora(model, backend, 8, 16, 0.0, LORA_TARGET_MODULES, 0, False)
    model.train()
    embeddings = model.get_input_embeddings()
    seen = []
    examples = [torch.tensor(row["input_ids"], device=model.device) for row in rows[:4]]

    def noise_norms():
        ids, output = seen.pop()
        return (output.float() - embeddings.weight[ids].float()).norm(dim=-1).pow(2)

    with per_example_neftune(model, alpha), torch.no_grad():
        # registered after the noise hook, so it sees the noisy output
        capture = embeddings.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
        model(input_ids=torch.cat(examples)[None], position_ids=torch.cat([torch.arange(len(e)) for e in examples])
              [None].to(model.device))
        packed = [part.sum().sqrt().item() for part in noise_norms()[0].split([len(e) for e in examples])]
        unpacked = []
        for example in examples:
            model(input_ids=example[None], attention_mask=torch.ones_like(example)[None])
            unpacked.append(noise_norms()[0].sum().sqrt().item())
    capture.remove()
    ratios = [p / u for p, u in zip(packed, unpacked)]
    return {"packed": packed, "unpacked": unpacked, "ratios": ratios, "expected": alpha / 3**0.5,
            "passed": all(abs(ratio - 1) < 0.05 for ratio in ratios) and min(unpacked) > 0}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="accumulation_check.json")
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest relative difference that passes")
    parser.add_argument("--workdir", default="/tmp/accumulation_check")
    args = parser.parse_args()
    import torch

    backend = "unsloth" if torch.cuda.is_available() and importlib.util.find_spec("unsloth") else "hf"
    if backend == "unsloth":
        import unsloth  # noqa: F401  (patches transformers and TRL before they load)
    from qwen_sft.modeling import load_base_model

    rows = rows_of_similar_length(load_base_model("tiny", backend, False, MAX_LENGTH)[1])
    workdir = Path(args.workdir)
    runs = [compare_splits(backend, rows, 8, False, workdir / "unpacked")]
    packed_error = None
    if backend == "unsloth":
        try:  # a failure here must not lose the unpacked results
            runs.append(compare_splits(backend, rows, 4, True, workdir / "packed"))  # 8 rows packed into 4
        except Exception as error:  # noqa: BLE001  (recorded, and the command exits 1)
            packed_error = f"{type(error).__name__}: {error}"
            print(f"packed run failed: {packed_error}", flush=True)
    whole, _ = lora_gradients(backend, rows, 8, 1, False, workdir / "reference")
    mean_of_means = relative_difference(whole, mean_of_means_gradients(backend, rows, workdir / "rows"))
    worst = max(split["relative_difference"] for run in runs for split in run["splits"].values())
    try:  # a failure here must not lose the gradient results
        neftune = neftune_norms(backend, rows)
    except Exception as error:  # noqa: BLE001  (recorded, and the command exits 1)
        neftune = {"error": f"{type(error).__name__}: {error}", "passed": False, "ratios": [], "unpacked": [],
                   "expected": None}
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "backend": backend,
        "runs": runs,
        "mean_of_means_relative_difference": round(mean_of_means, 4),
        "worst_relative_difference": worst,
        "tolerance": args.tolerance,
        "packed_error": packed_error,
        "passed": worst < args.tolerance < mean_of_means and packed_error is None,
        "neftune_noise_per_example": neftune,
    }
    for run in runs:
        for shape, split in run["splits"].items():
            print(f"{backend} packing={run['packing']} {run['whole_batch']}x1 vs {shape}: relative difference "
                  f"{split['relative_difference']:.2e}, token count supplied by qwen_sft: "
                  f"{split['token_count_supplied_by_qwen_sft']}")
    print(f"a mean of per-row means differs by {mean_of_means:.3f}; passed: {record['passed']}")
    print(f"NEFTune noise per example, packed / unpacked: {[round(r, 3) for r in neftune['ratios']]} "
          f"(unpacked norms {[round(n, 3) for n in neftune['unpacked']]}, expected {neftune['expected']}); "
          f"passed: {neftune['passed']} {neftune.get('error', '')}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    sys.exit(0 if record["passed"] and neftune["passed"] else 1)


if __name__ == "__main__":
    main()
