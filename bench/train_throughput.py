"""Training throughput on one GPU, three ways in one invocation, each in its own process (Unsloth patches
transformers when imported, so the plain HF loop must not share a process with it):

  (a) a bare Unsloth loop: NF4 base, LoRA r16 on the 7 projections, Unsloth gradient checkpointing, 8-bit AdamW,
      batch 2 x 2048 tokens, every token real;
  (b) the same loop with plain transformers + PEFT + bitsandbytes;
  (c) our training stage, `Qwen_finetuning.py`, through its real entry point on the data stage's mix
      (a realistic length mix), with packing on and 4 packed rows x 2 accumulation steps per optimizer step;
      then the same with the seed's 2 x 4, recorded as c_2x4 (the same 8 rows of up to 2048 tokens per step).

For each: real (non-pad) tokens/s and token slots/s after warm-up, peak GPU memory and time to the first step.
Prints the ratios c/a and c/b and writes a JSON record.

Why 4 x 2 for (c): with packed batches Unsloth runs its eager per-op decoder (its per-block torch.compile skips
batches that carry packed sequence lengths), and at 2 x 2048 tokens per micro-batch the host's kernel launches,
not the GPU, set the pace (`bench/profile_training.py` measures this). Twice the tokens per micro-batch keep the
GPU busy for the same tokens per optimizer step.

  python bench/train_throughput.py --model /tmp/qwen7b-random --mix mixed_finetune_dataset.jsonl
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_bare_model(kind: str, model_path: str, seq: int):
    """The NF4 base with LoRA r16 on the 7 projections and gradient checkpointing, as Unsloth or plain HF + PEFT."""
    import torch

    if kind == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_path, max_seq_length=seq, load_in_4bit=True, dtype=None)
        return FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=32, lora_dropout=0, target_modules=LORA_TARGETS, bias="none",
            use_gradient_checkpointing="unsloth", random_state=3407,
        )
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quantization,
                                                 dtype=torch.bfloat16, device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))


def bare_training_steps(model, batch: int, seq: int):
    """An endless bare loop (8-bit AdamW, every token real); yields after each step, for the caller to time it."""
    import bitsandbytes as bnb
    import torch

    model.train()
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(100, model.config.vocab_size, (batch, seq), generator=generator).cuda()
    while True:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield


def bare_loop(kind: str, model_path: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    import torch

    started = time.perf_counter()
    model = load_bare_model(kind, model_path, seq)
    torch.cuda.reset_peak_memory_stats()
    loop_started = time.perf_counter()
    first_step_s = timed_from = None
    for step, _ in enumerate(bare_training_steps(model, batch, seq)):
        if step == 0:
            torch.cuda.synchronize()
            first_step_s = time.perf_counter() - loop_started
        if step == warmup - 1:
            torch.cuda.synchronize()
            timed_from = time.perf_counter()
        if step == warmup + steps - 1:
            break
    torch.cuda.synchronize()
    rate = batch * seq * steps / (time.perf_counter() - timed_from)
    return {
        "what": f"bare {kind} loop, batch {batch} x {seq}, every token real",
        "real_tokens_per_s": round(rate, 1),
        "token_slots_per_s": round(rate, 1),
        "real_token_share": 1.0,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "time_to_first_step_s": round(first_step_s, 2),
        "load_s": round(loop_started - started, 1),
        "timed_steps": steps,
    }


def batch_shape(text: str) -> tuple[str, str]:
    """`4x2` -> ("4", "2"): rows per micro-batch and accumulation steps, for --stage_batches."""
    rows, _, accumulation = text.partition("x")
    if not (rows.isdigit() and accumulation.isdigit() and int(rows) > 0 and int(accumulation) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not ROWSxACCUMULATION, e.g. 4x2")
    return rows, accumulation


def stage_flags(model_path: str, mix: str, steps: int) -> list[str]:
    """Qwen_finetuning.py's flags in every benchmark run: Unsloth, packing on, no eval split, no checkpoints."""
    return [
        "--base_model", model_path, "--dataset_path", mix, "--max_steps", str(steps), "--eval_ratio", "0",
        "--save_steps", "100000", "--logging_steps", "5", "--backend", "unsloth", "--packing", "true",
    ]


def training_stage(model_path: str, mix: str, steps: int, extra: list[str], workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "Qwen_finetuning.py"), *stage_flags(model_path, mix, steps), *extra]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=workdir, check=True)
    manifest = json.loads((workdir / "Qwen_finetuning_model" / "manifest.json").read_text())
    throughput, tokens = manifest["throughput"], manifest["tokens"]
    steady = throughput["steady_state"]
    return {
        "what": "Qwen_finetuning.py on the data stage's mix, " + " ".join(command[4:]),
        "real_tokens_per_s": steady["real_tokens_per_s"],
        "token_slots_per_s": steady["token_slots_per_s"],
        "real_token_share": tokens["real_token_share"],
        "peak_gpu_memory_gib": throughput["peak_gpu_memory_gib"],
        "time_to_first_step_s": throughput["time_to_first_step_s"],
        "measured_steps": steady["measured_steps"],
        "effective_batch_size": manifest["effective_batch_size"],
        "wall_time_s": manifest["wall_time_s"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/qwen7b-random", help="model folder; built (random 7B) if missing")
    parser.add_argument("--mix", default=str(ROOT / "mixed_finetune_dataset.jsonl"), help="the data stage's output")
    parser.add_argument("--steps", type=int, default=12, help="timed steps of the bare loops")
    parser.add_argument("--warmup", type=int, default=4, help="untimed first steps of the bare loops")
    parser.add_argument("--stage_steps", type=int, default=20, help="optimizer steps of the training stage run")
    parser.add_argument("--stage_batches", type=batch_shape, nargs="+", default=[("4", "2"), ("2", "4")],
                        help="rows per micro-batch x accumulation steps of each stage run (default 4x2 2x4); "
                             "the first is (c)")
    parser.add_argument("--stage_flags", default="",
                        help='extra flags for Qwen_finetuning.py, space-separated: --stage_flags="--seed 1"')
    parser.add_argument("--only", choices=["a", "b"], help="internal: run one bare loop and print its JSON")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_throughput.json"))
    args = parser.parse_args()

    if args.only:
        result = bare_loop({"a": "unsloth", "b": "hf"}[args.only], args.model, 2, 2048, args.steps, args.warmup)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from random_qwen7b import build

    build(args.model)
    results = {}
    for key in ("a", "b"):
        output = subprocess.run(
            [sys.executable, __file__, "--only", key, "--model", args.model, "--steps", str(args.steps),
             "--warmup", str(args.warmup)],
            check=True, capture_output=True, text=True,
        )
        print(output.stdout[-2000:], output.stderr[-1500:], flush=True)
        results[key] = json.loads(output.stdout.split("RESULT ", 1)[1])
    for index, (rows, accumulation) in enumerate(args.stage_batches):
        shape = f"{rows}x{accumulation}"
        batch_flags = ["--per_device_train_batch_size", rows, "--gradient_accumulation_steps", accumulation]
        results["c" if index == 0 else f"c_{shape}"] = training_stage(
            args.model, str(Path(args.mix).resolve()), args.stage_steps, batch_flags + args.stage_flags.split(),
            Path(f"/tmp/bench_c_{shape}"),
        )

    import torch

    record = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(0),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": "random-weight Qwen2.5-7B-Instruct shape, NF4 4-bit, LoRA r16 on 7 projections",
        "versions": {name: __import__(name).__version__ for name in ("torch", "transformers", "trl", "peft", "unsloth")},
        "results": results,
        "ratio_c_over_a": round(results["c"]["real_tokens_per_s"] / results["a"]["real_tokens_per_s"], 3),
        "ratio_c_over_b": round(results["c"]["real_tokens_per_s"] / results["b"]["real_tokens_per_s"], 3),
        "peak_memory_c_over_a": round(results["c"]["peak_gpu_memory_gib"] / results["a"]["peak_gpu_memory_gib"], 3),
    }
    for key, result in results.items():
        print(f"({key}) {result['real_tokens_per_s']:>9,.0f} real tok/s  {result['token_slots_per_s']:>9,.0f} slots/s  "
              f"real share {result['real_token_share']:.1%}  peak {result['peak_gpu_memory_gib']:.1f} GiB  "
              f"first step {result['time_to_first_step_s']:.1f} s   {result['what']}")
    print(f"c/a = {record['ratio_c_over_a']}   c/b = {record['ratio_c_over_b']}   "
          f"peak memory c/a = {record['peak_memory_c_over_a']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
