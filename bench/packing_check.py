"""Does packing change the loss? On a GPU with Unsloth, compares each example's completion-only loss computed
(1) in an ordinary padded batch, (2) packed padding-free through Unsloth's default packed attention, and
(3) packed through torch's varlen flash kernel (qwen_sft.packed_attention), and (4) packed with the example
boundaries hidden from attention, which must differ (showing the check can fail). It also reports the share of
real tokens per batch on the data stage's mix with and without packing.

  python bench/packing_check.py --model /tmp/qwen7b-random --mix mixed_finetune_dataset.jsonl
"""

import argparse
import json
import os
import random
from pathlib import Path

from qwen_sft import defaults

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("UNSLOTH_RETURN_LOGITS", "1")  # the check needs logits, not only Unsloth's fused loss


def per_example_losses(logits, labels, boundaries):
    """Mean next-token cross-entropy over each example's labelled tokens; `boundaries` are (row, start, end)."""
    import torch

    losses = []
    for row, start, end in boundaries:
        predicted = logits[row, start:end - 1].float()
        target = labels[row, start + 1:end]
        keep = target != -100
        losses.append(torch.nn.functional.cross_entropy(predicted[keep], target[keep]).item())
    return losses


def real_token_shares(rows: list[dict], batch_size: int, max_length: int, seed: int) -> dict:
    """Real tokens / token slots per batch, padded (random order, as training shuffles) vs packed (TRL's BFD)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    lengths = [len(row["input_ids"]) for row in rows]
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    padded = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        padded.append(sum(batch) / (batch_size * max(batch)))
    packed_rows = pack_dataset(Dataset.from_dict({"input_ids": [row["input_ids"] for row in rows]}), max_length, "bfd")
    packed_lengths = [len(ids) for ids in packed_rows["input_ids"]]
    # Padding-free batches concatenate the packed rows: no pad tokens at all. Slots per packed row = max_length.
    return {
        "rows": len(rows),
        "median_row_tokens": sorted(lengths)[len(lengths) // 2],
        "unpacked_real_token_share": round(sum(padded) / len(padded), 4),
        "packed_padding_free_real_token_share": 1.0,
        "packed_fill_of_max_length": round(sum(packed_lengths) / (len(packed_lengths) * max_length), 4),
    }


def one_packed_row(rows: list[dict], examples: int, max_seq_length: int, seed: int = 0) -> list[dict]:
    """At most `examples` random rows that together fit in `max_seq_length`, as a packed training row does (a
    sequence past max_seq_length would be cut by Unsloth when the boundaries are hidden), labelled on their
    completions only."""
    shuffled, sample = random.Random(seed).sample(rows, len(rows)), []
    for row in shuffled:
        if len(sample) < examples and sum(len(r["input_ids"]) for r in sample) + len(row["input_ids"]) <= \
                max_seq_length:
            sample.append(row)
    return [{"input_ids": row["input_ids"],
             "labels": [t if bit else -100 for t, bit in zip(row["input_ids"], row["completion_mask"])]}
            for row in sample]


def padded_and_packed_losses(model, padded, packed, lengths: list[int]) -> tuple[list[float], dict, str]:
    """Per-example losses of the padded batch (the reference) and of each packed variant, and the varlen attention
    that qwen_sft.packed_attention put in place."""
    import torch

    from qwen_sft.packed_attention import enable_varlen_packed_attention

    padded_bounds = [(i, 0, n) for i, n in enumerate(lengths)]
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    packed_bounds = [(0, start, start + n) for start, n in zip(offsets, lengths)]

    def forward(batch):
        with torch.no_grad():
            inputs = {key: value.cuda() for key, value in batch.items() if key != "labels"}
            return model(**inputs).logits

    model.train()  # the training forward, as SFTTrainer runs it (LoRA dropout is 0)
    reference = per_example_losses(forward(padded), padded["labels"].cuda(), padded_bounds)
    variants = {"unsloth_default_packed": None, "varlen_packed": None, "boundaries_hidden": None}
    variants["unsloth_default_packed"] = per_example_losses(forward(packed), packed["labels"].cuda(), packed_bounds)
    attention = enable_varlen_packed_attention()
    variants["varlen_packed"] = per_example_losses(forward(packed), packed["labels"].cuda(), packed_bounds)
    hidden = {"input_ids": packed["input_ids"], "position_ids": torch.arange(sum(lengths)).unsqueeze(0)}
    variants["boundaries_hidden"] = per_example_losses(forward(hidden), packed["labels"].cuda(), packed_bounds)
    return reference, variants, attention


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/qwen7b-random")
    parser.add_argument("--mix", default=str(ROOT / defaults.MIX_FILE))
    parser.add_argument("--examples", type=int, default=8, help="at most this many examples, together within max_seq_length")
    parser.add_argument("--max_seq_length", type=int, default=defaults.MAX_SEQ_LENGTH)
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest allowed |loss difference| (bf16)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "packing_check.json"))
    args = parser.parse_args()

    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qwen_sft.data import tokenize_records
    from qwen_sft.modeling import add_lora, load_base_model
    from qwen_sft.records import read_records
    from qwen_sft.template import DEFAULT_SYSTEM_PROMPT

    model, tokenizer = load_base_model(args.model, "unsloth", True, args.max_seq_length)
    model = add_lora(model, "unsloth", 16, 32, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"], 3407, True)
    rows = tokenize_records(tokenizer, read_records(args.mix), DEFAULT_SYSTEM_PROMPT, args.max_seq_length).rows
    shares = real_token_shares(rows, 2, args.max_seq_length, 3407)

    sample = one_packed_row(rows, args.examples, args.max_seq_length)
    lengths = [len(row["input_ids"]) for row in sample]
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(sample)
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(sample)
    reference, variants, attention = padded_and_packed_losses(model, padded, packed, lengths)
    differences = {name: max(abs(a - b) for a, b in zip(reference, losses)) for name, losses in variants.items()}
    record = {
        "model": args.model,
        "example_lengths": lengths,
        "padded_losses": reference,
        "packed_losses": variants,
        "max_abs_difference": differences,
        "tolerance": args.tolerance,
        "packed_matches_padded": {name: differences[name] <= args.tolerance
                                  for name in ("unsloth_default_packed", "varlen_packed")},
        "check_can_fail": differences["boundaries_hidden"] > args.tolerance,
        "varlen_attention": attention,
        "real_token_share_on_mix": shares,
    }
    print(json.dumps(record, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
