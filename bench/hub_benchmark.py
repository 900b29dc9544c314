"""Benchmark of Option B against a hub: replicas of the three datasets with their real repo layouts (qwen_sft/localhub)
served on loopback by its hub server, and data_set_generation.py run against it with
HF_ENDPOINT set, as a user runs it. Prints and records the rows and bytes read and the rows/s drawn from
StackExchange; `--snapshot true` builds the same mix from the replica folders instead (no network).

The StackExchange replica has the default's nine on-topic sites, sized roughly in the real sites' proportions,
plus two off-topic ones, Stackoverflow.com (half of all rows, as it is most of the real dataset) and askubuntu.com.

  python bench/hub_benchmark.py --data_dir /tmp/hubbench                      # this code's defaults, via the hub
  python bench/hub_benchmark.py --data_dir /tmp/hubbench --snapshot true      # the same mix from the folders
  python bench/hub_benchmark.py --data_dir /tmp/hubbench --code_dir /tmp/before --label before   # older code
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from data_mix_benchmark import reference_loop_seconds
from qwen_sft.cli import parse_config, run_stage
from qwen_sft.localhub.replicas import write_pubmedqa, write_slimorca, write_stackexchange
from qwen_sft.localhub.server import HubServer

repo_root = Path(__file__).resolve().parents[1]

TOTAL_SAMPLES = 240000  # rows in the benchmarked mix (Option B's default)
DATA_DIR = "/tmp/hub_benchmark"  # where the replicas are written (and reused if present)
CODE_DIR = ""  # run data_set_generation.py from this checkout instead (e.g. the code before a change)
LABEL = "after"  # name of this measurement in the results file
SNAPSHOT = False  # read the replica folders directly (no hub, no network) instead of through the hub server
RESULTS = "bench/results/hub_option_b.json"  # measurements are added to this file under LABEL
SITE_ROWS = {
    "Stackoverflow.com": 250_000, "askubuntu.com": 40_000,
    "stats.stackexchange.com": 60_000, "electronics.stackexchange.com": 60_000, "cs.stackexchange.com": 15_000,
    "chemistry.stackexchange.com": 30_000, "biology.stackexchange.com": 50_000,
    "datascience.stackexchange.com": 15_000, "ai.stackexchange.com": 5_000,
    "bioinformatics.stackexchange.com": 4_000, "medicalsciences.stackexchange.com": 4_000,
}  # replica rows per site folder
ORCA_ROWS = 130_000  # replica SlimOrca rows (Option B takes 45% of TOTAL_SAMPLES)
DISTINCT_ROWS = 5_000  # rows generated per site; the rest reuse them with the question id in the text


def replicas(folder: Path) -> dict[str, Path]:
    paths = {"orca": folder / "orca", "pubmed": folder / "pubmed", "stackexchange": folder / "stackexchange"}
    if not (folder / "done").exists():
        started = time.perf_counter()
        write_slimorca(paths["orca"], ORCA_ROWS)
        write_pubmedqa(paths["pubmed"])
        files = {site: max(1, rows // 25_000) for site, rows in SITE_ROWS.items()}
        write_stackexchange(paths["stackexchange"], SITE_ROWS, files, row_group_size=1000, distinct=DISTINCT_ROWS)
        (folder / "done").write_text("")
        print(f"wrote the replicas to {folder} in {time.perf_counter() - started:.0f} s")
    return paths


def snapshot_sources(paths: dict[str, Path]) -> str:
    """The stage's default sources, pointed at the replica folders (the same site folders, in the same order)."""
    import runpy

    default = runpy.run_path(str(repo_root / "data_set_generation.py"))["SOURCES"]["stackexchange"]
    folders = default.split("/", 2)[2].split("+")
    sites = "+".join(str(paths["stackexchange"] / folder) for folder in folders)
    return f"orca={paths['orca']},pubmed={paths['pubmed']},stackexchange={sites}"


def main():
    cfg = parse_config(globals())
    folder = Path(cfg.data_dir)
    paths = replicas(folder)
    code = Path(cfg.code_dir or repo_root)
    reference_s = reference_loop_seconds()
    output = folder / f"mix_{cfg.label}.jsonl"
    command = [sys.executable, str(code / "data_set_generation.py"), "--total_samples", str(cfg.total_samples),
               "--my_report_data_path", str(folder / "reports.jsonl"), "--output_file", str(output),
               "--ratios", "my_reports=0,orca=0.45,bio=0.2,ai=0.175,ic=0.175"]
    if cfg.snapshot:
        command += ["--sources", snapshot_sources(paths)]
    repos = {"Open-Orca/SlimOrca": [paths["orca"]], "qiaojin/PubMedQA": [paths["pubmed"]],
             "HuggingFaceH4/stack-exchange-preferences": [paths["stackexchange"]]}
    (folder / "reports.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    with HubServer(repos) as hub:
        env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
        env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(folder / f"hf_home_{time.time_ns()}"))
        if cfg.snapshot:
            env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        load = os.getloadavg()[0]  # other work on the machine slows the run: record it
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=code)
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the stage and its workers, once they have exited
        if result.returncode != 0:
            sys.exit(f"data_set_generation.py failed:\n{result.stderr[-3000:]}")
        requests, bytes_sent = len(hub.sent), hub.bytes_sent
    manifest = json.loads(output.with_name(f"{output.name}.manifest.json").read_text())
    se = manifest["sources"]["stackexchange"]
    read_from = {}
    for path in hub.sent:
        if "/data/" in path:
            site = path.split("/data/")[1].split("/")[0]
            read_from[site] = read_from.get(site, 0) + 1
    record = {
        "label": cfg.label, "total_samples": cfg.total_samples, "rows_written": manifest["output"]["rows"],
        "wall_s": round(elapsed, 1), "stage_elapsed_s": manifest.get("elapsed_s"),
        "via": "snapshot folders" if cfg.snapshot else "hub server on loopback",
        "output_rows_per_s": round(manifest["output"]["rows"] / manifest["elapsed_s"]),
        "stackexchange": {
            "rows_read": se["rows_read"], "draw_s": se.get("draw_s"),
            "rows_read_per_s": round(se["rows_read"] / se["draw_s"]) if se.get("draw_s") else None,
            "kept": se["kept"], "file_reads_per_site": read_from,
        },
        "bytes_served": bytes_sent, "file_requests": requests,
        "shortfall": manifest["shortfall"],
        "output_sha256": manifest["output"]["sha256"],
        "reference_loop_cpu_s": round(reference_s, 3),
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
        "peak_rss_gib": round(after.ru_maxrss / 2**20, 2),  # the largest process (KiB on Linux)
        "load_average_before": round(load, 1),
    }
    print(json.dumps(record, indent=1))
    results_path = repo_root / cfg.results
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results[cfg.label] = record
    results_path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    run_stage(main)
