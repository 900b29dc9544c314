"""Step 6 of the mix, the whole stage (mix()): it draws each source's rows into the plan's buckets, then writes the mix.

Behind data_integration.py (Option A) and data_set_generation.py (Option B).

Every RATIOS key is a bucket with an exact quota of TOTAL_SAMPLES (rounded, the remainder to the largest share):
- the report key (`reports` / `my_reports`) takes rows from MY_REPORT_DATA_PATH;
- a key that names a KEYWORDS domain (ai, ic, bio) takes StackExchange questions that match its keywords, plus the
  rows of any other source DOMAIN_SOURCES lists for it (bio: PubMedQA);
- any other key names a SOURCES entry (orca, pubmed) and takes rows from it.

Sources are read one after another (the report file, then SOURCES in order), each through a seeded shuffle
buffer. Each drawn row is converted, validated, length-filtered and de-duplicated (ignoring case and whitespace),
then kept if its bucket still needs rows; reading a source stops once its buckets are full. A bucket that its
sources cannot fill is a shortfall: reported, never padded with repeats. The kept rows are shuffled with SEED and
written atomically, with a manifest that accounts for every row read.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import random
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from ..artifacts import Output, atomic_file, build_manifest, claim_outputs, manifest_path_for, sha256_file
from ..cli import UserError, note_interrupt, raise_if_interrupted
from ..records import IgnoredFields, read_records
from .drawing import Mixer, SourceStats, first_bad_row, open_rows
from .hub import HUB_IDENTITY_KEYS, HubRows, HubSettings, StreamLost
from .plan import OPTION_A_REPORT_KEY, OPTION_B_REPORT_KEY, MixPlan, plan_mix
from .rows import content_byte_budget
from .schemas import REPORTS
from .sources import check_local_file
from .work_state import WorkFolder
from .workers import start_worker, worker_count, worker_start_method


def _shortfalls(plan: MixPlan, stats: dict[str, SourceStats]) -> dict[str, dict]:
    return {
        bucket.key: {
            "requested": bucket.quota,
            "delivered": bucket.kept,
            "sources_read": {name: stats[name].read for name in bucket.sources if name in stats},
        }
        for bucket in plan.buckets.values()
        if bucket.kept < bucket.quota
    }


def _stopped_after(stats: dict[str, SourceStats], sources_read: dict[str, int]) -> list[str]:
    return [
        f"{name} after {read:,} rows" + (" (MAX_ROWS_READ)" if stats[name].reached_max_rows_read else "")
        for name, read in sources_read.items()
    ]


def _write_shuffled(lines: list[bytes], output_file: Path, seed: int, describe) -> None:
    """Shuffle with `seed` and write the file and its manifest, describe(sha256 of the file), as one unit."""
    random.Random(seed).shuffle(lines)
    digest = hashlib.sha256()
    with atomic_file(output_file, "wb", manifest=lambda _: describe(digest.hexdigest())) as handle:
        for line in lines:
            digest.update(line)
            handle.write(line)
        raise_if_interrupted()  # the last chance before the rename (see cli.note_interrupt)


def _print_summary(plan: MixPlan, stats: dict[str, SourceStats]) -> None:
    print(f"{'source':<14}{'read':>10}{'rejected':>10}{'duplicate':>10}{'filtered':>10}{'kept':>10}")
    for source in plan.sources:
        item = stats[source.key]
        print(
            f"{source.key:<14}{item.read:>10,}{sum(item.rejected.values()):>10,}{item.duplicates:>10,}"
            f"{sum(item.filtered.values()):>10,}{sum(item.kept.values()):>10,}"
        )
    print(f"{'bucket':<14}{'requested':>10}{'delivered':>10}")
    for bucket in plan.buckets.values():
        print(f"{bucket.key:<14}{bucket.quota:>10,}{bucket.kept:>10,}")


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (a job scheduler, `kill`) stops the mix as Ctrl-C does: the pool shuts down and nothing is written.
    Only the main thread can install signal handlers; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    previous = signal.signal(signal.SIGTERM, note_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C and SIGTERM back for the block (they arrive as soon as it ends). Processes started in the block
    inherit the held set, so workers release it in start_worker."""
    signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)


def claim_mix_output(cfg, plan: MixPlan, stage: str):
    """The output rule (qwen_sft/artifacts.py) for the mix: never over an input, nor over a file this stage did not
    write; yields {"--output_file": the path to write (a link's target)}."""
    inputs = {"--my_report_data_path": cfg.MY_REPORT_DATA_PATH}
    for source in plan.sources:  # every file a folder or glob resolves to, e.g. a mix written beside its sources
        if not source.is_hub:
            count = len(source.files)
            inputs.update({f"--sources {source.key}" + (f" file {number} of {count}" if count > 1 else ""): str(path)
                           for number, path in enumerate(source.files, 1)})
    return claim_outputs(inputs, [Output("--output_file", cfg.OUTPUT_FILE)], stage, cfg.OVERWRITE_OUTPUT)


def _draw_all(plan: MixPlan, cfg, mixer: Mixer, work: WorkFolder) -> dict[str, dict]:
    """Draw every source into the buckets, continuing the work a lost hub stream left; returns what each hub
    source resolved to. A hub stream lost for good saves the work and ends the run with one line."""
    settings = HubSettings(float(cfg.HUB_TIMEOUT_SECONDS), float(cfg.NETWORK_RETRY_SECONDS))
    fingerprint = WorkFolder.fingerprint(cfg, plan)
    saved = work.load(fingerprint, plan) or {"done": [], "hub": {}, "mixer": None, "source": None, "rows": None}
    if saved["mixer"]:
        mixer.lines, mixer.seen, mixer.stats, kept = saved["mixer"]
        for key, count in kept.items():
            plan.buckets[key].kept = count
        print(f"continuing the work saved in {work.folder} (done: {', '.join(saved['done']) or 'none'})")
    hub_sources = dict(saved["hub"])
    todo = [source for source in plan.sources if source.key not in saved["done"]]
    rows = {
        source.key: open_rows(source, cfg.SEED, cfg.SHUFFLE_BUFFER, settings,
                              saved["rows"] if source.key == saved["source"] else None)
        for source in todo
    }
    hub_sources.update({key: item.hub for key, item in rows.items() if isinstance(item, HubRows)})
    done = list(saved["done"])
    for source in todo:
        try:
            mixer.draw(source, rows[source.key])
        except StreamLost as lost:
            stats = mixer.stats[source.key]
            kept = {key: bucket.kept for key, bucket in plan.buckets.items()}
            work.save({
                "fingerprint": fingerprint, "done": done, "hub": hub_sources, "source": source.key,
                "rows": rows[source.key].state, "mixer": (mixer.lines, mixer.seen, mixer.stats, kept),
            })
            raise UserError(
                f"{source.key}: the connection to {hub_sources[source.key]['endpoint']} stayed lost for "
                f"{settings.retry_s:g} s ({lost}) after {stats.read:,} rows read and {sum(stats.kept.values()):,} "
                f"kept; the work is saved in {work.folder}: run the same command again to continue"
            ) from None
        done.append(source.key)
    return hub_sources


def _source_identity(file_hashes: dict | None, hub: dict | None) -> dict:
    """The manifest's record of what a source was: each local file's sha256, or the hub commit and files read."""
    if hub:
        return {key: hub[key] for key in HUB_IDENTITY_KEYS}
    if len(file_hashes) == 1:
        return {"sha256": next(iter(file_hashes.values()))}
    return {"files": file_hashes}


# The stage each report key's script is, named in the manifest whatever the script's file is called.
MIX_STAGE = {OPTION_A_REPORT_KEY: "data_integration", OPTION_B_REPORT_KEY: "data_set_generation"}


def mix(cfg, *, report_key: str) -> Path:
    """Build the mixed dataset described by the stage's config; returns the output path."""
    with sigterm_interrupts(), contextlib.ExitStack() as claimed:
        return _mix(cfg, report_key, MIX_STAGE[report_key], claimed)


def _mix(cfg, report_key: str, stage: str, claimed: contextlib.ExitStack) -> Path:
    started = time.perf_counter()
    plan = plan_mix(cfg, report_key)
    output_file = claimed.enter_context(claim_mix_output(cfg, plan, stage))["--output_file"]
    report = _check_inputs(cfg, plan, report_key)
    mixer, hub_sources, file_hashes = _draw_in_parallel(cfg, plan)
    shortfalls = _report_shortfalls(cfg, plan, mixer.stats)

    def describe(output_sha256: str) -> dict:  # the manifest, once the file's sha256 is known
        return _manifest(cfg, stage, plan, mixer, output={
            "path": str(output_file), "rows": len(mixer.lines), "sha256": output_sha256,
        }, shortfalls=shortfalls, file_hashes=file_hashes, hub_sources=hub_sources, started=started,
            report=report.report())

    _write_shuffled(mixer.lines, output_file, cfg.SEED, describe)
    elapsed = time.perf_counter() - started
    WorkFolder(output_file).remove()
    _print_summary(plan, mixer.stats)
    print(
        f"wrote {len(mixer.lines):,} rows to {output_file} in {elapsed:.1f} s "
        f"({len(mixer.lines) / max(elapsed, 1e-9):,.0f} rows/s); manifest {manifest_path_for(output_file)}"
    )
    return output_file


def _check_inputs(cfg, plan: MixPlan, report_key: str) -> IgnoredFields:
    """Stop before mixing on a bad report row, a missing local file or (with --fatal_bad_rows) any bad source row;
    returns the formats and ignored fields of the report file's rows."""
    report = IgnoredFields()
    if report_key in plan.feeds:
        # A bad row anywhere in the file stops the run, not only a drawn one; unused fields are named once.
        read_records(cfg.MY_REPORT_DATA_PATH, report=report)
    for source in plan.sources:
        if not source.is_hub:
            check_local_file(source)  # every missing file is reported before the slow imports and the hub
    if cfg.FATAL_BAD_ROWS:
        for source in plan.sources:
            if not source.is_hub and source.key != report_key:
                first_bad_row(source)
    return report


def _draw_in_parallel(cfg, plan: MixPlan) -> tuple[Mixer, dict[str, dict], dict[str, dict[str, str]]]:
    """Draw every source (preparing rows in worker processes for a large mix) while a thread hashes the local
    files; returns the mixer, what each hub source resolved to and each local file's sha256 per source."""
    workers = worker_count(cfg.TOTAL_SAMPLES)
    context = multiprocessing.get_context(worker_start_method())
    # A Ctrl-C half-way through setting up the pool would leave it broken, and noisy: it waits until that is done.
    with signals_held():
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=start_worker) if workers else None
    with ThreadPoolExecutor(max_workers=1) as hasher, pool or contextlib.nullcontext():
        # The workers start now (the pool starts them for waiting tasks; forked ones before this process starts
        # any thread), while hashlib (which releases the GIL) hashes the files and this process opens the sources.
        with signals_held():
            for _ in range(workers):
                pool.submit(start_worker)
        file_hashes = {
            source.key: [(path, hasher.submit(sha256_file, path)) for path in source.files]
            for source in plan.sources if not source.is_hub
        }
        mixer = Mixer(plan, cfg, pool, workers)
        hub_sources = _draw_all(plan, cfg, mixer, WorkFolder(Path(cfg.OUTPUT_FILE)))
        file_hashes = {
            key: {str(path): future.result() for path, future in items} for key, items in file_hashes.items()
        }
    return mixer, hub_sources, file_hashes


def _report_shortfalls(cfg, plan: MixPlan, stats: dict[str, SourceStats]) -> dict[str, dict]:
    """Print each bucket its sources could not fill; with SHORTFALL_IS_ERROR, stop the run instead of writing."""
    shortfalls = _shortfalls(plan, stats)
    for key, item in shortfalls.items():
        print(
            f"shortfall: {key} requested {item['requested']:,}, delivered {item['delivered']:,} "
            f"(its sources ran out: {', '.join(_stopped_after(stats, item['sources_read']))}); "
            f"rows are never repeated: add rows or lower RATIOS[{key!r}]"
        )
    if shortfalls and cfg.SHORTFALL_IS_ERROR:
        detail = ", ".join(f"{key} {item['delivered']}/{item['requested']}" for key, item in shortfalls.items())
        raise UserError(
            f"shortfall (delivered/requested): {detail}; pass --shortfall_is_error false to write it anyway"
        )
    return shortfalls


def _manifest(cfg, stage: str, plan: MixPlan, mixer: Mixer, *, output: dict, shortfalls: dict,
              file_hashes: dict, hub_sources: dict, started: float, report: dict) -> dict:
    """The mix's manifest: its buckets, what each source was and what became of every row read."""
    sources = {
        source.key: {
            "spec": source.spec,
            "kind": "hub" if source.is_hub else "file" if source.path else "files",
            "schema": source.schema.name,
            **_source_identity(file_hashes.get(source.key), hub_sources.get(source.key)),
            **mixer.stats[source.key].as_dict(source.key in plan.keyword_split),
            **(report if source.schema is REPORTS else {}),  # MY_REPORT_DATA_PATH's formats and ignored fields
        }
        for source in plan.sources
    }
    return build_manifest(
        stage,
        cfg,
        seed=cfg.SEED,
        output=output,
        buckets={
            key: {"requested": bucket.quota, "delivered": bucket.kept, "sources": bucket.sources}
            for key, bucket in plan.buckets.items()
        },
        shortfall=shortfalls,
        sources=sources,
        length_budget={"max_seq_length": cfg.MAX_SEQ_LENGTH,
                       "content_bytes": content_byte_budget(cfg.MAX_SEQ_LENGTH, cfg.SYSTEM_PROMPT)},
        elapsed_s=round(time.perf_counter() - started, 3),
    )
