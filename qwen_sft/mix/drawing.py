"""Steps 2-5 of the mix for one source after another: its rows opened (open_rows), prepared a chunk at a time
(workers.py, rows.py), and each kept if its bucket still needs rows and it is no duplicate, else counted by why
(SourceStats, what the manifest says of the source)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from ..cli import UserError, raise_if_interrupted
from .hub import HubSettings, stream_hub
from .parquet import ParquetRows
from .plan import MixPlan
from .reading import numbered_files_rows, numbered_local_rows, prefer_jemalloc, read_span, shuffle_buffered
from .rows import (
    FILTERED,
    MALFORMED,
    REJECTED,
    WRONG_SCHEMA,
    PreparedRow,
    RowRules,
    content_byte_budget,
    convert_source_row,
    keyword_patterns,
)
from .sources import Source
from .workers import cyclic_gc_paused, prepared_chunks, worth_workers

# Rows read from a source before its hit rates are trusted to predict a shortfall: this many, or 5% of MAX_ROWS_READ.
ESTIMATE_MIN_ROWS = 5000


def open_rows(source: Source, seed: int, buffer_size: int, settings: HubSettings | None,
              state: dict | None = None):
    """The source's rows through a seeded shuffle buffer, as (row number, parsed row or None, (offset, length) of a
    JSONL line or None); the number is the file's line or row for local files (a FileRow for several files) and the
    position in the stream for hub specs (a HubRows, see hub.stream_hub). A source made only of local Parquet files
    is a ParquetRows instead: the same rows in the same order, their answers narrowed by the schema, drawn a chunk at
    a time. Nothing is read yet. A local source must have passed check_local_file."""
    if source.is_hub:
        return stream_hub(source, seed, buffer_size, settings, state)
    if all(path.suffix.lower() == ".parquet" for path in source.files):
        prefer_jemalloc()
        return ParquetRows(source.files, source.schema, seed, buffer_size, single_file=bool(source.path))
    if source.path:
        rows = numbered_local_rows(source.path, source.schema)
    else:
        rows = numbered_files_rows(source.files, source.schema)
    return shuffle_buffered(rows, seed, buffer_size)


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
                converted = convert_source_row(source.schema, row, read_span(handle, span) if span else None)
                if converted.kind not in (MALFORMED, WRONG_SCHEMA):
                    continue  # a usable row or a rejected one
                what = bad_row_text(source, converted.kind, converted.reason)
                if source.path:
                    raise fatal_bad_row(source, number, what)
                raise UserError(f"{source.key}: {path}:{number}: {what}; fix the row, or pass --fatal_bad_rows false "
                                "to skip such rows")


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
        self.lines: list[bytes] = []  # the kept rows' mix lines, in the order drawn

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

    def _take(self, source: Source, chunk, prepared: list[PreparedRow], wanted: int, route) -> int:
        """Account for a chunk's rows in order and keep usable ones until `wanted` are kept; returns how many."""
        stats, seen, lines = self.stats[source.key], self.seen, self.lines
        taken = 0
        for index, row in enumerate(prepared):
            if taken == wanted:
                break
            stats.read += 1
            if row.kind in (MALFORMED, WRONG_SCHEMA):
                self._bad_row(source, chunk[index][0], row.kind, row.reason, stats)  # its number, found only now
                continue
            if row.kind == REJECTED:
                stats.rejected[row.reason] += 1
                continue
            bucket = route(row.hits)
            if isinstance(bucket, str):
                stats.unrouted[bucket] += 1
            elif row.kind == FILTERED:
                stats.filtered[row.reason] += 1
            elif row.key in seen:
                stats.duplicates += 1
            else:
                seen.add(row.key)
                lines.append(row.lines[bucket.key])
                if row.cut:
                    stats.cut[row.cut] += 1
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
        rules = RowRules(source.schema, source.path, self.byte_budget, self.min_output_chars, patterns,
                         tuple(domains or fed))
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


