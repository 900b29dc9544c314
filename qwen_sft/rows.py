"""How one source row becomes a mix line: conversion, cleaning, the length budget, keyword hits and duplicate keys."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import orjson
import xxhash

from .families import family
from .records import BadJSON, parse_json
from .sources import Cut, Rejected, Schema, WrongSchema, read_span

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
    """records.parse_json(text), three times faster. orjson gives the same value for every line json accepts, except
    that it reads an integer beyond 64 bits as a float (only such a pm_score could rank differently); the lines it
    refuses (NaN, Infinity, lone surrogates, deep nesting, a byte-order mark, bad JSON) go to parse_json, which
    parses them or raises BadJSON with its own message."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return parse_json(text)


def convert_row(schema: Schema, row, text: bytes | None) -> tuple[tuple, str | None]:
    """(what prepare_rows works on, the turns cut from the row's chat if any): (kind, detail, None) for a row that
    cannot be used, (instruction, input, raw_output), or (a conversation or a record written as it is,)."""
    if text is not None:
        try:
            row = parse_json_line(text)
        except BadJSON as error:
            return (MALFORMED, str(error), None), None
    try:
        converted = schema.convert(row)
    except WrongSchema as error:
        return (WRONG_SCHEMA, str(error), None), None
    except Rejected as error:
        return (REJECTED, error.reason, None), None
    cut = None
    if isinstance(converted, Cut):
        converted, cut = converted.kept, converted.reason
    if isinstance(converted, (list, dict)):
        return (converted,), cut  # a conversation, or a record written as it is
    instruction, extra, raw_output = converted
    if not instruction:
        return (REJECTED, "empty_instruction", None), None
    if not raw_output:
        return (REJECTED, "empty_output", None), None
    return (instruction, extra, raw_output), cut


def prepare_rows(rules: RowRules, rows: list[tuple[object, tuple[int, int] | None]]) -> list[tuple]:
    """Read, parse, convert, clean, filter and key a chunk of (row, JSONL span); the bookkeeping stays with the
    caller.

    A keyword-split source has its questions matched in one RE2 pass per domain, and the answers of questions that
    match no domain are never cleaned.
    """
    schema = rules.schema
    with open(rules.path, "rb") if rules.path else contextlib.nullcontext() as handle:
        converted, cuts = zip(*[convert_row(schema, row, read_span(handle, span) if span else None)
                                for row, span in rows]) if rows else ((), ())
    hits = None
    if rules.keyword_patterns:
        counts = count_keyword_hits(rules.keyword_patterns, [_question(item) for item in converted])
        hits = list(zip(*counts.values()))
    prepared = []
    for position, item in enumerate(converted):
        if not isinstance(item[0], (str, list, dict)):
            prepared.append(item)
            continue
        row_hits = hits[position] if hits else None
        if hits and not any(row_hits):
            prepared.append((NO_KEYWORD_MATCH, None, row_hits))
            continue
        if isinstance(item[0], list):
            prepared.append((*_prepare_conversation(rules, item[0]), row_hits))
            continue
        if isinstance(item[0], dict):
            prepared.append((*_prepare_record(rules, item[0]), row_hits))
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
    # A kept row whose chat was cut carries why, so that the manifest counts it.
    return [(kind, detail + (cut,), hits) if cut and kind == USABLE else (kind, detail, hits)
            for (kind, detail, hits), cut in zip(prepared, cuts)]


def _question(item: tuple) -> str:
    """The text a converted row's keywords are matched in: its instruction, a conversation's first user turn, or a
    text row's text."""
    if isinstance(item[0], dict):
        item = (item[0].get("messages"),) if "messages" in item[0] else (item[0]["text"],)
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



def _prepare_record(rules: RowRules, record: dict) -> tuple:
    """(kind, detail) of a record written as it is (a conversation with tools or tool calls, a text row): its
    JSON, the tool specs included, is what it weighs against the byte budget."""
    from .template import reference_answer

    text = json.dumps(record, ensure_ascii=False)
    learned = record["text"] if "text" in record else reference_answer(record)
    if len(learned) < rules.min_output_chars:
        return FILTERED, "too_short"
    if utf8_length(text) > rules.byte_budget:
        return FILTERED, "too_long"
    return USABLE, (_folded_digest(text), text[:-1].encode() + b', "source": ')
