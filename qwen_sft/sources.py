"""Where mixing rows come from: local files or streamed hub datasets, and the adapters that turn each hub
schema into instruction/input/output (or, for a multi-turn conversation, into "messages").

A source is a hub id (streamed with `datasets`, never downloaded whole) or a local .json/.jsonl/.parquet file in
that dataset's own schema. Both are drawn through the same seeded shuffle buffer (`IterableDataset.shuffle` for a
hub id, its exact replica `shuffle_buffered` for a local file), so memory stays bounded by the buffer, whatever the
source's size.

Schemas (the SOURCES key picks the adapter):
- orca: Open-Orca/SlimOrca, `conversations` = [{from: system|human|gpt, value}]; a chat of several human/gpt
  exchanges becomes a conversation row.
- pubmed: qiaojin/PubMedQA pqa_labeled, `question, context{contexts, labels, meshes}, long_answer, final_decision`.
- stackexchange: HuggingFaceH4/stack-exchange-preferences, `qid, question, answers[{answer_id, author, pm_score,
  selected, text}], date, metadata`; HTML becomes plain text and the answer is the best by pm_score, then selected.
"""

from __future__ import annotations

import html
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .cli import UserError
from .records import iter_json_rows, validate_record

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
# Names that are plainly files (so a typo gives "file not found", not a failed hub lookup).
FILE_SUFFIXES = LOCAL_SUFFIXES + (".csv", ".tsv", ".txt", ".gz", ".zip", ".arrow", ".xlsx")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_CONFIGS = {"qiaojin/PubMedQA": "pqa_labeled"}  # hub datasets that need a config name
PARQUET_BATCH_ROWS = 1024  # rows converted to Python objects at a time
RANDOM_SLOTS_PER_DRAW = 1000  # shuffle-buffer slots drawn at a time, as datasets draws them


class WrongSchema(ValueError):
    """The row does not have the fields (or types) its dataset's schema promises."""


class Rejected(ValueError):
    """The row has the right shape but nothing usable (an empty field, no answers); `reason` is counted."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------- HTML to text

# Every pattern starts with a literal ("<", "\n"), so re jumps between those characters instead of trying each position.
_DROPPED_BLOCKS = re.compile(r"<(?:!--.*?--|(script|style)\b[^>]*>.*?</\1\s*)>", re.S | re.I)
_LINE_BREAK_TAGS = re.compile(
    r"<(?:(?:br|hr)\b[^>]*|/(?:p|div|pre|blockquote|h[1-6]|tr|table|ul|ol|dl|dd|dt)\s*)>", re.I
)
_LIST_ITEM_TAGS = re.compile(r"<li\b[^>]*>", re.I)
_ANY_TAG = re.compile(r"</?[A-Za-z][^>]*>")
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def html_to_text(markup: str) -> str:
    """Plain text of an HTML fragment: no tags, entities decoded, paragraphs and list items on their own lines.

    Regexes rather than html.parser because this runs on every StackExchange question and answer: tags are
    found by `</?letter...>`, so a literal "a < b" (escaped as &lt; in real markup) is never mistaken for one.
    """
    if "<" in markup:
        markup = _DROPPED_BLOCKS.sub("", markup)
        markup = _LINE_BREAK_TAGS.sub("\n", markup)
        markup = _LIST_ITEM_TAGS.sub("\n- ", markup)
        markup = _ANY_TAG.sub("", markup)
    text = html.unescape(markup).replace("\xa0", " ")
    return _BLANK_LINES.sub("\n\n", text).strip()


# ---------------------------------------------------------------------------------------------------- adapters


def _text_field(row, key: str) -> str:
    if not isinstance(row, dict):
        raise WrongSchema(f"expected a JSON object, got {type(row).__name__}")
    value = row.get(key)
    if not isinstance(value, str):
        raise WrongSchema(f'"{key}" is {"missing" if key not in row else "not a string"}')
    return value


class Schema(ABC):
    """Turns one raw row into (instruction, input, raw_output), or a conversation into its list of messages
    ({"role", "content"}, raw answers); `finish_output`, where a schema's costly part lives, runs only for rows
    that can still be kept (on each answer of a conversation)."""

    name = ""

    @abstractmethod
    def convert(self, row) -> tuple[str, str, str] | list[dict]:
        """Raise WrongSchema for a row of another shape, Rejected for a row with nothing usable."""

    def finish_output(self, raw_output: str) -> str:
        return raw_output


class ReportSchema(Schema):
    name = "instruction/input/output"

    def convert(self, row):
        record = validate_record(row, "report")  # the file was validated whole before mixing starts
        if "messages" in record:
            return [{"role": turn["role"], "content": turn["content"].strip()} for turn in record["messages"]]
        return record["instruction"].strip(), record["input"].strip(), record["output"].strip()


class SlimOrcaSchema(Schema):
    name = "SlimOrca"

    def convert(self, row):
        turns = row.get("conversations") if isinstance(row, dict) else None
        if not isinstance(turns, list):
            raise WrongSchema('"conversations" must be a list of {"from", "value"} turns')
        system, exchanges = None, []
        for turn in turns:
            well_formed = isinstance(turn, dict) and isinstance(turn.get("value"), str)
            role = turn.get("from") if well_formed else None
            if exchanges and exchanges[0][1] is not None and role not in ("system", "human", "gpt"):
                break  # after a first whole exchange, a broken turn ends the chat (as it always did)
            if not well_formed:
                raise WrongSchema('each turn in "conversations" needs "from" and a string "value"')
            if role not in ("system", "human", "gpt"):
                raise WrongSchema(f'turn "from" must be system, human or gpt, got {role!r}')
            if role == "system" and not exchanges:
                system = turn["value"]
            elif role == "human" and (not exchanges or exchanges[-1][1] is not None):
                exchanges.append([turn["value"], None])
            elif role == "gpt" and exchanges and exchanges[-1][1] is None:
                exchanges[-1][1] = turn["value"]
            elif exchanges and exchanges[0][1] is not None:
                break  # the chat stops alternating: it keeps its exchanges so far
        exchanges = [(human.strip(), answer.strip()) for human, answer in exchanges if answer is not None]
        if not exchanges:
            raise WrongSchema('"conversations" needs a "human" turn followed by a "gpt" turn')
        # A later exchange with an empty side ends the chat (the first one is judged as a single-turn row is).
        empty = next((index for index, pair in enumerate(exchanges) if index and not all(pair)), len(exchanges))
        del exchanges[empty:]
        # The system turn often carries the task ("explain like I'm five"); the answer only fits with it.
        system = (system or "").strip()
        first = exchanges[0][0]
        exchanges[0] = ((f"{system}\n\n{first}" if system and first else first), exchanges[0][1])
        if len(exchanges) == 1:
            return exchanges[0][0], "", exchanges[0][1]
        return [
            {"role": role, "content": content}
            for human, answer in exchanges
            for role, content in (("user", human), ("assistant", answer))
        ]


class PubMedQASchema(Schema):
    name = "PubMedQA pqa_labeled"
    decisions = {"yes": "Yes", "no": "No", "maybe": "Maybe"}

    def convert(self, row):
        question = _text_field(row, "question")
        long_answer = _text_field(row, "long_answer")
        decision = _text_field(row, "final_decision")
        context = row.get("context")
        passages = context.get("contexts") if isinstance(context, dict) else None
        labels = (context.get("labels") or []) if isinstance(context, dict) else []
        if not isinstance(passages, list) or not all(isinstance(item, str) for item in passages) or not isinstance(
            labels, list
        ):
            raise WrongSchema('"context" must hold a "contexts" list of strings (and a "labels" list)')
        if decision.strip().lower() not in self.decisions:
            raise WrongSchema(f'"final_decision" must be yes, no or maybe, got {decision!r}')
        if len(labels) == len(passages) and all(isinstance(label, str) and label for label in labels):
            abstract = "\n".join(f"{label.strip()}: {text.strip()}" for label, text in zip(labels, passages))
        else:
            abstract = "\n".join(text.strip() for text in passages)
        answer = long_answer.strip()
        # Verdict first, then the evidence: the shape the system prompt asks for.
        output = f"{self.decisions[decision.strip().lower()]}. {answer}" if answer else ""
        return question.strip(), abstract.strip(), output


_SCORE_TYPES = (int, float)
_SELECTED = (True, "true", "True")  # the accepted answer's flag: a bool, or its text in some exports


class StackExchangeSchema(Schema):
    name = "stack-exchange-preferences"

    def convert(self, row):
        question = _text_field(row, "question")
        answers = row.get("answers")
        if not isinstance(answers, list):
            raise WrongSchema('"answers" must be a list of {answer_id, author, pm_score, selected, text}')
        best, best_rank = None, None
        for answer in answers:
            # type() rather than isinstance(): a bool pm_score is not a score; this loop runs for every answer read
            score = answer.get("pm_score") if type(answer) is dict else None
            text = answer.get("text") if type(score) in _SCORE_TYPES else None
            if type(text) is not str:
                raise WrongSchema('each answer needs a string "text" and a numeric "pm_score"')
            rank = (score, answer.get("selected") in _SELECTED)
            if (best_rank is None or rank > best_rank) and not text.isspace() and text:
                best, best_rank = text, rank
        if best is None:
            raise Rejected("no_answer")
        return html_to_text(question), "", best

    def finish_output(self, raw_output):
        return html_to_text(raw_output)


SCHEMAS: dict[str, Schema] = {
    "orca": SlimOrcaSchema(),
    "pubmed": PubMedQASchema(),
    "stackexchange": StackExchangeSchema(),
}
REPORTS = ReportSchema()


# ---------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One input: `key` (a SOURCES key, or the RATIOS key of the report file), its schema and where it lives."""

    key: str
    spec: str
    schema: Schema

    @cached_property
    def is_hub(self) -> bool:
        """An owner/name hub id rather than a local path (a path that exists, or that ends like a data file)."""
        spec = self.spec
        return not (Path(spec).exists() or spec.lower().endswith(FILE_SUFFIXES)) and bool(HUB_ID.fullmatch(spec))

    def where(self, number: int) -> str:
        """A user-facing pointer to a row: file:line for JSON, file row N for Parquet, the stream position for hub."""
        if self.is_hub:
            return f"{self.spec} (streamed row {number})"
        if self.spec.lower().endswith(".parquet"):
            return f"{self.spec} row {number}"
        return f"{self.spec}:{number}"


def check_local_file(source: Source) -> None:
    """Fail early, with one line, on a local source that cannot be read."""
    path = Path(source.spec)
    if not path.exists():
        raise UserError(f"{source.key}: {path}: file not found (a hub id looks like owner/name)")
    if not path.is_file():
        raise UserError(f"{source.key}: {path}: is not a file")
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise UserError(f"{source.key}: {path}: unsupported file type (use .json, .jsonl or .parquet)")


def _numbered_local_rows(path: str):
    """Yield (number, row, None) for each row of a local file, or (number, None, (offset, length)) for a JSONL line,
    whose text is read and parsed only once it is drawn. JSONL and Parquet are read in bounded memory."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        yield from _numbered_parquet_rows(path)
        return
    with open(path, "rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()  # after a byte-order mark, if any
    if head.startswith(b"["):  # a JSON array has to be parsed whole
        for line, row in iter_json_rows(path):
            yield line, row, None
        return
    yield from _numbered_jsonl_spans(path)


_BLANK_BYTES = frozenset(b" \t\r\x0b\x0c")


def _numbered_jsonl_spans(path: Path, block_size: int = 1 << 20):
    """(line number, None, (offset, length)) for each non-blank line of a JSONL file.

    The file is read into one reused buffer: a fresh 1 MiB bytes object per read would be mapped and unmapped by
    malloc each time (page faults), and smaller reads give up the GIL more often, each time waiting to get it back
    from the threads that hash files and collect the workers' results."""
    number, block_offset, filled = 0, 0, 0
    block = bytearray(block_size)
    with open(path, "rb", buffering=0) as handle:
        while True:
            if filled == len(block):  # one line fills the buffer: make room for the rest of it
                block.extend(bytes(len(block)))
            read = handle.readinto(memoryview(block)[filled:])
            filled += read
            start = 0
            end = block.find(b"\n", 0, filled)
            while end != -1 or (not read and start < filled):
                end = filled if end == -1 else end  # a last line without a newline
                number += 1
                if end > start and (block[start] not in _BLANK_BYTES or block[start:end].strip()):
                    yield number, None, (block_offset + start, end - start)
                start = end + 1
                end = block.find(b"\n", start, filled)
            if not read:
                return
            block[: filled - start] = block[start:filled]  # the partial last line moves to the front
            block_offset += start
            filled -= start


def read_span(handle, span: tuple[int, int]) -> bytes:
    """The bytes of one JSONL line drawn by (offset, length)."""
    offset, length = span
    return os.pread(handle.fileno(), length, offset)


def _numbered_parquet_rows(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                yield number, row, None
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: not a readable Parquet file ({error})") from None


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


def open_rows(source: Source, seed: int, buffer_size: int):
    """The source's rows through a seeded shuffle buffer, as (row number, parsed row or None, (offset, length) of a
    JSONL line or None); the number is the file's line or row for local files and the position in the stream for
    hub ids. Nothing is read yet.

    A local file must have passed check_local_file; a hub id is resolved here, so an unreachable one fails before
    any row is mixed.
    """
    if not source.is_hub:
        return shuffle_buffered(_numbered_local_rows(source.spec), seed, buffer_size)
    import datasets

    datasets.logging.set_verbosity_error()
    try:
        stream = datasets.load_dataset(source.spec, HUB_CONFIGS.get(source.spec), split="train", streaming=True)
    except Exception as error:  # offline, unknown id, gated, network: all end the same way for the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{source.key}: cannot stream the hub dataset {source.spec!r} ({reason}); download it where the hub "
            f"is reachable and point the source at the file, e.g. --sources {source.key}=/path/to/"
            f"{source.key}.jsonl (or .json/.parquet, in the {source.schema.name} schema)"
        ) from None
    stream = stream.shuffle(seed=seed, buffer_size=buffer_size)
    return ((number, row, None) for number, row in enumerate(stream, start=1))
