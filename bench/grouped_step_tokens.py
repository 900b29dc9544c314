"""Tokens per optimizer step in the default path's length-grouped order, per 5-step interval of a run's first 30
steps: why the tokens/s line falls within a run (bench/README.md). CPU only; the mix is the data stage's output.

  python bench/grouped_step_tokens.py --mix /tmp/h200_run/mix.jsonl
"""

import argparse
import statistics


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mix", required=True, help="the data stage's output (JSONL)")
    parser.add_argument("--rows_per_step", type=int, default=8, help="rows per optimizer step (the seed's 8)")
    parser.add_argument("--seeds", default="3407,1,2", help="sampler seeds (the trainer's own draw differs)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from qwen_sft.data import split_records, tokenize_records
    from qwen_sft.records import read_records
    from qwen_sft.template import DEFAULT_SYSTEM_PROMPT
    from qwen_sft.tiny import tiny_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_path())  # the real Qwen2.5 tokenizer
    train, _ = split_records(read_records(args.mix), 0.1, 42)  # the stage's default split
    lengths = [len(row["input_ids"]) for row in tokenize_records(tokenizer, train, DEFAULT_SYSTEM_PROMPT, 2048).rows]
    print(f"{len(lengths)} training rows: longest {max(lengths)}, median {statistics.median(lengths):.0f}, mean "
          f"{statistics.mean(lengths):.0f} tokens")
    size = args.rows_per_step
    for seed in map(int, args.seeds.split(",")):
        order = get_length_grouped_indices(lengths, size, generator=torch.Generator().manual_seed(seed))
        steps = [sum(lengths[i] for i in order[step * size:(step + 1) * size]) for step in range(30)]
        print(f"seed {seed}: mean tokens per step, steps 1-5 ... 26-30:",
              [round(statistics.mean(steps[start:start + 5])) for start in range(0, 30, 5)])


if __name__ == "__main__":
    main()
