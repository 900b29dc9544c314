"""Step 2 of the mix, local files: a local source's rows, numbered, read in bounded memory (a JSONL line as a byte
span, parsed only once drawn), and the seeded shuffle buffer that every source is drawn through."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..cli import UserError
from ..records import BadJSON, iter_json_rows, parse_json
from .schemas import Schema

PARQUET_BATCH_ROWS = 1024  # rows converted to Python objects at a time
RANDOM_SLOTS_PER_DRAW = 1000  # shuffle-buffer slots drawn at a time, as datasets draws them


@dataclass(frozen=True)
class FileRow:
    """Where a row of a several-file source comes from."""

    path: str
    number: int

    def __str__(self) -> str:
        parquet = self.path.lower().endswith(".parquet")
        return f"{self.path} row {self.number}" if parquet else f"{self.path}:{self.number}"


def parquet_columns(parquet, schema) -> list[str] | None:
    """The Parquet columns to read for `schema` (a sources.Schema, or None): only those the schema reads (a missing
    one stays missing, so the row is reported as before), and of a list of structs only the fields it reads
    ("answers.list.element.text")."""
    if schema is None or not schema.columns:
        return None
    leaves = [parquet.schema.column(index).path for index in range(len(parquet.schema))]
    selected = []
    for name in schema.columns:
        if name not in parquet.schema_arrow.names:
            continue
        wanted = schema.subfields.get(name, ())
        fields = [leaf for leaf in leaves if leaf.startswith(f"{name}.") and leaf.rpartition(".")[2] in wanted]
        selected += fields or [name]
    return selected


def _random_slots(rng, buffer_size: int):
    while True:
        yield from rng.integers(0, buffer_size, size=RANDOM_SLOTS_PER_DRAW).tolist()


def shuffle_buffered(items, seed: int, buffer_size: int):
    """`items` in the order `datasets.IterableDataset.shuffle(seed=seed, buffer_size=buffer_size)` gives them.

    The same algorithm and the same random draws (a test compares the two), so the output does not change, but a
    local file no longer imports datasets and torch (about 2.5 CPU s) or pays datasets' per-row overhead. A full
    buffer yields a random slot and refills it with the next item; at the end the rest of the buffer is shuffled.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    slots = _random_slots(rng, buffer_size)  # drawn only once the buffer is full, as datasets does
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
        else:
            slot = next(slots)
            yield buffer[slot]
            buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def numbered_local_rows(path: str, schema: Schema | None = None):
    """Yield (number, row, None) for each row of a local file, or (number, None, (offset, length)) for a JSONL line,
    whose text is read and parsed only once it is drawn. JSONL and Parquet (only what `schema` reads, if given) are
    read in bounded memory."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        yield from _numbered_parquet_rows(path, schema)
        return
    with open(path, "rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()  # after a byte-order mark, if any
    if head.startswith(b"["):  # a JSON array has to be parsed whole
        for line, row in iter_json_rows(path):
            yield line, row, None
        return
    yield from numbered_jsonl_spans(path)


def numbered_jsonl_spans(path: Path):
    """(line number, None, (offset, length)) for each non-blank line of a JSONL file, its newline left out."""
    offset = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield number, None, (offset, len(line) - line.endswith(b"\n"))
            offset += len(line)


def read_span(handle, span: tuple[int, int]) -> bytes:
    """The bytes of one JSONL line drawn by (offset, length)."""
    offset, length = span
    return os.pread(handle.fileno(), length, offset)


def numbered_files_rows(paths: list[Path], schema: Schema | None = None):
    """(FileRow, row, None) for the rows of several local files, one after another."""
    for path in paths:
        with open(path, "rb") as handle:
            for number, row, span in numbered_local_rows(path, schema):
                if span is not None:
                    try:
                        row = parse_json(read_span(handle, span))
                    except BadJSON as error:
                        raise UserError(f"{path}:{number}: {error}") from None
                yield FileRow(str(path), number), row, None


def _numbered_parquet_rows(path: Path, schema: Schema | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=parquet_columns(parquet, schema)):
            for row in batch.to_pylist():
                number += 1
                yield number, row, None
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: not a readable Parquet file ({error})") from None


def prefer_jemalloc() -> None:
    """Arrow's jemalloc pool where pyarrow has one (unless ARROW_DEFAULT_MEMORY_POOL names a pool): a ParquetRows
    holds on to the Parquet batches whose rows are not all drawn yet, and with the default pool (mimalloc) reading
    and gathering them then costs half as much again, in fresh pages."""
    import pyarrow as pa

    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        with contextlib.suppress(NotImplementedError):
            pa.set_memory_pool(pa.jemalloc_memory_pool())

