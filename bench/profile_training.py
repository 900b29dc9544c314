"""Where the training stage's time goes, against the bare Unsloth loop: a torch profiler window over the same number
of micro-batches of each, after warm-up, each in its own process.

  (a) train_throughput.py's bare Unsloth loop, batch 2 x 2048, every token real;
  (c) Qwen_finetuning.py with --packing true on the data stage's mix, with --stage_flags (default: the seed's
      2 rows x 4 accumulation steps).

For each: the window's wall time, the GPU's kernel time and busy share (kernel time / wall time), the host's CPU
time, tokens/s under the profiler, the median host time per micro-batch just before the window (unprofiled), and
the top GPU kernels and host operations. A GPU busy share well below 1 means the host paces the GPU.

  python bench/profile_training.py --model /tmp/qwen7b-random --mix mixed_finetune_dataset.jsonl
"""

import argparse
import json
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qwen_sft import defaults

ROOT = Path(__file__).resolve().parents[1]


class ProfileWindow:
    """Call `tick(tokens)` at the start of every micro-batch. The profiler runs from the start of micro-batch
    `start` to the start of micro-batch `start + count`, so the window holds whole micro-batches, optimizer steps
    and data loading included; then the result is printed as one `RESULT {json}` line."""

    def __init__(self, what: str, start: int, count: int):
        self.what, self.start, self.count = what, start, count
        self.ticks, self.tokens, self.tick_times = 0, 0, []
        self.profiler = self.started = None
        self.done = False

    def tick(self, tokens: int):
        import torch

        self.ticks += 1
        self.tick_times.append(time.perf_counter())
        if self.ticks == self.start:
            torch.cuda.synchronize()
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            self.profiler.__enter__()
            self.started = time.perf_counter()
        if self.start <= self.ticks < self.start + self.count:
            self.tokens += tokens
        if self.ticks == self.start + self.count:
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.started
            self.profiler.__exit__(None, None, None)
            print("RESULT " + json.dumps(self.summary(wall)), flush=True)
            self.done = True

    def summary(self, wall: float) -> dict:
        from torch.autograd import DeviceType

        gpu_s = sum(e.self_device_time_total for e in self.profiler.events() if e.device_type == DeviceType.CUDA) / 1e6
        averages = self.profiler.key_averages()
        kernels = sorted((a for a in averages if a.device_type == DeviceType.CUDA),
                         key=lambda a: a.self_device_time_total, reverse=True)
        host_ops = sorted((a for a in averages if a.device_type == DeviceType.CPU),
                          key=lambda a: a.self_cpu_time_total, reverse=True)
        host_s = sum(a.self_cpu_time_total for a in host_ops) / 1e6
        periods = [b - a for a, b in zip(self.tick_times, self.tick_times[1:])]
        before_window = periods[max(0, self.start - 1 - self.count):self.start - 1]
        return {
            "what": self.what,
            "micro_batches": self.count,
            "tokens": self.tokens,
            "window_wall_s": round(wall, 3),
            "gpu_kernel_s": round(gpu_s, 3),
            "gpu_busy_share": round(gpu_s / wall, 3),
            "host_cpu_s": round(host_s, 3),
            "tokens_per_s_profiled": round(self.tokens / wall, 1),
            "gpu_kernel_ms_per_1k_tokens": round(1000 * gpu_s / self.tokens * 1000, 2),
            "median_micro_batch_ms_before_window": round(1000 * statistics.median(before_window), 1),
            "top_gpu_kernels_ms": {a.key[:100]: round(a.self_device_time_total / 1000, 1) for a in kernels[:15]},
            "top_host_ops_ms": {a.key[:100]: round(a.self_cpu_time_total / 1000, 1) for a in host_ops[:15]},
        }


def profile_bare_loop(model_path: str, start: int, count: int):
    from train_throughput import bare_training_steps, load_bare_model

    window = ProfileWindow("bare Unsloth loop, batch 2 x 2048, every token real", start, count)
    steps = bare_training_steps(load_bare_model("unsloth", model_path, 2048), 2, 2048)
    while not window.done:
        window.tick(2 * 2048)
        next(steps)


def stage_config(stage_flags: list[str]):
    """Qwen_finetuning.py's config for these flags, resolved as its main() resolves it (presets included)."""
    from qwen_sft.cli import parse_config
    from qwen_sft.presets import with_preset

    return parse_config(runpy.run_path(str(ROOT / "Qwen_finetuning.py")), stage_flags, resolve=with_preset("training"))


def profile_stage(stage_flags: list[str], start: int, count: int):
    """Runs the training stage in this process as Qwen_finetuning.py runs it, through train()'s trainer_class hook:
    the stage's trainer class, extended to tick the window at every micro-batch."""
    from qwen_sft.training import sft_trainer_class, train

    window = ProfileWindow("Qwen_finetuning.py " + " ".join(stage_flags), start, count)

    def profiled_trainer_class():  # called by train() after Unsloth is loaded, so TRL comes after it
        class ProfiledTrainer(sft_trainer_class()):
            def training_step(self, model, inputs, *args, **kwargs):
                window.tick(inputs["input_ids"].numel())  # packed: every slot is a real token
                return super().training_step(model, inputs, *args, **kwargs)

        return ProfiledTrainer

    train(stage_config(stage_flags), str(ROOT / "Qwen_finetuning.py"), trainer_class=profiled_trainer_class)
    if not window.done:
        raise SystemExit(f"the stage ran {window.ticks} micro-batches, fewer than the window needs; lower --start or --count, or "
                         "add a larger --max_steps to --stage_flags")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/qwen7b-random", help="model folder; built (random 7B) if missing")
    parser.add_argument("--mix", default=str(ROOT / defaults.MIX_FILE), help="the data stage's output")
    parser.add_argument("--start", type=int, default=21, help="first profiled micro-batch (after warm-up)")
    parser.add_argument("--count", type=int, default=4, help="profiled micro-batches")
    parser.add_argument("--stage_flags", default="--per_device_train_batch_size 2 --gradient_accumulation_steps 4",
                        help='extra flags for Qwen_finetuning.py, space-separated: --stage_flags="--seed 1"')
    parser.add_argument("--only", choices=["a", "c"], help="internal: profile one side in this process")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile_training.json"))
    args = parser.parse_args()

    if args.only == "a":
        return profile_bare_loop(args.model, args.start, args.count)
    if args.only == "c":
        from train_throughput import stage_flags

        flags = stage_flags(args.model, str(Path(args.mix).resolve()), 10) + args.stage_flags.split()
        return profile_stage(flags, args.start, args.count)

    from random_qwen7b import build

    build(args.model)
    results = {}
    for key in ("a", "c"):
        workdir = Path(f"/tmp/profile_{key}")
        workdir.mkdir(parents=True, exist_ok=True)
        output = subprocess.run(
            [sys.executable, __file__, "--only", key, "--model", args.model, "--mix", str(Path(args.mix).resolve()),
             "--start", str(args.start), "--count", str(args.count), f"--stage_flags={args.stage_flags}"],
            cwd=workdir, check=True, capture_output=True, text=True,
        )
        print(output.stderr[-1500:], flush=True)
        results[key] = json.loads(output.stdout.split("RESULT ", 1)[1].splitlines()[0])

    import torch

    record = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(0),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {name: __import__(name).__version__ for name in ("torch", "transformers", "trl", "unsloth")},
        "results": results,
    }
    for key, result in results.items():
        print(f"({key}) GPU busy {result['gpu_busy_share']:.0%}  {result['gpu_kernel_ms_per_1k_tokens']} GPU ms per "
              f"1k tokens  host CPU {result['host_cpu_s']} s / wall {result['window_wall_s']} s  "
              f"{result['median_micro_batch_ms_before_window']} ms per micro-batch   {result['what']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
