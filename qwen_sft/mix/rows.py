"""Steps 3-4 of the mix: how one source row becomes a mix line. Its schema converts it (a ConvertedRow), then it is
cleaned, weighed against the length budget, matched against the keywords and given its duplicate key (a
PreparedRow, holding its mix line for each bucket it may fill, encoded here in the worker)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import orjson
import xxhash

from ..families import family
from ..records import BadJSON, parse_json
from .reading import read_span
from .schemas import Cut, Rejected, Schema, WrongSchema

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


def content_byte_budget(max_seq_length: int, system_prompt: str) -> int:
    """UTF-8 bytes that instruction + input + output may take so that the example, rendered with the system prompt
    that training will use, fits."""
    system_tokens = utf8_length(system_prompt) / family.BYTES_PER_TOKEN
    return int((max_seq_length - family.TEMPLATE_TOKENS - system_tokens) * family.BYTES_PER_TOKEN)


def conversation_utf8_length(messages: list[dict]) -> int:
    """What a conversation weighs against content_byte_budget: its contents, plus the template of each exchange
    beyond the first in bytes."""
    exchanges = sum(turn["role"] == "assistant" for turn in messages)
    extra_template = (exchanges - 1) * family.EXCHANGE_TEMPLATE_TOKENS * family.BYTES_PER_TOKEN
    return sum(utf8_length(turn["content"]) for turn in messages) + int(extra_template)



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


# What becomes of a row: usable, or why not (FILTERED and NO_KEYWORD_MATCH rows are well formed but not kept).
USABLE, FILTERED, NO_KEYWORD_MATCH, REJECTED, WRONG_SCHEMA, MALFORMED = range(6)


class Example(NamedTuple):
    """A single-turn row, its output as the source wrote it (Schema.finish_output cleans it)."""

    instruction: str
    input: str
    raw_output: str


class ConvertedRow(NamedTuple):
    """A source row after its schema's convert(): `content` is an Example, a conversation (a list of messages) or a
    record written as it is (a dict); or None, and `kind` (REJECTED, WRONG_SCHEMA, MALFORMED) and `reason` say why.
    `cut` says why a kept chat lost turns."""

    content: Example | list | dict | None
    kind: int = USABLE
    reason: str | None = None
    cut: str | None = None


class PreparedRow(NamedTuple):
    """A row judged: a USABLE one has its duplicate `key` and its mix `lines`, one per bucket it may fill (the
    worker encodes them; which one is written, the drawing decides); another says why in `reason`. `hits`: keyword
    hits per domain, for a source split by KEYWORDS."""

    kind: int
    reason: str | None = None
    hits: tuple[int, ...] | None = None
    key: bytes | None = None
    lines: dict[str, bytes] | None = None
    cut: str | None = None


class Usable(NamedTuple):
    """A row fit for the mix, before its lines are made: its duplicate key and the fields of its line."""

    key: bytes
    fields: dict


@dataclass(frozen=True)
class RowRules:
    """Everything needed to prepare one source's rows; picklable, so preparation can run in worker processes."""

    schema: Schema
    path: str | None  # the local file that JSONL spans point into
    byte_budget: int
    min_output_chars: int
    keyword_patterns: dict[str, str] | None  # domain -> RE2 pattern, for a source split by KEYWORDS
    buckets: tuple[str, ...]  # the buckets the source fills (its domains, for a source split by KEYWORDS)


def parse_json_line(text: bytes):
    """records.parse_json(text), three times faster. orjson gives the same value for every line json accepts, except
    that it reads an integer beyond 64 bits as a float (only such a pm_score could rank differently); the lines it
    refuses (NaN, Infinity, lone surrogates, deep nesting, a byte-order mark, bad JSON) go to parse_json, which
    parses them or raises BadJSON with its own message."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return parse_json(text)


def convert_source_row(schema: Schema, row, text: bytes | None) -> ConvertedRow:
    """The row (or the JSONL line `text`, parsed here) converted by its source's schema."""
    if text is not None:
        try:
            row = parse_json_line(text)
        except BadJSON as error:
            return ConvertedRow(None, MALFORMED, str(error))
    try:
        converted = schema.convert(row)
    except WrongSchema as error:
        return ConvertedRow(None, WRONG_SCHEMA, str(error))
    except Rejected as error:
        return ConvertedRow(None, REJECTED, error.reason)
    cut = None
    if isinstance(converted, Cut):
        converted, cut = converted.kept, converted.reason
    if isinstance(converted, (list, dict)):
        return ConvertedRow(converted, cut=cut)
    example = Example(*converted)
    if not example.instruction:
        return ConvertedRow(None, REJECTED, "empty_instruction")
    if not example.raw_output:
        return ConvertedRow(None, REJECTED, "empty_output")
    return ConvertedRow(example, cut=cut)


def prepare_chunk(rules: RowRules, rows: list[tuple[object, tuple[int, int] | None]]) -> list[PreparedRow]:
    """Read, parse, convert, clean, filter and key a chunk of (row, JSONL span); the bookkeeping stays with the
    caller.

    A keyword-split source has its questions matched in one RE2 pass per domain, and the answers of questions that
    match no domain are never cleaned.
    """
    with open(rules.path, "rb") if rules.path else contextlib.nullcontext() as handle:
        converted = [convert_source_row(rules.schema, row, read_span(handle, span) if span else None)
                     for row, span in rows]
    hits = [None] * len(converted)
    if rules.keyword_patterns:
        counts = count_keyword_hits(rules.keyword_patterns, [_question(item.content) for item in converted])
        hits = list(zip(*counts.values())) or hits
    return [_prepare(rules, item, row_hits) for item, row_hits in zip(converted, hits)]


def _prepare(rules: RowRules, item: ConvertedRow, hits: tuple[int, ...] | None) -> PreparedRow:
    if item.content is None:
        return PreparedRow(item.kind, item.reason)
    if hits is not None and not any(hits):
        return PreparedRow(NO_KEYWORD_MATCH, None, hits)
    if isinstance(item.content, list):
        prepared = _prepare_conversation(rules, item.content)
    elif isinstance(item.content, dict):
        prepared = _prepare_record(rules, item.content)
    else:
        prepared = _prepare_example(rules, item.content)
    if isinstance(prepared, PreparedRow):  # not kept, and why
        return prepared._replace(hits=hits)
    buckets = [bucket for bucket, count in zip(rules.buckets, hits) if count] if hits else rules.buckets
    lines = {bucket: mix_line(prepared.fields, bucket) for bucket in buckets}
    return PreparedRow(USABLE, hits=hits, key=prepared.key, lines=lines, cut=item.cut)


def _prepare_example(rules: RowRules, example: Example) -> PreparedRow | Usable:
    instruction, extra = example.instruction, example.input
    output = rules.schema.finish_output(example.raw_output)
    if not output:
        return PreparedRow(REJECTED, "empty_output")
    if len(output) < rules.min_output_chars:
        return PreparedRow(FILTERED, "too_short")
    if utf8_length(instruction) + utf8_length(extra) + utf8_length(output) > rules.byte_budget:
        return PreparedRow(FILTERED, "too_long")
    fields = {"instruction": instruction, "input": extra, "output": output}
    return Usable(duplicate_key(instruction, extra, output), fields)


def _question(content) -> str:
    """The text a converted row's keywords are matched in: its instruction, a conversation's first user turn, or a
    text row's text."""
    if isinstance(content, dict):
        content = content.get("messages") if "messages" in content else content["text"]
    if isinstance(content, list):
        return next(turn["content"] for turn in content if turn["role"] == "user")
    return content.instruction if isinstance(content, Example) else content or ""


def _prepare_conversation(rules: RowRules, messages: list[dict]) -> PreparedRow | Usable:
    """A conversation, judged by the rules of a single-turn row; its last answer is its output."""
    messages = [
        {"role": "assistant", "content": rules.schema.finish_output(turn["content"])}
        if turn["role"] == "assistant" else turn
        for turn in messages
    ]
    if not all(turn["content"] for turn in messages):
        return PreparedRow(REJECTED, "empty_output" if not messages[-1]["content"] else "empty_turn")
    if len(messages[-1]["content"]) < rules.min_output_chars:
        return PreparedRow(FILTERED, "too_short")
    if conversation_utf8_length(messages) > rules.byte_budget:
        return PreparedRow(FILTERED, "too_long")
    return Usable(conversation_duplicate_key(messages), {"messages": messages})


def _prepare_record(rules: RowRules, record: dict) -> PreparedRow | Usable:
    """A record written as it is (a conversation with tools or tool calls, a text row): its JSON, the tool specs
    included, is what it weighs against the byte budget."""
    from ..template import reference_answer

    text = orjson.dumps(record).decode()
    learned = record["text"] if "text" in record else reference_answer(record)
    if len(learned) < rules.min_output_chars:
        return PreparedRow(FILTERED, "too_short")
    if utf8_length(text) > rules.byte_budget:
        return PreparedRow(FILTERED, "too_long")
    return Usable(_folded_digest(text), record)


def mix_line(fields: dict, source: str) -> bytes:
    """A kept row's line in the mix: its fields and the bucket it fills, in UTF-8 with its text left raw (U+2028
    included, as records.json_line writes it), ended by a newline. Not OPT_APPEND_NEWLINE: orjson 3.13 then
    returns the line in its whole work buffer (tens of KB a line, 2.4 GiB for a 240,000-row mix), while `+`
    copies it to its own size."""
    return orjson.dumps({**fields, "source": source}) + b"\n"
