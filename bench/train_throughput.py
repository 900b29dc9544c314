"""Training throughput on the GPU, in one invocation, each run in its own process (Unsloth patches transformers
when imported, so the plain HF loop must not share a process with it).

One GPU (default):
  (a) a bare Unsloth loop: NF4 base, LoRA r16 on the 7 projections, Unsloth gradient checkpointing, 8-bit AdamW,
      batch 2 x 2048 tokens, every token real;
  (b) with --with_hf, the same loop with plain transformers + PEFT + bitsandbytes;
  (c_current) our training stage, `Qwen_finetuning.py`, through its real entry point on the data stage's mix,
      packed, 4 packed rows x 2 accumulation steps with gradient checkpointing (the earlier record; preset gpu24);
  (c) the same stage with --preset h200_fast: the same 4 x 2 without gradient checkpointing;
  (c_8x1) with --also_flags (default: h200_fast as one micro-batch of 8 rows), a larger micro-batch for the record.
      Every stage run takes the same 8 packed rows per optimizer step in the same order, so their losses must
      agree with c_current's up to bf16 noise (the loss parity).
For each: real (non-pad) tokens/s and token slots/s after warm-up, peak GPU memory and time to the first step.
Prints c/a (target >= 1.35), the loss parity over --stage_steps steps, and whether c's peak fits an 80 GB GPU.

Two GPUs (--two_gpus): the fast setting (c) on one GPU, then data-parallel on two with torchrun; the scaling
efficiency is the two-GPU rate over twice the one-GPU rate (target >= 90%).

The default path (--default_path): `Qwen_finetuning.py` with no batch flags, unpacked, as most users run it, in one
invocation: (seed) the seed's explicit 2 x 4 with gradient checkpointing; (auto) the `auto` batch shape with the
whole card; (auto_24gb) and (auto_16gb) `auto` under torch.cuda.set_per_process_memory_fraction caps. Every run
takes the same 8 rows per optimizer step in the same order. Prints auto/seed (target >= 3.0, >= 2.5 under the 24 GB
cap), the largest relative loss difference of each auto run against seed over the logged steps (target <= 1%),
whether any run ran out of memory or stepped down, what auto chose, and its estimate against the measured peak.

  python bench/train_throughput.py --model /tmp/qwen7b-random --mix mixed_finetune_dataset.jsonl
  python bench/train_throughput.py --model /tmp/qwen7b-random --mix mixed_finetune_dataset.jsonl --two_gpus
  python bench/train_throughput.py --model /tmp/qwen7b-random --mix mixed_finetune_dataset.jsonl --default_path
  python bench/train_throughput.py ... --default_path --default_runs auto,auto_padding_free --out padding_free.json
"""

import argparse
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FITS_80GB_GIB = 78.0  # an 80 GB GPU has 79.6 GiB; leave room for the CUDA context
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


def stage_flags(model_path: str, mix: str, steps: int) -> list[str]:
    """Qwen_finetuning.py's flags in every benchmark run: Unsloth, packing on, no eval split, no checkpoints. The
    loss is logged (a GPU sync) every 5 steps, as in the earlier records; the loss parity compares those points."""
    return [
        "--base_model", model_path, "--dataset_path", mix, "--max_steps", str(steps), "--eval_ratio", "0",
        "--save_steps", "100000", "--logging_steps", "5", "--backend", "unsloth", "--packing", "true",
    ]


def training_stage(model_path: str, mix: str, steps: int, extra: list[str], workdir: Path, gpus: int = 1) -> dict:
    """One run of the stage through its entry point on the first `gpus` GPUs (one process each, torchrun when more
    than one). The others stay hidden: one process that sees two GPUs would train with DataParallel."""

    workdir.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable]
    if gpus > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    flags = [*stage_flags(model_path, mix, steps), *extra]
    command = [*launcher, str(ROOT / "Qwen_finetuning.py"), *flags]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))))
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=workdir, check=True, env=env)
    manifest = json.loads((workdir / "Qwen_finetuning_model" / "manifest.json").read_text())
    throughput, tokens = manifest["throughput"], manifest["tokens"]
    steady = throughput["steady_state"]
    return {
        "what": f"Qwen_finetuning.py on the data stage's mix{f' on {gpus} GPUs' if gpus > 1 else ''}, "
                + " ".join(flags[2:]),
        "real_tokens_per_s": steady["real_tokens_per_s"],
        "token_slots_per_s": steady["token_slots_per_s"],
        "real_token_share": tokens["real_token_share"],
        "peak_gpu_memory_gib": throughput["peak_gpu_memory_gib"],
        "peak_gpu_memory_reserved_gib": throughput.get("peak_gpu_memory_reserved_gib"),
        "time_to_first_step_s": throughput["time_to_first_step_s"],
        "measured_steps": steady["measured_steps"],
        "effective_batch_size": manifest["effective_batch_size"],
        "world_size": manifest["world_size"],
        "loss_weighting": manifest.get("loss_weighting"),
        "wall_time_s": manifest["wall_time_s"],
        "loss_curve": [[row["step"], row["loss"]] for row in manifest["log_history"] if "loss" in row],
    }


# The caps, in GiB the allocator may reserve: a 24 GB (16 GB) card's memory less its CUDA context and driver share.
CAPS_GIB = {"auto_24gb": 22.5, "auto_16gb": 14.5}
SEED_FLAGS = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4", "--gradient_checkpointing",
              "true"]
UNSLOTH_WARNING = "could not be counted"
# torch's error and the stage's own line; not "out of memory" alone, which Unsloth's advice for runs without
# gradient checkpointing contains ("If you run out of memory, use ...": the recorded run of 2026-12-06 flagged it)
OUT_OF_MEMORY_ERRORS = ("CUDA out of memory", "OutOfMemoryError")


def stage_launcher(cap_gib: float | None, padding_free: bool) -> list[str]:
    """The command before the stage's flags: its entry point, under a memory cap set before the stage starts, or
    (padding_free) this script's in-process run of the stage with TRL's padding-free batches."""
    stage = str(ROOT / "Qwen_finetuning.py")
    if padding_free:
        return [sys.executable, __file__, "--padding_free_stage"]
    if cap_gib is None:
        return [sys.executable, stage]
    capped = ("import runpy, sys, torch; total = torch.cuda.get_device_properties(0).total_memory; "
              f"torch.cuda.set_per_process_memory_fraction({cap_gib} * 2**30 / total); "
              "sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", capped, stage]


def padding_free_stage(stage_flags: list[str]) -> None:
    """Qwen_finetuning.py as its main() runs it, but with TRL's padding-free batches and no packing: a micro-batch's
    rows concatenated into one sequence, each attending within itself through the varlen path packing uses. It
    goes through train()'s trainer_class hook; the rows are already cut to --max_seq_length, so TRL need not."""
    from qwen_sft.cli import parse_config, run_stage, say
    from qwen_sft.presets import with_preset

    def padding_free_trainer_class():
        from qwen_sft.packed_attention import enable_varlen_packed_attention
        from qwen_sft.training import sft_trainer_class

        say(f"padding-free batches, unpacked; attention: {enable_varlen_packed_attention()}")

        class PaddingFree(sft_trainer_class()):
            def __init__(self, *args, **kwargs):
                kwargs["args"].padding_free, kwargs["args"].max_length = True, None
                super().__init__(*args, **kwargs)

        return PaddingFree

    def main():
        from qwen_sft.training import train

        stage = str(ROOT / "Qwen_finetuning.py")
        train(parse_config(runpy.run_path(stage), stage_flags, resolve=with_preset("training")), stage,
              trainer_class=padding_free_trainer_class)

    run_stage(main)


def default_stage(name: str, model_path: str, mix: str, steps: int, extra: list[str], cap_gib: float | None,
                  workdir: Path, padding_free: bool = False) -> dict:
    """One run of the stage's default (unpacked) path on GPU 0 (see stage_launcher); its output is streamed and
    kept for the lines auto and Unsloth print."""
    workdir.mkdir(parents=True, exist_ok=True)
    flags = ["--base_model", model_path, "--dataset_path", mix, "--max_steps", str(steps), "--save_steps", "100000",
             "--logging_steps", "5", "--backend", "unsloth", *extra]
    command = [*stage_launcher(cap_gib, padding_free), *flags]
    print(f"$ ({name}) " + " ".join(command[-len(flags) - 1:]) + (f"   [cap {cap_gib} GiB]" if cap_gib else "")
          + ("   [padding-free]" if padding_free else ""), flush=True)
    lines = []
    with subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="0", TORCH_LOGS="recompiles")) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    output = "".join(lines).replace("\r", "\n")
    result = {"what": " ".join(flags[2:]), "cap_gib": cap_gib, "exit_code": process.returncode,
              "out_of_memory": any(error in output for error in OUT_OF_MEMORY_ERRORS),
              "stepped_down": "stepping down" in output,
              "unsloth_could_not_count_warning": UNSLOTH_WARNING in output,
              "recompilations": output.count("Recompiling function"),
              "batch_line": next((line.strip() for line in output.splitlines() if line.startswith("batch: ")), None),
              "interval_tokens_per_s": [float(part.split()[0].replace(",", "")) for line in output.splitlines()
                                        if line.startswith("step ") for part in line.split(" | ") if "tok/s" in part]}
    if process.returncode != 0:
        return result
    manifest = json.loads((workdir / "Qwen_finetuning_model" / "manifest.json").read_text())
    throughput = manifest["throughput"]
    result.update({
        "real_tokens_per_s": throughput["steady_state"]["real_tokens_per_s"],
        "token_slots_per_s": throughput["steady_state"]["token_slots_per_s"],
        "measured_steps": throughput["steady_state"]["measured_steps"],
        "real_token_share": manifest["tokens"]["real_token_share"],
        "peak_gpu_memory_gib": throughput["peak_gpu_memory_gib"],
        "peak_gpu_memory_reserved_gib": throughput.get("peak_gpu_memory_reserved_gib"),
        "time_to_first_step_s": throughput["time_to_first_step_s"],
        "batch_choice": manifest.get("batch_choice"),
        "effective_batch_size": manifest["effective_batch_size"],
        "loss_weighting": manifest.get("loss_weighting"),
        "final_eval_loss": manifest.get("final_eval_loss"),
        "wall_time_s": manifest["wall_time_s"],
        "loss_curve": [[row["step"], row["loss"]] for row in manifest["log_history"] if "loss" in row],
    })
    return result


DEFAULT_RUNS = {"seed": (SEED_FLAGS, None), "auto": ([], None), **{name: ([], cap) for name, cap in CAPS_GIB.items()},
                "auto_padding_free": ([], None)}


def default_path(args, mix: str, write) -> dict:
    """The runs named in --default_runs (the seed's explicit 2 x 4, `auto` with the whole card and under the caps,
    auto with padding-free batches), in that order; the record is written after each run."""
    results, record = {}, {}
    for name in args.default_runs.split(","):
        flags, cap = DEFAULT_RUNS[name]
        results[name] = default_stage(name, args.model, mix, args.stage_steps, flags, cap,
                                      Path(f"/tmp/bench_default_{name}"), padding_free=name == "auto_padding_free")
        record = default_summary(results, args.default_tolerance)
        write(record)
    print_default(record)
    return record


def default_summary(results: dict, tolerance: float) -> dict:
    """Ratios and loss parity of each run against the seed's split, and of padding-free against grouped padding
    (auto), from the runs done so far; the targets."""
    record = {"results": results, "targets": {"auto_over_seed": 3.0, "auto_24gb_over_seed": 2.5,
                                              "max_relative_loss_difference": tolerance}}
    pairs = [(name, "seed") for name in results if name != "seed"] + [("auto_padding_free", "auto")]
    for name, reference in pairs:
        run, base = results.get(name, {}), results.get(reference, {})
        if "real_tokens_per_s" in run and "real_tokens_per_s" in base:
            record[f"ratio_{name}_over_{reference}"] = round(run["real_tokens_per_s"] / base["real_tokens_per_s"], 3)
            record[f"loss_parity_{name}_vs_{reference}"] = loss_parity(base, run, tolerance)
    required = [run for name, run in results.items() if name != "auto_padding_free"]
    record["no_out_of_memory"] = not any(run["out_of_memory"] or run["exit_code"] for run in required)
    record["unsloth_warning_seen"] = any(run["unsloth_could_not_count_warning"] for run in results.values())
    return record


def print_default(record: dict) -> None:
    for name, run in record["results"].items():
        if "real_tokens_per_s" not in run:
            print(f"({name}) failed with exit code {run['exit_code']}; out of memory: {run['out_of_memory']}")
            continue
        choice = run["batch_choice"] or {}
        print(f"({name}) {run['real_tokens_per_s']:>9,.0f} real tok/s  peak {run['peak_gpu_memory_gib']} GiB "
              f"({run['peak_gpu_memory_reserved_gib']} reserved)  cap {run['cap_gib']}  estimate "
              f"{choice.get('need_gib')} GiB of {choice.get('free_gib')} free  {run['batch_line']}"
              f"{'  STEPPED DOWN' if run['stepped_down'] else ''}")
    for key, ratio in record.items():
        if key.startswith("ratio_"):
            name, reference = key.removeprefix("ratio_").split("_over_")
            parity = record[f"loss_parity_{name}_vs_{reference}"]
            print(f"{name}/{reference} = {ratio}   loss: max relative difference "
                  f"{parity['max_relative_difference']} over {parity['steps']} logged steps")
    print(f"no out-of-memory: {record['no_out_of_memory']}   Unsloth's 'could not be counted' warning seen: "
          f"{record['unsloth_warning_seen']}", flush=True)


def loss_parity(reference: dict, candidate: dict, tolerance: float) -> dict:
    """Per-step training loss of two runs over the same optimizer steps (same rows per step, same order)."""
    ref, cand = dict(reference["loss_curve"]), dict(candidate["loss_curve"])
    steps = sorted(set(ref) & set(cand))
    relative = [abs(cand[step] - ref[step]) / abs(ref[step]) for step in steps]
    return {
        "steps": len(steps),
        "loss_first_last_reference": [ref[steps[0]], ref[steps[-1]]] if steps else None,
        "loss_first_last_candidate": [cand[steps[0]], cand[steps[-1]]] if steps else None,
        "max_relative_difference": round(max(relative), 5) if relative else None,
        "mean_relative_difference": round(sum(relative) / len(relative), 5) if relative else None,
        "tolerance": tolerance,
        "within_tolerance": bool(relative) and max(relative) <= tolerance,
    }


def bare_loop_in_subprocess(key: str, args) -> dict:
    """Unsloth patches transformers when imported, so each bare loop runs in its own process."""
    output = subprocess.run(
        [sys.executable, __file__, "--only", key, "--model", args.model, "--steps", str(args.steps),
         "--warmup", str(args.warmup)],
        check=True, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"),
    )
    print(output.stdout[-2000:], output.stderr[-1500:], flush=True)
    return json.loads(output.stdout.split("RESULT ", 1)[1])


def versions() -> dict:
    import importlib

    return {name: importlib.import_module(name).__version__ for name in ("torch", "transformers", "trl", "peft",
                                                                         "unsloth")}


def print_results(results: dict) -> None:
    for key, result in results.items():
        print(f"({key}) {result['real_tokens_per_s']:>9,.0f} real tok/s  {result['token_slots_per_s']:>9,.0f} slots/s  "
              f"real share {result['real_token_share']:.1%}  peak {result['peak_gpu_memory_gib']} GiB  "
              f"first step {result['time_to_first_step_s']:.1f} s   {result['what']}")


def one_gpu(args, mix: str, write) -> dict:
    """(a), optionally (b), the stage's current packed setting and the fast one, with ratios and parity; the record
    is written then, and again after the optional extra run (so a time-out there loses nothing else)."""
    results = {"a": bare_loop_in_subprocess("a", args)}
    if args.with_hf:
        results["b"] = bare_loop_in_subprocess("b", args)
    results["c_current"] = training_stage(args.model, mix, args.stage_steps, args.current_flags.split(),
                                          Path("/tmp/bench_c_current"))
    results["c"] = training_stage(args.model, mix, args.stage_steps, args.fast_flags.split(), Path("/tmp/bench_c"))
    fast, bare = results["c"], results["a"]
    reserved = fast["peak_gpu_memory_reserved_gib"] or fast["peak_gpu_memory_gib"]
    record = {
        "results": results,
        "ratio_c_over_a": round(fast["real_tokens_per_s"] / bare["real_tokens_per_s"], 3),
        "ratio_c_over_c_current": round(fast["real_tokens_per_s"] / results["c_current"]["real_tokens_per_s"], 3),
        "loss_parity_c_vs_c_current": loss_parity(results["c_current"], fast, args.parity_tolerance),
        "peak_memory_c_gib": {"allocated": fast["peak_gpu_memory_gib"], "reserved": reserved,
                              "fits_80_gb_gpu": reserved is not None and reserved <= FITS_80GB_GIB},
    }
    if "b" in results:
        record["ratio_c_over_b"] = round(fast["real_tokens_per_s"] / results["b"]["real_tokens_per_s"], 3)
    print_results(results)
    parity = record["loss_parity_c_vs_c_current"]
    print(f"c/a = {record['ratio_c_over_a']} (target >= 1.35)   c/c_current = {record['ratio_c_over_c_current']}   "
          f"loss parity over {parity['steps']} logged points: max {parity['max_relative_difference']}, mean "
          f"{parity['mean_relative_difference']} (within {args.parity_tolerance}: {parity['within_tolerance']})   "
          f"peak c {fast['peak_gpu_memory_gib']} GiB allocated, {reserved} GiB reserved (fits 80 GB: "
          f"{record['peak_memory_c_gib']['fits_80_gb_gpu']})", flush=True)
    write(record)
    if args.also_flags:  # for the record only: its failure (say, out of memory) is recorded, not fatal
        name = args.also_name
        try:
            also = training_stage(args.model, mix, args.stage_steps, args.also_flags.split(), Path(f"/tmp/bench_{name}"))
        except subprocess.CalledProcessError as error:
            print(f"({name}) failed: {error}", flush=True)
            record[f"{name}_failed"] = " ".join(args.also_flags.split())
        else:
            results[name] = also
            record[f"ratio_{name}_over_a"] = round(also["real_tokens_per_s"] / bare["real_tokens_per_s"], 3)
            record[f"loss_parity_{name}_vs_c_current"] = loss_parity(results["c_current"], also, args.parity_tolerance)
            print_results({name: also})
            print(f"{name}/a = {record[f'ratio_{name}_over_a']}   loss parity vs c_current: "
                  f"{record[f'loss_parity_{name}_vs_c_current']}", flush=True)
        write(record)
    return record


def two_gpus(args, mix: str, write) -> dict:
    """The fast setting on 1 GPU, then data-parallel on 2 (torchrun): scaling efficiency = rate2 / (2 x rate1).
    The one-GPU result is written before the two-GPU run starts."""
    results = {"one_gpu": training_stage(args.model, mix, args.stage_steps, args.fast_flags.split(),
                                         Path("/tmp/bench_1gpu"), gpus=1)}
    write({"results": results})
    results["two_gpus"] = training_stage(args.model, mix, args.stage_steps, args.fast_flags.split(),
                                         Path("/tmp/bench_2gpu"), gpus=2)
    one, two = results["one_gpu"]["real_tokens_per_s"], results["two_gpus"]["real_tokens_per_s"]
    record = {"results": results, "scaling_efficiency": round(two / (2 * one), 4), "speedup": round(two / one, 3)}
    print_results(results)
    print(f"2 GPUs: {two:,.0f} real tok/s = {record['speedup']}x one GPU ({one:,.0f}); efficiency "
          f"{record['scaling_efficiency']:.1%} (target >= 90%)", flush=True)
    write(record)
    return record


def main():
    if sys.argv[1:2] == ["--padding_free_stage"]:  # internal: one padding-free run of the stage, in this process
        padding_free_stage(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/qwen7b-random", help="model folder; built (random 7B) if missing")
    parser.add_argument("--mix", default=str(ROOT / "mixed_finetune_dataset.jsonl"), help="the data stage's output")
    parser.add_argument("--steps", type=int, default=12, help="timed steps of the bare loops")
    parser.add_argument("--warmup", type=int, default=4, help="untimed first steps of the bare loops")
    parser.add_argument("--stage_steps", type=int, default=30, help="optimizer steps of each training stage run")
    parser.add_argument("--fast_flags", default="--preset h200_fast",
                        help="Qwen_finetuning.py flags of the fast setting (c), space-separated")
    parser.add_argument("--current_flags", default="--per_device_train_batch_size 4 --gradient_accumulation_steps 2",
                        help="flags of the current packed setting (c_current; the same rows per optimizer step)")
    parser.add_argument("--also_flags",
                        default="--preset h200_fast --per_device_train_batch_size 8 --gradient_accumulation_steps 1",
                        help="flags of one more stage run for the record ('' = none); pass as --also_flags='...'")
    parser.add_argument("--also_name", default="c_8x1", help="the record's name for that run")
    parser.add_argument("--parity_tolerance", type=float, default=0.02,
                        help="largest relative per-step loss difference of c vs c_current that counts as bf16 noise")
    parser.add_argument("--with_hf", action="store_true", help="also run (b), the bare transformers + PEFT loop")
    parser.add_argument("--two_gpus", action="store_true", help="measure 1 vs 2 GPUs (data parallel) instead")
    parser.add_argument("--default_path", action="store_true",
                        help="measure the default path instead: the seed's 2 x 4 against auto, whole card and capped")
    parser.add_argument("--default_runs", default="seed,auto,auto_24gb,auto_16gb",
                        help="--default_path: the runs, in order, of " + ",".join(DEFAULT_RUNS)
                        + " (auto_padding_free: auto's split with TRL's padding-free batches, unpacked)")
    parser.add_argument("--default_tolerance", type=float, default=0.01,
                        help="largest relative per-step loss difference of auto vs the seed's split (--default_path)")
    parser.add_argument("--only", choices=["a", "b"], help="internal: run one bare loop and print its JSON")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_throughput.json"))
    args = parser.parse_args()

    if args.only:
        result = bare_loop({"a": "unsloth", "b": "hf"}[args.only], args.model, 2, 2048, args.steps, args.warmup)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from random_qwen7b import build

    build(args.model)
    mix = str(Path(args.mix).resolve())
    header = {}

    def write(measured: dict) -> None:
        if not header:  # at the first write: this process touches CUDA (and imports Unsloth) only after the runs
            import torch

            header.update({
                "date": time.strftime("%Y-%m-%d"),
                "gpu": torch.cuda.get_device_name(0),
                "gpus_used": 2 if args.two_gpus else 1,
                "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "model": "random-weight Qwen2.5-7B-Instruct shape, NF4 4-bit, LoRA r16 on 7 projections",
                "versions": versions(),
            })
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**header, **measured}, indent=2) + "\n")
        print(f"wrote {args.out}", flush=True)

    (two_gpus if args.two_gpus else default_path if args.default_path else one_gpu)(args, mix, write)


if __name__ == "__main__":
    main()
