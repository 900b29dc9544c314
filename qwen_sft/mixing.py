"""The mixer of both data stages: it draws each source's rows into the plan's buckets, then writes the mix.

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

import base64
import contextlib
import hashlib
import json
import multiprocessing
import random
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .artifacts import (
    Output,
    atomic_file,
    build_manifest,
    claim_outputs,
    manifest_path_for,
    sha256_file,
)
from .cli import UserError, note_interrupt, raise_if_interrupted
from .planning import OPTION_A_REPORT_KEY, OPTION_B_REPORT_KEY, MixPlan, plan_mix
from .preparation import (
    cyclic_gc_paused,
    prepared_chunks,
    start_worker,
    worker_count,
    worker_start_method,
    worth_workers,
)
from .records import IgnoredFields, read_records
from .rows import (
    FILTERED,
    MALFORMED,
    REJECTED,
    WRONG_SCHEMA,
    RowRules,
    content_byte_budget,
    convert_row,
    keyword_patterns,
)
from .sources import (
    REPORTS,
    HubRows,
    HubSettings,
    Source,
    StreamLost,
    check_local_file,
    numbered_local_rows,
    open_rows,
    read_span,
)

# Rows read from a source before its hit rates are trusted to predict a shortfall: this many, or 5% of MAX_ROWS_READ.
ESTIMATE_MIN_ROWS = 5000
NETWORK_SETTINGS = ("HUB_TIMEOUT_SECONDS", "NETWORK_RETRY_SECONDS")  # a rerun may change these and still continue
WRITE_BLOCK_ROWS = 64  # output rows joined per write: about 70 KB, under glibc's 128 KiB mmap threshold
# What the manifest records of a hub source (a work state's hub sources must have them too).
HUB_IDENTITY_KEYS = ("endpoint", "repo_id", "config", "revision", "commit_sha", "data_files", "missing_paths", "columns")
_json_string = json.encoder.encode_basestring  # the C encoder behind json.dumps(ensure_ascii=False)


@dataclass
class SourceStats:
    read: int = 0
    rejected: Counter = field(default_factory=Counter)
    duplicates: int = 0
    filtered: Counter = field(default_factory=Counter)
    unrouted: Counter = field(default_factory=Counter)  # keyword-split rows: no_keyword_match, domain_full
    keyword_hits: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    cut: Counter = field(default_factory=Counter)  # kept chats that lost turns, by why (Cut.reason)
    bad_rows_shown: int = 0
    reached_max_rows_read: bool = False
    seconds: float = 0.0  # wall time spent drawing its rows
    warned: set = field(default_factory=set)  # buckets already reported as not fillable within MAX_ROWS_READ

    def as_dict(self, keyword_split: bool) -> dict:
        summary = {
            "rows_read": self.read,
            "rejected": dict(self.rejected),
            "duplicates": self.duplicates,
            "filtered": dict(self.filtered),
            "kept": dict(self.kept),
            **({"kept_chats_cut": dict(self.cut)} if self.cut else {}),
            "reached_max_rows_read": self.reached_max_rows_read,
            "draw_s": round(self.seconds, 3),
        }
        if keyword_split:
            summary["no_keyword_match"] = self.unrouted["no_keyword_match"]
            summary["matched_but_domain_full"] = self.unrouted["domain_full"]
            summary["keyword_hits"] = dict(self.keyword_hits)
        return summary



@contextlib.contextmanager
def _timed(stats: SourceStats):
    """Add the block's wall time to the source's drawing time (also when a lost stream ends it)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        stats.seconds += time.perf_counter() - started



# ---------------------------------------------------------------------------------------------------- drawing rows


def bad_row_text(source: Source, kind: int, problem: str) -> str:
    return problem if kind == MALFORMED else f"not in the {source.schema.name} schema ({problem})"


def fatal_bad_row(source: Source, number: int, what: str) -> UserError:
    return UserError(f"{source.key}: {source.where(number)}: {what}; fix the row, or pass --fatal_bad_rows false to "
                     "skip such rows")


def first_bad_row(source: Source) -> None:
    """With --fatal_bad_rows, every row of a local source is checked before mixing, in file order: which rows the
    seeded shuffle draws must not decide whether the run fails. A source of several files names the file."""
    for path in source.files:
        with open(path, "rb") as handle:
            for number, row, span in numbered_local_rows(path):
                item, _ = convert_row(source.schema, row, read_span(handle, span) if span else None)
                if not isinstance(item[0], int) or item[0] not in (MALFORMED, WRONG_SCHEMA):
                    continue  # a usable row (its first item is text, a conversation or a record) or a rejected one
                kind, detail = item[:2]
                if source.path:
                    raise fatal_bad_row(source, number, bad_row_text(source, kind, detail))
                raise UserError(f"{source.key}: {path}:{number}: {bad_row_text(source, kind, detail)}; fix the row, "
                                "or pass --fatal_bad_rows false to skip such rows")


class Mixer:
    """Draws rows from each source into the buckets and accounts for every row read."""

    def __init__(self, plan: MixPlan, cfg, pool: ProcessPoolExecutor | None = None, workers: int = 0):
        self.plan = plan
        self.pool, self.workers = pool, workers
        self.byte_budget = content_byte_budget(cfg.MAX_SEQ_LENGTH, cfg.SYSTEM_PROMPT)
        self.min_output_chars = cfg.MIN_OUTPUT_CHARS
        self.fatal_bad_rows = cfg.FATAL_BAD_ROWS
        self.bad_row_report_limit = cfg.BAD_ROW_REPORT_LIMIT
        self.max_rows_read = cfg.get("MAX_ROWS_READ", 0)
        self.stats = {source.key: SourceStats() for source in plan.sources}
        self.seen: set[bytes] = set()
        self.lines: list[tuple[bytes, bytes]] = []  # (record up to its "source" value, that value and "}\n")
        self.closings = {key: f"{_json_string(key)}}}\n".encode() for key in plan.buckets}

    def _bad_row(self, source: Source, number: int, kind: int, problem: str, stats: SourceStats) -> None:
        """A malformed or wrong-schema row: an error with --fatal_bad_rows (checked for the whole of a local file
        before mixing, see first_bad_row), else skipped, counted and shown up to the limit."""
        what = bad_row_text(source, kind, problem)
        if self.fatal_bad_rows:
            raise fatal_bad_row(source, number, what)
        stats.rejected["malformed" if kind == MALFORMED else "wrong_schema"] += 1
        if stats.bad_rows_shown < self.bad_row_report_limit:
            stats.bad_rows_shown += 1
            warning = f"warning: {source.where(number)}: skipped, {what}"
            tqdm.write(warning, file=sys.stdout)
            if stats.bad_rows_shown == self.bad_row_report_limit:
                warning = f"warning: further malformed or wrong-schema rows of {source.key} are counted, not shown"
                tqdm.write(warning, file=sys.stdout)

    def _router(self, source: Source, domains: list[str]):
        """A function from a row's keyword hits to the bucket it fills, or to why it fills none."""
        buckets = [self.plan.buckets[key] for key in self.plan.feeds[source.key]]
        if not domains:
            return lambda hits: next(bucket for bucket in buckets if bucket.open)
        stats = self.stats[source.key]
        domain_buckets = [self.plan.buckets[key] for key in domains]

        def route(hits):
            matched = [index for index, count in enumerate(hits) if count]
            for index in matched:
                stats.keyword_hits[domains[index]] += 1
            if not matched:
                return "no_keyword_match"
            still_open = [index for index in matched if domain_buckets[index].open]
            if not still_open:
                return "domain_full"
            return domain_buckets[max(still_open, key=hits.__getitem__)]  # the first of tied domains wins

        return route

    def _take(self, source: Source, chunk, prepared, wanted: int, route) -> int:
        """Account for a chunk's rows in order and keep usable ones until `wanted` are kept; returns how many."""
        stats, seen, lines = self.stats[source.key], self.seen, self.lines
        taken = 0
        for index, (kind, detail, hits) in enumerate(prepared):
            if taken == wanted:
                break
            stats.read += 1
            if kind in (MALFORMED, WRONG_SCHEMA):
                self._bad_row(source, chunk[index][0], kind, detail, stats)  # its number, found only when needed
                continue
            if kind == REJECTED:
                stats.rejected[detail] += 1
                continue
            bucket = route(hits)
            if isinstance(bucket, str):
                stats.unrouted[bucket] += 1
            elif kind == FILTERED:
                stats.filtered[detail] += 1
            elif detail[0] in seen:
                stats.duplicates += 1
            else:
                seen.add(detail[0])
                lines.append((detail[1], self.closings[bucket.key]))  # joined when written: one copy, not two
                if len(detail) > 2:
                    stats.cut[detail[2]] += 1
                bucket.kept += 1
                stats.kept[bucket.key] += 1
                taken += 1
        return taken

    def _progress(self, source: Source) -> str:
        """Rows read, then per open bucket: kept/quota, the share of rows read that it kept (its hit rate) and the
        rows still to read at that rate. A bucket that MAX_ROWS_READ will leave short is reported once, early."""
        stats = self.stats[source.key]
        parts = [f"read {stats.read:,}"]
        for key in self.plan.feeds[source.key]:
            bucket = self.plan.buckets[key]
            if not bucket.open:
                continue
            rate = stats.kept[key] / max(stats.read, 1)
            to_read = (bucket.quota - bucket.kept) / rate if rate else float("inf")
            parts.append(f"{key} {bucket.kept:,}/{bucket.quota:,} hit {rate:.1%} ~{to_read:,.0f} to read")
            trusted = stats.read >= min(ESTIMATE_MIN_ROWS, self.max_rows_read // 20)
            if self.max_rows_read and trusted and key not in stats.warned:
                left = self.max_rows_read - stats.read
                if to_read > left:
                    stats.warned.add(key)
                    short = bucket.quota - bucket.kept - int(left * rate)
                    tqdm.write(
                        f"warning: {key}: {source.key} kept {rate:.2%} of the {stats.read:,} rows read for it, so "
                        f"MAX_ROWS_READ ({self.max_rows_read:,}) leaves it about {short:,} rows short of "
                        f"{bucket.quota:,}; widen {source.key} (more sites or files), raise --max_rows_read or "
                        f"lower RATIOS[{key!r}]",
                        file=sys.stdout,
                    )
        return " | ".join(parts)

    def draw(self, source: Source, rows) -> None:
        stats = self.stats[source.key]
        fed = self.plan.feeds[source.key]
        remaining = sum(self.plan.buckets[key].quota - self.plan.buckets[key].kept for key in fed)
        if not remaining:  # earlier sources filled its buckets
            return
        # A keyword-split source's hits come in KEYWORDS order.
        domains = [key for key in self.plan.keywords if key in fed] if source.key in self.plan.keyword_split else []
        patterns = keyword_patterns({domain: self.plan.keywords[domain] for domain in domains}) if domains else None
        rules = RowRules(source.schema, source.path, self.byte_budget, self.min_output_chars, patterns)
        route = self._router(source, domains)
        pool = self.pool if worth_workers(remaining) else None
        chunks = prepared_chunks(rules, rows, pool, self.workers)
        bar = tqdm(total=remaining, desc=source.key, unit=" kept", file=sys.stdout, mininterval=0.5)
        # A hub stream's HTTP machinery may make reference cycles, so it keeps the collector.
        collector_paused = contextlib.nullcontext() if source.is_hub else cyclic_gc_paused()
        with bar, contextlib.closing(chunks), collector_paused, _timed(stats):
            for chunk, prepared in chunks:
                if self.max_rows_read:
                    room = self.max_rows_read - stats.read
                    chunk, prepared = chunk[:room], prepared[:room]
                raise_if_interrupted()  # one that code run from C swallowed (see cli.note_interrupt)
                taken = self._take(source, chunk, prepared, remaining, route)
                remaining -= taken
                bar.update(taken)
                bar.set_postfix_str(self._progress(source), refresh=False)
                if not remaining:
                    break
                if self.max_rows_read and stats.read >= self.max_rows_read:
                    stats.reached_max_rows_read = True
                    tqdm.write(f"{source.key}: stopped at MAX_ROWS_READ ({self.max_rows_read:,} rows read)",
                               file=sys.stdout)
                    break
        if not stats.kept:
            reasons = {**stats.rejected, **stats.filtered, "duplicates": stats.duplicates}
            if domains:
                reasons["no_keyword_match"] = stats.unrouted["no_keyword_match"]
            detail = ", ".join(f"{reason} {count}" for reason, count in reasons.items() if count)
            detail = detail or "the source is empty"
            raise UserError(f"{source.key}: no usable rows left in {source.spec} after {stats.read} read ({detail})")


# ---------------------------------------------------------------------------------------------------- the stage


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


def _write_shuffled(lines: list[tuple[bytes, bytes]], output_file: Path, seed: int, describe) -> None:
    """Shuffle with `seed` and write the file and its manifest, describe(sha256 of the file), as one unit."""
    random.Random(seed).shuffle(lines)
    digest = hashlib.sha256()
    with atomic_file(output_file, "wb", manifest=lambda _: describe(digest.hexdigest())) as handle:
        for start in range(0, len(lines), WRITE_BLOCK_ROWS):
            block = b"".join(part for line in lines[start : start + WRITE_BLOCK_ROWS] for part in line)
            digest.update(block)
            handle.write(block)
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


class WorkFolder:
    """What a run stopped by a lost hub stream has done, kept next to OUTPUT_FILE (`<OUTPUT_FILE>.work/`) so that the
    same command continues it: the rows kept so far, the sources finished, and the lost stream's position, shuffle
    buffer and random draws. Only a run with the same configuration (and unchanged local files) picks it up.

    The state is JSON, never pickle: a file someone else put there is data, never code. Its first line holds the
    format and the fingerprint, read (bounded) before the rest; a state that does not fit is ignored with a warning.
    """

    FORMAT = "qwen_sft mix work state 1"
    HEADER_BYTES = 4096  # the first line's most: a longer one is not ours

    def __init__(self, output_file: Path):
        self.folder = output_file.with_name(output_file.name + ".work")
        self.state_file = self.folder / "state.json"

    @staticmethod
    def fingerprint(cfg, plan: MixPlan) -> str:
        files = [
            (str(path), path.stat().st_size, path.stat().st_mtime_ns)
            for source in plan.sources if not source.is_hub for path in source.files
        ]
        settings = {key: str(value) for key, value in sorted(cfg.items()) if key not in NETWORK_SETTINGS}
        text = json.dumps([settings, files])
        return hashlib.sha256(text.encode()).hexdigest()

    def load(self, fingerprint: str, plan: MixPlan) -> dict | None:
        if not self.state_file.is_file():
            return None
        try:
            with open(self.state_file, "rb") as handle:
                header = json.loads(handle.readline(self.HEADER_BYTES))
                if header != {"format": self.FORMAT, "fingerprint": fingerprint}:
                    print(f"warning: {self.folder} holds work of another configuration; starting over (it will be "
                          "replaced)")
                    return None
                return _state_from_json(json.loads(handle.read(), object_hook=_untag_bytes), plan)
        except (OSError, ValueError, RecursionError, KeyError, IndexError, TypeError, AttributeError) as error:
            print(f"warning: {self.state_file} cannot be read ({type(error).__name__}); starting over")
            return None

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        header = {"format": self.FORMAT, "fingerprint": state["fingerprint"]}
        with atomic_file(self.state_file, "w") as handle:
            handle.write(json.dumps(header) + "\n")
            json.dump(_state_to_json(state), handle, default=_tag_bytes)

    def remove(self) -> None:
        """Delete what we wrote: the state file, then the folder if nothing else is in it."""
        if self.state_file.is_file():
            self.state_file.unlink()
            with contextlib.suppress(OSError):
                self.folder.rmdir()


BYTES_TAG = "\x00bytes"  # a JSON object {BYTES_TAG: base64} is a bytes value of a hub row in the shuffle buffer


def _tag_bytes(value):
    """json.dump's fallback for a hub row's values: bytes are tagged, anything else (dates) kept as its text."""
    if isinstance(value, bytes):
        return {BYTES_TAG: base64.b64encode(value).decode("ascii")}
    return str(value)


def _untag_bytes(item: dict):
    return base64.b64decode(item[BYTES_TAG], validate=True) if set(item) == {BYTES_TAG} else item


def _latin1(data: bytes) -> str:
    return data.decode("latin-1")  # every byte is one character, so any bytes survive JSON unchanged


def _from_latin1(text) -> bytes:
    if not isinstance(text, str):
        raise TypeError("a string expected")
    return text.encode("latin-1")  # a UnicodeEncodeError (a ValueError) for text _latin1 never wrote


def _state_to_json(state: dict) -> dict:
    lines, seen, stats, kept = state["mixer"]
    return {
        "done": state["done"], "hub": state["hub"], "source": state["source"], "rows": state["rows"],
        "lines": [[_latin1(record), _latin1(closing)] for record, closing in lines],
        "seen": [_latin1(digest) for digest in seen],
        "stats": {key: {**vars(item), "warned": sorted(item.warned)} for key, item in stats.items()},
        "kept": kept,
    }


def _state_from_json(body: dict, plan: MixPlan) -> dict:
    """The state save() wrote, its shape checked: a TypeError, KeyError or ValueError for anything else."""
    def texts(value) -> list:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise TypeError("a list of strings expected")
        return value

    if not all(set(HUB_IDENTITY_KEYS) <= set(hub) for hub in body["hub"].values()):
        raise KeyError("a hub source's identity")
    keys = set(plan.buckets)
    stats = {}
    for key, item in body["stats"].items():
        counters = {name: Counter({str(k): int(v) for k, v in item[name].items()})
                    for name in ("rejected", "filtered", "unrouted", "keyword_hits", "kept")}
        stats[str(key)] = SourceStats(read=int(item["read"]), duplicates=int(item["duplicates"]),
                                      bad_rows_shown=int(item["bad_rows_shown"]),
                                      reached_max_rows_read=bool(item["reached_max_rows_read"]),
                                      seconds=float(item["seconds"]), warned=set(texts(item["warned"])), **counters)
    kept = {key: int(count) for key, count in body["kept"].items()}
    lines = [(_from_latin1(record), _from_latin1(closing)) for record, closing in body["lines"]]
    if not set(kept) <= keys or len(lines) != sum(kept.values()) or set(stats) != {s.key for s in plan.sources}:
        raise ValueError("buckets or sources differ from the plan's")
    rows = body["rows"]
    if rows is not None:
        _check_hub_rows_state(rows)
    return {
        "done": texts(body["done"]), "hub": dict(body["hub"]), "source": body["source"], "rows": rows,
        "mixer": (lines, {_from_latin1(digest) for digest in body["seen"]}, stats, kept),
    }


def _check_hub_rows_state(rows: dict) -> None:
    """A HubRows state as HubRows keeps it (see sources.py), or a TypeError, KeyError or ValueError."""
    import numpy as np

    hub_keys = {"endpoint": str, "repo_id": str, "commit_sha": str, "revision": str}
    if not (isinstance(rows["buffer"], list) and all(isinstance(row, dict) for row in rows["buffer"])
            and all(type(slot) is int for slot in rows["slots"]) and type(rows["number"]) is int
            and isinstance(rows["stream"], (dict, type(None)))
            and all(isinstance(rows["hub"][key], kind) for key, kind in hub_keys.items())
            and isinstance(rows["hub"]["data_files"], (list, type(None)))):
        raise TypeError("a hub stream's state expected")
    np.random.default_rng().bit_generator.state = rows["rng"]  # numpy's own check of the random draws


def _draw_all(plan: MixPlan, cfg, mixer: Mixer, work: WorkFolder) -> dict[str, dict]:
    """Draw every source into the buckets, continuing the work a lost hub stream left; returns what each hub
    source resolved to. A hub stream lost for good saves the work and ends the run with one line."""
    settings = HubSettings(float(cfg.get("HUB_TIMEOUT_SECONDS", 30)), float(cfg.get("NETWORK_RETRY_SECONDS", 120)))
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
