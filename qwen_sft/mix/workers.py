"""Step 4 of the mix, in parallel: a source's rows go in chunks to worker processes (one per core, for a large mix),
which prepare them (rows.prepare_chunk) and hand them back in order."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path

from .hub import StreamLost
from .parquet import ParquetChunk, ParquetRows, unpack_pieces
from .rows import PreparedRow, RowRules, prepare_chunk

CHUNK_ROWS = 1024  # rows prepared at a time (one RE2 call per keyword domain each; fewer calls, less overhead)
# Local Parquet rows: a chunk takes its rows out of every Arrow batch it touches (a take and an IPC message each), so
# a bigger chunk touches each batch fewer times (bench/hub_benchmark.py: 2-3% faster than 1,024, +0.04 GiB).
ARROW_CHUNK_ROWS = 4096
# Mixes at least this large prepare rows in one worker process per CPU core, for each source that still has to
# deliver at least this many rows; a smaller one (the report file, PubMedQA) is quicker to prepare in this process.
PARALLEL_MIN_ROWS = 20_000
CHUNKS_IN_FLIGHT_PER_WORKER = 2  # how far preparation runs ahead of the bookkeeping (bounded, for early stops)


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
    """(chunk, its PreparedRows) for consecutive chunks of (number, row, span), in order.

    With a pool, a few chunks per worker are prepared ahead, never the whole source, so a source whose buckets
    fill early is not read to its end; order, and so the output, does not depend on the workers. A lost hub
    stream first delivers every chunk drawn before it, then raises StreamLost.
    """
    chunks = rows.chunks(ARROW_CHUNK_ROWS) if isinstance(rows, ParquetRows) else _chunks(rows)
    pending = deque()
    try:
        for chunk in chunks:
            if pool is None:
                yield chunk, prepare_packed(rules, pack_chunk(chunk))
                continue
            pending.append((chunk, pool.submit(prepare_packed, rules, pack_chunk(chunk))))
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
            yield lost.partial, prepare_packed(rules, pack_chunk(lost.partial))
        raise
    finally:
        for _, future in pending:
            future.cancel()


def pack_chunk(chunk) -> tuple:
    """What preparing a chunk of (number, row, span) needs, for a worker: each row's (row, span), or for a
    ParquetChunk its rows as Arrow IPC messages (the worker makes them Python objects; this process only draws)."""
    if isinstance(chunk, ParquetChunk):
        return None, *chunk.pack()
    return [(row, span) for _, row, span in chunk], None, None


def unpack_chunk(packed: tuple) -> list[tuple]:
    """The (row, span) of each row of a chunk that pack_chunk packed, in the chunk's order."""
    rows, pieces, place = packed
    return rows if pieces is None else unpack_pieces(pieces, place)


def prepare_packed(rules: RowRules, packed: tuple) -> list[PreparedRow]:
    """prepare_chunk for a chunk that pack_chunk packed (a worker's task)."""
    return prepare_chunk(rules, unpack_chunk(packed))


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
def cyclic_gc_paused():
    """Turn the cyclic garbage collector off for the block. Drawing rows makes no reference cycles (reference
    counting frees everything), while the young-generation passes it triggers, mostly as the pool's thread unpickles
    prepared chunks (a PreparedRow and a dict of fields per row), cost 17% of the 240,000-row mix's throughput
    (bench/README.md, The data stage as a sub-package)."""
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


def worth_workers(rows: int) -> bool:
    """Whether preparing this many rows (a mix, or what a source still has to deliver) pays for worker processes."""
    return rows >= PARALLEL_MIN_ROWS


def worker_count(total_samples: int) -> int:
    """Worker processes for row preparation: one per available CPU core for a large mix, none for a small one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if cores > 1 and worth_workers(total_samples) else 0

