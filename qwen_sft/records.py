"""Reading and validating records: JSON arrays and JSONL, rows in any of the formats that formats.py reads (a file
may mix them), every bad row reported with its file and line, every row the toolkit writes read back equal."""

from __future__ import annotations

import bisect
import json
import os
import re
import sys
from pathlib import Path

from .artifacts import warn_if_manifest_differs
from .cli import UserError
from .formats import ALPACA_HELP, CONVERTING, IgnoredFields, check_format, convert_row

RECORD_HELP = ALPACA_HELP
PROMPT_HELP = (
    'each row needs a non-empty "instruction" string and, optionally, an "input" string (or a "messages" list, '
    'a sharegpt "conversations" list or a "prompt"; ' + CONVERTING + ")"
)


def validate_record(row, where: str, with_output: bool = True, dataset_format: str = "auto",
                    ignored: IgnoredFields | None = None) -> dict:
    """Return the row as a clean record (formats.convert_row), or raise UserError naming `where` (file:line).

    With `with_output=False` the row is a prompt (inference): no answer is required or returned, and a
    conversation may end with a user turn.
    """
    return convert_row(row, where, with_output, dataset_format, ignored)


class BadJSON(ValueError):
    """A row that no reader can take as JSON text: its message names what is wrong (the caller adds the place)."""


def parse_json(text: str | bytes):
    """json.loads(text), with every way a row can fail as BadJSON: malformed JSON, text that is not UTF-8, nesting
    deeper than the parser's recursion, an integer longer than Python converts, and a lone surrogate (an escape
    such as "\\ud800" that no UTF-8 writer, the tokenizer included, can encode)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadJSON(f"malformed JSON ({error.msg} at column {error.colno})") from None
    except UnicodeDecodeError as error:
        raise BadJSON(f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except RecursionError:
        raise BadJSON("JSON nested too deeply to read") from None
    except ValueError:  # int(): more digits than sys.get_int_max_str_digits()
        raise BadJSON(f"a number with more than {sys.get_int_max_str_digits():,} digits") from None
    _refuse_lone_surrogates(text, value)
    return value


def _refuse_lone_surrogates(text: str | bytes, value) -> None:
    """BadJSON if a string of `value` holds a lone surrogate. Only an escape can put one there (a UTF-8 file holds
    none raw), so rows without a "\\ud8".."\\udf" escape are not walked."""
    escapes = _SURROGATE_ESCAPE_BYTES if isinstance(text, bytes) else _SURROGATE_ESCAPE
    if not escapes.search(text):
        return
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending += item.keys()
            pending += item.values()
        elif isinstance(item, list):
            pending += item
        elif isinstance(item, str) and _LONE_SURROGATE.search(item):
            raise BadJSON("a lone surrogate escape (such as \"\\ud800\") in a string: not Unicode text")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def iter_json_rows(path: str | os.PathLike):
    """Yield (line_number, parsed_row) from a JSON array or JSONL file (`-` = standard input); a row that cannot
    be read (parse_json) raises UserError naming the file and line.

    JSONL lines end at "\\n" (or "\\r\\n") only: U+2028, U+2029 and U+0085, which str.splitlines() also splits on,
    are legal raw inside a JSON string, and the toolkit's own writers leave them raw."""
    from_stdin = str(path) == "-"
    path = Path("<stdin>" if from_stdin else path)
    if not from_stdin and path.is_dir():
        raise UserError(f"{path}: is a folder, not a file")
    if not from_stdin and not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        # utf-8-sig: a byte-order mark (some Windows editors write one) is dropped, so line 1 is still line 1.
        data = sys.stdin.buffer.read() if from_stdin else path.read_bytes()
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if text.lstrip().startswith("["):
        yield from _iter_json_array(path, text)
        return
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield line_number, parse_json(line)
        except BadJSON as error:
            raise UserError(f"{path}:{line_number}: {error}") from None


def json_line(row) -> str:
    """One JSONL line as every stage writes it: UTF-8 text left raw (U+2028 included), ended by "\\n"."""
    return json.dumps(row, ensure_ascii=False) + "\n"


def line_starts(text: str) -> list[int]:
    """The index at which each line of `text` starts, found in one pass."""
    starts = [0]
    index = text.find("\n")
    while index != -1:
        starts.append(index + 1)
        index = text.find("\n", index + 1)
    return starts


def _iter_json_array(path: Path, text: str):
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    starts = line_starts(text)

    def skip_space(index: int) -> int:
        while index < len(text) and text[index].isspace():
            index += 1
        return index

    def line_at(index: int) -> int:
        """Line number of `index` by binary search over the line starts: linear time over the whole file, where
        counting the newlines before every row took quadratic time."""
        return bisect.bisect_right(starts, index)

    position = skip_space(position)
    if position < len(text) and text[position] == "]":
        return
    while True:
        try:
            row, end = decoder.raw_decode(text, position)
            _refuse_lone_surrogates(text[position:end], row)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno})") from None
        except RecursionError:
            raise UserError(f"{path}:{line_at(position)}: JSON nested too deeply to read") from None
        except BadJSON as error:
            raise UserError(f"{path}:{line_at(position)}: {error}") from None
        except ValueError:  # int(): more digits than sys.get_int_max_str_digits()
            limit = sys.get_int_max_str_digits()
            raise UserError(f"{path}:{line_at(position)}: a number with more than {limit:,} digits") from None
        yield line_at(position), row
        position = skip_space(end)
        if position < len(text) and text[position] == ",":
            position = skip_space(position + 1)
        elif position < len(text) and text[position] == "]":
            if text[position + 1 :].strip():
                raise UserError(f"{path}:{line_at(position + 1)}: unexpected text after the JSON array")
            return
        else:
            raise UserError(f"{path}:{line_at(position)}: malformed JSON array (expected ',' or ']')")


def read_records(path: str | os.PathLike, dataset_format: str = "auto", report: IgnoredFields | None = None,
                 ) -> list[dict]:
    """Read and validate every row of an instruction file; the first bad row raises UserError. Each field that no
    record keeps is named once, with its row count (and counted in `report` for the manifest). A manifest beside
    the file (a mix's) that describes another file is reported in one line."""
    check_format(dataset_format)
    report = IgnoredFields() if report is None else report
    records = [validate_record(row, f"{path}:{line}", True, dataset_format, report)
               for line, row in iter_json_rows(path)]
    if not records:
        raise UserError(f"{path}: holds no rows; {RECORD_HELP}")
    for line in report.lines(path):
        print(line)
    warn_if_manifest_differs(path)
    return records
