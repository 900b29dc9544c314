"""What reading a local source's rows needs in both sources.py and parquet_rows.py (which sources.py opens a
Parquet source with): the seeded shuffle, the Parquet columns a schema reads, and where a row of several files
comes from."""

from __future__ import annotations

from dataclasses import dataclass

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
