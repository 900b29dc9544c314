"""The one mixing engine behind data_integration.py (Option A) and data_set_generation.py (Option B).

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
import gc
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import random
import signal
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import orjson
import xxhash
from tqdm import tqdm

from .artifacts import (
    atomic_file,
    build_manifest,
    check_output_file,
    check_outputs_apart,
    manifest_path_for,
    sha256_file,
)
from .cli import UserError
from .records import read_records
from .sources import (
    REPORTS,
    SCHEMAS,
    HubRows,
    HubSettings,
    Rejected,
    Schema,
    Source,
    StackExchangeSchema,
    StreamLost,
    WrongSchema,
    check_local_file,
    open_rows,
    read_span,
)
from .template import DEFAULT_SYSTEM_PROMPT

RATIO_TOLERANCE = 1e-6
# Qwen2.5's tokenizer averages about 4 UTF-8 bytes per token on English prose and on Chinese alike (code: ~3.5);
# 3 over-counts tokens, so a row under the budget fits MAX_SEQ_LENGTH.
BYTES_PER_TOKEN = 3.0
TEMPLATE_TOKENS = 32  # ChatML markers, role names and the 补充信息 heading around the three fields
EXCHANGE_TEMPLATE_TOKENS = 12  # ChatML markers and role names of each further exchange of a conversation
CHUNK_ROWS = 1024  # rows prepared at a time (one RE2 call per keyword domain each; fewer calls, less overhead)
# Mixes at least this large prepare rows in one worker process per CPU core, for each source that still has to
# deliver at least this many rows; a smaller one (the report file, PubMedQA) is quicker to prepare in this process.
PARALLEL_MIN_ROWS = 20_000
CHUNKS_IN_FLIGHT_PER_WORKER = 2  # how far preparation runs ahead of the bookkeeping (bounded, for early stops)
# Rows read from a source before its hit rates are trusted to predict a shortfall: this many, or 5% of MAX_ROWS_READ.
ESTIMATE_MIN_ROWS = 5000
NETWORK_SETTINGS = ("HUB_TIMEOUT_SECONDS", "NETWORK_RETRY_SECONDS")  # a rerun may change these and still continue
WRITE_BLOCK_ROWS = 64  # output rows joined per write: about 70 KB, under glibc's 128 KiB mmap threshold
_json_string = json.encoder.encode_basestring  # the C encoder behind json.dumps(ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------- helpers

_ASCII_WHITESPACE = b" \t\n\r\x0b\x0c"
_ASCII_LOWER_CASE = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


def duplicate_key(instruction: str, extra: str, output: str) -> bytes:
    """Rows with equal keys are duplicates: equal once lower-cased and stripped of all whitespace.

    xxHash rather than hashlib: 128 bits make a collision among millions of rows vanishingly unlikely, and it is
    an order of magnitude faster than blake2b on this hot path. ASCII text (str.lower() changes only A-Z there)
    is lower-cased in the same pass that drops the whitespace.
    """
    return _folded_digest(f"{instruction}\x00{extra}\x00{output}")


def conversation_duplicate_key(messages: list[dict]) -> bytes:
    """duplicate_key for a conversation: its roles and contents, equal once case and whitespace are ignored."""
    return _folded_digest("\x00".join(f"{turn['role']}\x01{turn['content']}" for turn in messages))


def _folded_digest(joined: str) -> bytes:
    if joined.isascii():
        folded = joined.encode().translate(_ASCII_LOWER_CASE, _ASCII_WHITESPACE)
    else:
        folded = joined.lower().encode().translate(None, _ASCII_WHITESPACE)
    return xxhash.xxh3_128_digest(folded)


def utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def content_byte_budget(max_seq_length: int) -> int:
    """UTF-8 bytes that instruction + input + output may take so that the rendered example fits."""
    system_tokens = utf8_length(DEFAULT_SYSTEM_PROMPT) / BYTES_PER_TOKEN
    return int((max_seq_length - TEMPLATE_TOKENS - system_tokens) * BYTES_PER_TOKEN)


def json_body(instruction: str, extra: str, output: str) -> bytes:
    """The record as json.dumps(..., ensure_ascii=False) writes it, in UTF-8, up to the "source" value that closes
    it (encoded here, in the worker, so the main process only joins bytes).

    orjson escapes a string byte for byte as json does without ensure_ascii (a test checks every code point), ten
    times faster.
    """
    return b"".join((
        b'{"instruction": ', orjson.dumps(instruction), b', "input": ', orjson.dumps(extra),
        b', "output": ', orjson.dumps(output), b', "source": ',
    ))


def conversation_json_body(messages: list[dict]) -> bytes:
    """json_body for a conversation row: {"messages": [{"role": ..., "content": ...}, ...], "source": """
    turns = b", ".join(
        b'{"role": ' + orjson.dumps(turn["role"]) + b', "content": ' + orjson.dumps(turn["content"]) + b"}"
        for turn in messages
    )
    return b'{"messages": [' + turns + b'], "source": '


def conversation_utf8_length(messages: list[dict]) -> int:
    """What a conversation weighs against content_byte_budget: its contents, plus the template of each exchange
    beyond the first in bytes."""
    exchanges = sum(turn["role"] == "assistant" for turn in messages)
    extra_template = (exchanges - 1) * EXCHANGE_TEMPLATE_TOKENS * BYTES_PER_TOKEN
    return sum(utf8_length(turn["content"]) for turn in messages) + int(extra_template)


def exact_quotas(total: int, ratios: dict[str, float]) -> dict[str, int]:
    """Quotas that sum to `total` exactly, none negative (the largest remainder method): each share rounded down,
    then one more row to each of the shares with the largest fractional parts (ties: the larger share, then RATIOS
    order) until the total is reached."""
    weight = sum(ratios.values())
    exact = {key: total * ratio / weight for key, ratio in ratios.items()}
    quotas = {key: math.floor(value) for key, value in exact.items()}
    order = sorted(ratios, key=lambda key: (-(exact[key] - quotas[key]), -ratios[key], list(ratios).index(key)))
    for key in order[: total - sum(quotas.values())]:
        quotas[key] += 1
    return quotas


def _term_pattern(term: str) -> str:
    """RE2 pattern for one keyword: its words joined by any whitespace, with a word boundary where the term starts
    or ends with an ASCII letter or digit. RE2's \\b is ASCII-only, so "AI" matches in "用AI做" but not in "said"."""
    words = ["".join(c if c.isalnum() or not c.isascii() else "\\" + c for c in word) for word in term.split()]
    starts_word = term[0].isascii() and (term[0].isalnum() or term[0] == "_")
    ends_word = term[-1].isascii() and (term[-1].isalnum() or term[-1] == "_")
    return ("\\b" if starts_word else "") + "\\s+".join(words) + ("\\b" if ends_word else "")


def keyword_patterns(keywords: dict[str, list[str]]) -> dict[str, str]:
    """One RE2 alternation per domain, matched case-insensitively."""
    return {domain: "|".join(_term_pattern(term.strip()) for term in terms) for domain, terms in keywords.items()}


def count_keyword_hits(patterns: dict[str, str], texts: list[str]) -> dict[str, list[int]]:
    """Keyword occurrences per domain for each text: one vectorised RE2 pass per domain over the whole list."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = pa.array(texts, type=pa.large_string())
    return {
        domain: pc.count_substring_regex(array, pattern, ignore_case=True).to_pylist()
        for domain, pattern in patterns.items()
    }


# ---------------------------------------------------------------------------------------------------- preparing rows

# What prepare_rows says about a row: (kind, detail, keyword hits per domain or None).
USABLE, FILTERED, NO_KEYWORD_MATCH, REJECTED, WRONG_SCHEMA, MALFORMED = range(6)


@dataclass(frozen=True)
class RowRules:
    """Everything needed to prepare one source's rows; picklable, so preparation can run in worker processes."""

    schema: Schema
    path: str | None  # the local file that JSONL spans point into
    byte_budget: int
    min_output_chars: int
    keyword_patterns: dict[str, str] | None  # domain -> RE2 pattern, for a source split by KEYWORDS


def parse_json_line(text: bytes):
    """json.loads(text), three times faster. orjson gives the same value for every line json accepts, except that
    it reads an integer beyond 64 bits as a float (only such a pm_score could rank differently); the lines it
    refuses (NaN, Infinity, lone surrogates, a byte-order mark, bad JSON) go to json, which parses them or rejects
    them with its own message."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _convert(schema: Schema, row, text: bytes | None):
    if text is not None:
        try:
            row = parse_json_line(text)
        except json.JSONDecodeError as error:
            return MALFORMED, f"malformed JSON ({error.msg} at column {error.colno})", None
        except UnicodeDecodeError as error:
            return MALFORMED, f"not UTF-8 text ({error.reason} at byte {error.start})", None
    try:
        converted = schema.convert(row)
    except WrongSchema as error:
        return WRONG_SCHEMA, str(error), None
    except Rejected as error:
        return REJECTED, error.reason, None
    if isinstance(converted, list):
        return (converted,)  # a conversation
    instruction, extra, raw_output = converted
    if not instruction:
        return REJECTED, "empty_instruction", None
    if not raw_output:
        return REJECTED, "empty_output", None
    return instruction, extra, raw_output


def prepare_rows(rules: RowRules, rows: list[tuple[int, object, tuple[int, int] | None]]) -> list[tuple]:
    """Read, parse, convert, clean, filter and key a chunk of (number, row, JSONL span); the bookkeeping stays with
    the caller.

    A keyword-split source has its questions matched in one RE2 pass per domain, and the answers of questions that
    match no domain are never cleaned.
    """
    schema = rules.schema
    with open(rules.path, "rb") if rules.path else contextlib.nullcontext() as handle:
        converted = [_convert(schema, row, read_span(handle, span) if span else None) for _, row, span in rows]
    hits = None
    if rules.keyword_patterns:
        counts = count_keyword_hits(rules.keyword_patterns, [_question(item) for item in converted])
        hits = list(zip(*counts.values()))
    prepared = []
    for position, item in enumerate(converted):
        if not isinstance(item[0], (str, list)):
            prepared.append(item)
            continue
        row_hits = hits[position] if hits else None
        if hits and not any(row_hits):
            prepared.append((NO_KEYWORD_MATCH, None, row_hits))
            continue
        if isinstance(item[0], list):
            prepared.append((*_prepare_conversation(rules, item[0]), row_hits))
            continue
        instruction, extra, raw_output = item
        output = schema.finish_output(raw_output)
        if not output:
            prepared.append((REJECTED, "empty_output", row_hits))
        elif len(output) < rules.min_output_chars:
            prepared.append((FILTERED, "too_short", row_hits))
        elif utf8_length(instruction) + utf8_length(extra) + utf8_length(output) > rules.byte_budget:
            prepared.append((FILTERED, "too_long", row_hits))
        else:
            detail = (duplicate_key(instruction, extra, output), json_body(instruction, extra, output))
            prepared.append((USABLE, detail, row_hits))
    return prepared


def _question(item: tuple) -> str:
    """The text a converted row's keywords are matched in: its instruction, or a conversation's first user turn."""
    if isinstance(item[0], list):
        return next(turn["content"] for turn in item[0] if turn["role"] == "user")
    return item[0] if isinstance(item[0], str) else ""


def _prepare_conversation(rules: RowRules, messages: list[dict]) -> tuple:
    """(kind, detail) of a conversation, by the rules of a single-turn row; its last answer is its output."""
    messages = [
        {"role": "assistant", "content": rules.schema.finish_output(turn["content"])}
        if turn["role"] == "assistant" else turn
        for turn in messages
    ]
    if not all(turn["content"] for turn in messages):
        return REJECTED, "empty_output" if not messages[-1]["content"] else "empty_turn"
    if len(messages[-1]["content"]) < rules.min_output_chars:
        return FILTERED, "too_short"
    if conversation_utf8_length(messages) > rules.byte_budget:
        return FILTERED, "too_long"
    return USABLE, (conversation_duplicate_key(messages), conversation_json_body(messages))


def _chunks(rows):
    """Consecutive lists of CHUNK_ROWS rows. A hub stream lost mid-chunk (StreamLost) carries the rows drawn before
    it in `partial`, so that every row drawn is accounted for before the run stops (and resumes after them)."""
    rows = iter(rows)  # once: every iter() of a HubRows would resume from the same saved state
    while True:
        chunk = []
        try:
            chunk.extend(islice(rows, CHUNK_ROWS))
        except StreamLost as lost:
            lost.partial = chunk
            raise
        if not chunk:
            return
        yield chunk


def prepared_chunks(rules: RowRules, rows, pool: ProcessPoolExecutor | None, workers: int):
    """(chunk, prepare_rows result) for consecutive chunks of (number, row, span), in order.

    With a pool, a few chunks per worker are prepared ahead, never the whole source, so a source whose buckets
    fill early is not read to its end; order, and so the output, does not depend on the workers. A lost hub
    stream first delivers every chunk drawn before it, then raises StreamLost.
    """
    chunks = _chunks(rows)
    pending = deque()
    try:
        for chunk in chunks:
            if pool is None:
                yield chunk, prepare_rows(rules, chunk)
                continue
            pending.append((chunk, pool.submit(prepare_rows, rules, chunk)))
            if len(pending) > CHUNKS_IN_FLIGHT_PER_WORKER * workers:
                chunk, future = pending.popleft()
                yield chunk, future.result()
        while pending:
            chunk, future = pending.popleft()
            yield chunk, future.result()
    except StreamLost as lost:
        while pending:
            chunk, future = pending.popleft()
            yield chunk, future.result()
        if lost.partial:
            yield lost.partial, prepare_rows(rules, lost.partial)
        raise
    finally:
        for _, future in pending:
            future.cancel()


def die_with_parent() -> None:
    """Linux: the kernel sends this process SIGKILL when its parent dies (even by SIGKILL), so no worker is left
    behind, orphaned, holding its memory."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def start_worker() -> None:
    """Each worker's initializer. The worker dies with its parent, and leaves Ctrl-C (sent to the whole terminal
    process group) to the parent, which stops the pool. Its imports happen up front, overlapping the main process's
    work instead of delaying the first chunk. The cyclic garbage collector is turned off: prepared rows hold no
    reference cycles, so reference counting frees them, and the collector's passes over the imported modules cost
    about 5% of the preparation time."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    gc.disable()
    import pyarrow.compute  # noqa: F401  (keyword matching)


@contextlib.contextmanager
def _timed(stats: SourceStats):
    """Add the block's wall time to the source's drawing time (also when a lost stream ends it)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        stats.seconds += time.perf_counter() - started


@contextlib.contextmanager
def cyclic_gc_paused():
    """Turn the cyclic garbage collector off for the block. Drawing rows makes no reference cycles (reference
    counting frees everything), while the young-generation passes it triggers, mostly as the pool's thread unpickles
    prepared chunks, cost about 0.5 CPU s in a 240,000-row mix."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def worker_start_method() -> str:
    """"fork" while this process runs a single thread, else "spawn". A forked worker starts at once, with the
    modules already imported (a spawned one starts an interpreter and imports them again: about 0.25 CPU s each);
    but forking a process with other threads running (numpy's and pyarrow's pools, once imported) can leave the
    child a lock that no thread will release."""
    threads = Path("/proc/self/task")
    return "fork" if threads.is_dir() and len(os.listdir(threads)) == 1 else "spawn"


def worker_count(total_samples: int) -> int:
    """Worker processes for row preparation: one per available CPU core for a large mix, none for a small one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if cores > 1 and total_samples >= PARALLEL_MIN_ROWS else 0


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass
class Bucket:
    key: str
    quota: int
    sources: list[str]
    kept: int = 0

    @property
    def open(self) -> bool:
        return self.kept < self.quota


@dataclass
class SourceStats:
    read: int = 0
    rejected: Counter = field(default_factory=Counter)
    duplicates: int = 0
    filtered: Counter = field(default_factory=Counter)
    unrouted: Counter = field(default_factory=Counter)  # keyword-split rows: no_keyword_match, domain_full
    keyword_hits: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
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
            "reached_max_rows_read": self.reached_max_rows_read,
            "draw_s": round(self.seconds, 3),
        }
        if keyword_split:
            summary["no_keyword_match"] = self.unrouted["no_keyword_match"]
            summary["matched_but_domain_full"] = self.unrouted["domain_full"]
            summary["keyword_hits"] = dict(self.keyword_hits)
        return summary


@dataclass
class MixPlan:
    buckets: dict[str, Bucket]
    sources: list[Source]  # in reading order, only those some bucket with a quota needs
    feeds: dict[str, list[str]]  # source key -> the buckets it fills
    keyword_split: set[str]  # source keys whose rows are routed by KEYWORDS
    keywords: dict[str, list[str]]


def _check_ratios(ratios) -> list[str]:
    if not isinstance(ratios, dict) or not ratios:
        return ["RATIOS must name at least one source, e.g. --ratios reports=0.2,orca=0.8"]
    errors = [
        f"RATIOS[{key!r}] = {value!r} must be a number >= 0"
        for key, value in ratios.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
    ]
    if not errors and abs(sum(ratios.values()) - 1) > RATIO_TOLERANCE:
        shares = ", ".join(f"{key}={value:.12g}" for key, value in ratios.items())
        errors.append(f"RATIOS must sum to 1, got {sum(ratios.values()):.12g} ({shares})")
    return errors


def _check_keywords(keywords) -> list[str]:
    if not isinstance(keywords, dict):
        return ['KEYWORDS must map each domain to a list of terms, e.g. {"ai": ["machine learning"]}']
    return [
        f"KEYWORDS[{domain!r}] must be a non-empty list of non-empty strings"
        for domain, terms in keywords.items()
        if not isinstance(terms, list) or not terms or not all(isinstance(t, str) and t.strip() for t in terms)
    ]


def plan_mix(cfg, report_key: str) -> MixPlan:
    """Check the configuration (every problem in one message) and work out buckets, quotas and reading order."""
    sources_config = cfg.SOURCES
    ratios = cfg.RATIOS
    keywords = cfg.get("KEYWORDS", {})
    domain_sources = cfg.get("DOMAIN_SOURCES", {})
    errors = []
    if cfg.TOTAL_SAMPLES < 1:
        errors.append(f"TOTAL_SAMPLES must be at least 1, got {cfg.TOTAL_SAMPLES}")
    if cfg.SHUFFLE_BUFFER < 1:
        errors.append(f"SHUFFLE_BUFFER must be at least 1, got {cfg.SHUFFLE_BUFFER}")
    if content_byte_budget(cfg.MAX_SEQ_LENGTH) < 1:
        errors.append(f"MAX_SEQ_LENGTH {cfg.MAX_SEQ_LENGTH} leaves no room for a row after the prompt template")
    for key, spec in sources_config.items():
        if key not in SCHEMAS:
            errors.append(f"SOURCES key {key!r} is unknown; use {', '.join(SCHEMAS)} (the key picks the schema)")
        elif not isinstance(spec, str) or not spec.strip():
            errors.append(f"SOURCES[{key!r}] must be a hub spec or a local path")
    errors += _check_ratios(ratios)
    errors += _check_keywords(keywords)
    for domain, names in domain_sources.items():
        if domain not in keywords:
            errors.append(f"DOMAIN_SOURCES key {domain!r} is not a KEYWORDS domain ({', '.join(keywords)})")
        elif not isinstance(names, list) or not all(name in sources_config for name in names):
            known_sources = ", ".join(sources_config)
            errors.append(f"DOMAIN_SOURCES[{domain!r}] = {names!r} must list SOURCES keys ({known_sources})")

    buckets: dict[str, Bucket] = {}
    if isinstance(ratios, dict):
        known = [report_key, *keywords, *(key for key in sources_config if key not in keywords)]
        quotas = exact_quotas(cfg.TOTAL_SAMPLES, ratios) if not errors else dict.fromkeys(ratios, 0)
        for key in ratios:
            if key == report_key:
                fed_by = [report_key]
            elif key in keywords:
                fed_by = [name for name in domain_sources.get(key, ["stackexchange"]) if name in sources_config]
                if not fed_by:
                    errors.append(f"RATIOS key {key!r} is a keyword domain but SOURCES has no stackexchange entry")
            elif key in sources_config:
                fed_by = [key]
            else:
                errors.append(f"RATIOS key {key!r} is unknown; use {', '.join(known)}")
                continue
            buckets[key] = Bucket(key, quotas[key], fed_by)
    if errors:
        raise UserError("; ".join(errors))

    feeds: dict[str, list[str]] = {}
    for bucket in buckets.values():
        if bucket.quota > 0:
            for name in bucket.sources:
                feeds.setdefault(name, []).append(bucket.key)
    keyword_split = {
        name for name in feeds if name != report_key and isinstance(SCHEMAS[name], StackExchangeSchema)
        and any(key in keywords for key in feeds[name])
    }
    for name in keyword_split:
        plain = [key for key in feeds[name] if key not in keywords]
        if plain:
            raise UserError(f"RATIOS key {plain[0]!r} takes all of {name} while KEYWORDS split it; drop one of them")
    reading_order = [Source(report_key, cfg.MY_REPORT_DATA_PATH, REPORTS)] if report_key in feeds else []
    reading_order += [Source(name, sources_config[name], SCHEMAS[name]) for name in sources_config if name in feeds]
    return MixPlan(buckets, reading_order, feeds, keyword_split, keywords)


# ---------------------------------------------------------------------------------------------------- drawing rows


def bad_row_text(source: Source, kind: int, problem: str) -> str:
    return problem if kind == MALFORMED else f"not in the {source.schema.name} schema ({problem})"


def fatal_bad_row(source: Source, number: int, what: str) -> UserError:
    return UserError(f"{source.key}: {source.where(number)}: {what}; fix the row, or pass --fatal_bad_rows false to "
                     "skip such rows")


def first_bad_row(source: Source) -> None:
    """With --fatal_bad_rows, every row of a local source is checked before mixing, in file order: which rows the
    seeded shuffle draws must not decide whether the run fails. A source of several files names the file."""
    from .sources import _numbered_local_rows

    for path in source.files:
        with open(path, "rb") as handle:
            for number, row, span in _numbered_local_rows(path):
                kind, detail, _ = _convert(source.schema, row, read_span(handle, span) if span else None)
                if kind not in (MALFORMED, WRONG_SCHEMA):
                    continue
                if source.path:
                    raise fatal_bad_row(source, number, bad_row_text(source, kind, detail))
                raise UserError(f"{source.key}: {path}:{number}: {bad_row_text(source, kind, detail)}; fix the row, "
                                "or pass --fatal_bad_rows false to skip such rows")


class Mixer:
    """Draws rows from each source into the buckets and accounts for every row read."""

    def __init__(self, plan: MixPlan, cfg, pool: ProcessPoolExecutor | None = None, workers: int = 0):
        self.plan = plan
        self.pool, self.workers = pool, workers
        self.byte_budget = content_byte_budget(cfg.MAX_SEQ_LENGTH)
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
        for (number, _, _), (kind, detail, hits) in zip(chunk, prepared):
            if taken == wanted:
                break
            stats.read += 1
            if kind in (MALFORMED, WRONG_SCHEMA):
                self._bad_row(source, number, kind, detail, stats)
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
        pool = self.pool if remaining >= PARALLEL_MIN_ROWS else None
        chunks = prepared_chunks(rules, rows, pool, self.workers)
        bar = tqdm(total=remaining, desc=source.key, unit=" kept", file=sys.stdout, mininterval=0.5)
        # A hub stream's HTTP machinery may make reference cycles, so it keeps the collector.
        collector_paused = contextlib.nullcontext() if source.is_hub else cyclic_gc_paused()
        with bar, contextlib.closing(chunks), collector_paused, _timed(stats):
            for chunk, prepared in chunks:
                if self.max_rows_read:
                    room = self.max_rows_read - stats.read
                    chunk, prepared = chunk[:room], prepared[:room]
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

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
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


def check_mix_output(cfg, plan: MixPlan) -> Path:
    """The output policy (qwen_sft/artifacts.py): never over an input, nor over a file this toolkit did not write."""
    output_file = Path(cfg.OUTPUT_FILE)
    inputs = {"--my_report_data_path": cfg.MY_REPORT_DATA_PATH}
    for source in plan.sources:  # every file a folder or glob resolves to, e.g. a mix written beside its sources
        if not source.is_hub:
            count = len(source.files)
            inputs.update({f"--sources {source.key}" + (f" file {number} of {count}" if count > 1 else ""): str(path)
                           for number, path in enumerate(source.files, 1)})
    outputs = {"--output_file": str(output_file), "its manifest": str(manifest_path_for(output_file))}
    check_outputs_apart(outputs, inputs)
    check_output_file(output_file, "--output_file", cfg.OVERWRITE_OUTPUT)
    return output_file


class WorkFolder:
    """What a run stopped by a lost hub stream has done, kept next to OUTPUT_FILE (`<OUTPUT_FILE>.work/`) so that the
    same command continues it: the rows kept so far, the sources finished, and the lost stream's position, shuffle
    buffer and random draws. Only a run with the same configuration (and unchanged local files) picks it up."""

    def __init__(self, output_file: Path):
        self.folder = output_file.with_name(output_file.name + ".work")
        self.state_file = self.folder / "state.pickle"

    @staticmethod
    def fingerprint(cfg, plan: MixPlan) -> str:
        files = [
            (str(path), path.stat().st_size, path.stat().st_mtime_ns)
            for source in plan.sources if not source.is_hub for path in source.files
        ]
        settings = {key: str(value) for key, value in sorted(cfg.items()) if key not in NETWORK_SETTINGS}
        text = json.dumps([settings, files])
        return hashlib.sha256(text.encode()).hexdigest()

    def load(self, fingerprint: str) -> dict | None:
        if not self.state_file.is_file():
            return None
        try:
            with open(self.state_file, "rb") as handle:
                saved = pickle.load(handle)
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, ValueError) as error:
            print(f"warning: {self.state_file} cannot be read ({type(error).__name__}); starting over")
            return None
        if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
            print(f"warning: {self.folder} holds work of another configuration; starting over (it will be replaced)")
            return None
        return saved

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.state_file, "wb") as handle:
            pickle.dump(state, handle, protocol=pickle.HIGHEST_PROTOCOL)

    def remove(self) -> None:
        """Delete what we wrote: the state file, then the folder if nothing else is in it."""
        if self.state_file.is_file():
            self.state_file.unlink()
            with contextlib.suppress(OSError):
                self.folder.rmdir()


def _draw_all(plan: MixPlan, cfg, mixer: Mixer, work: WorkFolder) -> dict[str, dict]:
    """Draw every source into the buckets, continuing the work a lost hub stream left; returns what each hub
    source resolved to. A hub stream lost for good saves the work and ends the run with one line."""
    settings = HubSettings(float(cfg.get("HUB_TIMEOUT_SECONDS", 30)), float(cfg.get("NETWORK_RETRY_SECONDS", 120)))
    fingerprint = WorkFolder.fingerprint(cfg, plan)
    saved = work.load(fingerprint) or {"done": [], "hub": {}, "mixer": None, "source": None, "rows": None}
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
        keys = ("endpoint", "repo_id", "config", "revision", "commit_sha", "data_files", "missing_paths", "columns")
        return {key: hub[key] for key in keys}
    if len(file_hashes) == 1:
        return {"sha256": next(iter(file_hashes.values()))}
    return {"files": file_hashes}


def mix(cfg, *, report_key: str, script: str) -> Path:
    """Build the mixed dataset described by the stage's config; returns the output path."""
    with sigterm_interrupts():
        return _mix(cfg, report_key, script)


def _mix(cfg, report_key: str, script: str) -> Path:
    started = time.perf_counter()
    plan = plan_mix(cfg, report_key)
    output_file = check_mix_output(cfg, plan)
    if report_key in plan.feeds:
        read_records(cfg.MY_REPORT_DATA_PATH)  # a bad row anywhere in the file stops the run, not only a drawn one
    for source in plan.sources:
        if not source.is_hub:
            check_local_file(source)  # every missing file is reported before the slow imports and the hub
    if cfg.FATAL_BAD_ROWS:
        for source in plan.sources:
            if not source.is_hub and source.key != report_key:
                first_bad_row(source)
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

    shortfalls = _shortfalls(plan, mixer.stats)
    for key, item in shortfalls.items():
        print(
            f"shortfall: {key} requested {item['requested']:,}, delivered {item['delivered']:,} "
            f"(its sources ran out: {', '.join(_stopped_after(mixer.stats, item['sources_read']))}); "
            f"rows are never repeated: add rows or lower RATIOS[{key!r}]"
        )
    if shortfalls and cfg.SHORTFALL_IS_ERROR:
        detail = ", ".join(f"{key} {item['delivered']}/{item['requested']}" for key, item in shortfalls.items())
        raise UserError(
            f"shortfall (delivered/requested): {detail}; pass --shortfall_is_error false to write it anyway"
        )

    sources = {
        source.key: {
            "spec": source.spec,
            "kind": "hub" if source.is_hub else "file" if source.path else "files",
            "schema": source.schema.name,
            **_source_identity(file_hashes.get(source.key), hub_sources.get(source.key)),
            **mixer.stats[source.key].as_dict(source.key in plan.keyword_split),
        }
        for source in plan.sources
    }
    def describe(output_sha256: str) -> dict:  # the manifest, once the file's sha256 is known
        return build_manifest(
            Path(script).stem,
            cfg,
            seed=cfg.SEED,
            output={"path": str(output_file), "rows": len(mixer.lines), "sha256": output_sha256},
            buckets={
                key: {"requested": bucket.quota, "delivered": bucket.kept, "sources": bucket.sources}
                for key, bucket in plan.buckets.items()
            },
            shortfall=shortfalls,
            sources=sources,
            length_budget={"max_seq_length": cfg.MAX_SEQ_LENGTH,
                           "content_bytes": content_byte_budget(cfg.MAX_SEQ_LENGTH)},
            elapsed_s=round(time.perf_counter() - started, 3),
        )

    _write_shuffled(mixer.lines, output_file, cfg.SEED, describe)
    elapsed = time.perf_counter() - started
    WorkFolder(output_file).remove()
    _print_summary(plan, mixer.stats)
    print(
        f"wrote {len(mixer.lines):,} rows to {output_file} in {elapsed:.1f} s "
        f"({len(mixer.lines) / max(elapsed, 1e-9):,.0f} rows/s); manifest {manifest_path_for(output_file)}"
    )
    return output_file
