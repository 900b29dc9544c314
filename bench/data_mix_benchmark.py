"""Benchmark of the Option B mix: write local sources in the three hub schemas, build a 240,000-row mix through
data_set_generation.py (a subprocess, as a user runs it) and print output rows/s and peak RSS.

The sources are synthetic but shaped like the hub datasets: SlimOrca conversations with the real system prompts,
PubMedQA pqa_labeled at its real size (1,000 rows), StackExchange questions and 2-5 HTML answers with code blocks,
lists, links and entities, about a quarter of them outside the three keyword domains, and a report file large
enough for the my_reports share. Row lengths vary log-normally like the originals; a few rows are duplicates or too
long, so the filters do real work. Files are sized so every bucket fills with room to spare.

  python bench/data_mix_benchmark.py                              # sources in a temporary folder, 2 runs
  python bench/data_mix_benchmark.py --data_dir /tmp/mixbench     # keep (and reuse) the sources there
  python bench/data_mix_benchmark.py --total_samples 3000 --data_dir /tmp/mix3k --sources_only   # sources only
"""

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qwen_sft.cli import parse_config, run_stage
from qwen_sft.localhub.synthetic import write_sources

TOTAL_SAMPLES = 240000  # rows in the benchmarked mix
RATIOS = {"my_reports": 0.05, "orca": 0.45, "bio": 0.2, "ai": 0.15, "ic": 0.15}  # Option B's default shares
HEADROOM = 1.3  # source rows written per row the mix needs (rows are rejected, filtered, duplicated)
DATA_DIR = ""  # where the sources are written (and reused if present); empty = a temporary folder
RUNS = 2  # timed runs of data_set_generation.py; the median is reported
SEED = 0  # seed of the synthetic sources
SOURCES_ONLY = False  # write the sources and stop (to inspect them, or to reuse them with --data_dir)
REFERENCE_LOOP = 5_000_000  # iterations of the fixed pure-Python loop timed before each run


def reference_loop_seconds() -> float:
    """CPU seconds of a fixed pure-Python loop. On a shared VM the host's speed drifts (the same mix took 16 to
    21 CPU s within minutes here), so each run is shown next to this measure of how fast the CPU was."""
    started = time.process_time()
    total = 0
    for number in range(REFERENCE_LOOP):
        total += number
    return time.process_time() - started


def timed_run(command: list[str]) -> tuple[float, int]:
    """Run the stage; return its wall time and the peak summed RSS of its process tree (workers included)."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(member.memory_info().rss for member in tree))
        except psutil.Error:  # a process ended between listing and measuring it
            pass
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"data_set_generation.py failed:\n{process.stderr.read()[-3000:]}")
    return elapsed, peak


def main():
    cfg = parse_config(globals())
    with tempfile.TemporaryDirectory(prefix="mixbench-") as scratch:
        folder = Path(cfg.data_dir or scratch)
        paths = write_sources(folder, cfg.total_samples, cfg.ratios, cfg.headroom, cfg.seed)
        if cfg.sources_only:
            return
        output = Path(scratch) / "mix.jsonl"
        command = [
            sys.executable, str(Path(__file__).resolve().parents[1] / "data_set_generation.py"),
            "--my_report_data_path", str(paths["my_reports"]),
            "--sources", ",".join(f"{name}={paths[name]}" for name in ("orca", "pubmed", "stackexchange")),
            "--total_samples", str(cfg.total_samples),
            "--ratios", ",".join(f"{key}={value}" for key, value in cfg.ratios.items()),
            "--output_file", str(output),
        ]
        print("timed command:", " ".join(command))
        timings, cpu_seconds, tree_peaks = [], [], []
        for run in range(cfg.runs):
            load = os.getloadavg()[0]  # other work on the machine slows the run: report it
            reference = reference_loop_seconds()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            elapsed, tree_peak = timed_run(command)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the stage and its workers, once they have exited
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            rows = sum(1 for _ in open(output, encoding="utf-8"))
            timings.append(elapsed)
            cpu_seconds.append(cpu)
            tree_peaks.append(tree_peak)
            print(f"run {run + 1}: {rows:,} rows in {elapsed:.2f} s = {rows / elapsed:,.0f} rows/s; "
                  f"{cpu:.1f} CPU s; peak RSS of the process tree {tree_peak / 2**30:.2f} GiB; "
                  f"load average before it {load:.1f} on {os.cpu_count()} CPUs, reference loop {reference:.2f} CPU s")
        largest_process = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
        median = statistics.median(timings)
        print(f"median of {cfg.runs} runs: {rows:,} rows in {median:.2f} s = {rows / median:,.0f} output rows/s, "
              f"{statistics.median(cpu_seconds):.1f} CPU s; peak RSS {largest_process:.2f} GiB (largest process, "
              f"getrusage), {max(tree_peaks) / 2**30:.2f} GiB (whole process tree, sampled)")


if __name__ == "__main__":
    run_stage(main)
