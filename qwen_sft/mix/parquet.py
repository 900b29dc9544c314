"""Step 2 of the mix, local Parquet files: a source drawn by row positions: the seeded shuffle orders plain integers, and a chunk of drawn
rows reaches a worker process as a few Arrow IPC messages, so the process that draws rows never turns a row into
Python objects (it decodes the Parquet pages once, in file order, and narrows them with the schema)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from ..cli import UserError
from .reading import PARQUET_BATCH_ROWS, FileRow, parquet_columns, shuffle_buffered


class ParquetRows:
    """The rows of one or more local Parquet files in the order `shuffle_buffered` gives them, as ParquetChunks.

    Batches are decoded only as far as the rows drawn so far reach, and dropped once every row of theirs has been
    packed, so what is held is the batches that the shuffle buffer's rows come from (about 80 of 1,024 rows for a
    buffer of 10,000, as rows stay in the buffer for long).
    """

    def __init__(self, paths: list[Path], schema, seed: int, buffer_size: int, single_file: bool):
        self.paths, self.schema, self.single_file = paths, schema, single_file
        self.seed, self.buffer_size = seed, buffer_size

    def chunks(self, rows_per_chunk: int):
        """ParquetChunks of `rows_per_chunk` drawn rows; the files' footers are read now, their rows as drawn."""
        import numpy as np

        self.file_starts = np.cumsum([0] + [self._row_count(path) for path in self.paths])
        self.batches, self.undrawn, self.decoded_until = {}, {}, 0  # by each batch's first position, in order
        self.reader = self._read_batches()
        positions = iter(shuffle_buffered(range(int(self.file_starts[-1])), self.seed, self.buffer_size))
        try:
            while drawn := list(islice(positions, rows_per_chunk)):
                yield ParquetChunk(self, np.array(drawn, dtype=np.int64))
        finally:  # also after an early stop: the batches go now, and the reader, which refers back to self
            self.reader.close()
            self.reader, self.batches = None, {}

    def _row_count(self, path: Path) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as error:
            raise _unreadable(path, error) from None

    def _read_batches(self):
        """(first position, batch) in file order: only the columns the schema reads."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        bounds = self.file_starts.tolist()
        for path, first, end in zip(self.paths, bounds, bounds[1:]):
            start = first
            try:
                parquet = pq.ParquetFile(path)
                columns = parquet_columns(parquet, self.schema)
                for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                    start += batch.num_rows
                    if start > end:
                        break
                    yield start - batch.num_rows, self.schema.narrow_batch(batch) if self.schema else batch
            except (pa.ArrowException, OSError) as error:
                raise _unreadable(path, error) from None
            if start != end:  # the footers' counts place every later row: a file that differs would shift them
                raise _unreadable(path, f"more or fewer rows than the {end - first:,} its footer counts")

    def _decode_through(self, position: int) -> None:
        """Decode batches until the one holding `position`."""
        while position >= self.decoded_until:
            start, batch = next(self.reader)  # the footers' counts cover every position: it cannot run out
            self.batches[start], self.undrawn[start] = batch, batch.num_rows
            self.decoded_until = start + batch.num_rows

    def pack(self, positions) -> tuple:
        """The rows at `positions` as (Arrow schema, IPC message) per batch they come from, and where each row of
        the chunk is among the pieces' rows taken one after another."""
        import numpy as np
        import pyarrow as pa

        self._decode_through(int(positions.max()))
        live = np.fromiter(self.batches, dtype=np.int64, count=len(self.batches))  # a drawn row's batch is live
        starts = live[np.searchsorted(live, positions, side="right") - 1]
        by_batch = np.argsort(starts, kind="stable")
        groups = np.split(by_batch, np.flatnonzero(np.diff(starts[by_batch])) + 1)
        pieces = []
        for group in groups:
            start = int(starts[group[0]])
            batch = self.batches[start]
            picks = pa.array((positions[group] - start).astype(np.int32))
            pieces.append((batch.schema, batch.take(picks).serialize().to_pybytes()))
            self.undrawn[start] -= len(group)
            if not self.undrawn[start]:  # every row of it is packed
                del self.batches[start], self.undrawn[start]
        place = np.empty_like(by_batch)
        place[by_batch] = np.arange(len(by_batch))
        return pieces, place.tolist()

    def number(self, position: int):
        """The user-facing row number of a position: the row in its file (from 1), with the file if several."""
        file_index = self._file_index(position)
        number = position - int(self.file_starts[file_index]) + 1
        return number if self.single_file else FileRow(str(self.paths[file_index]), number)

    def _file_index(self, position: int) -> int:
        import numpy as np

        return int(np.searchsorted(self.file_starts, position, side="right")) - 1


class ParquetChunk:
    """Drawn positions of a ParquetRows: indexing gives (number, None, None), as a chunk of any other source."""

    __slots__ = ("rows", "positions")

    def __init__(self, rows: ParquetRows, positions):
        self.rows, self.positions = rows, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return ParquetChunk(self.rows, self.positions[key])
        return self.rows.number(int(self.positions[key])), None, None

    def pack(self) -> tuple:
        return self.rows.pack(self.positions)


def unpack_pieces(pieces: list[tuple], place: list[int]) -> list[tuple]:
    """The (row, None) of each row that ParquetRows.pack packed, in the chunk's order, as Python objects."""
    import pyarrow as pa

    rows = []
    for schema, message in pieces:
        rows += pa.ipc.read_record_batch(pa.py_buffer(message), schema).to_pylist()
    return [(rows[index], None) for index in place]


def _unreadable(path: Path, error) -> UserError:
    return UserError(f"{path}: not a readable Parquet file ({error})")
