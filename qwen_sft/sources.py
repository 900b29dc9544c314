"""Where mixing rows come from: local files or streamed hub datasets, and the adapters that turn each hub
schema into instruction/input/output (or, for a multi-turn conversation, into "messages").

A source is a hub dataset (streamed with `datasets`, never downloaded whole) or local data in that dataset's own
schema. Both are drawn through the same seeded shuffle buffer (the algorithm of `IterableDataset.shuffle`, replicated
in `shuffle_buffered`), so memory stays bounded by the buffer, whatever the source's size.

A hub source names a repo, and optionally a config, a revision and some of its folders or globs:

    owner/name[:config][@revision][/path[+path...]]

    qiaojin/PubMedQA:pqa_labeled                       the config declared in the README YAML
    HuggingFaceH4/stack-exchange-preferences@0b1c2d3/data/ai.stackexchange.com+data/biology.stackexchange.com
    Open-Orca/SlimOrca@main/oo-labeled_correct.gpt4.sharegpt.jsonl

A revision is a branch, tag or commit sha (without "/"); each path is a folder (all its data files) or a glob, and
"+" joins several (a comma would end the --sources item). A folder that does not exist is a warning, not a failure.
The commit a revision resolved to is recorded in the manifest; pinning it (`@<sha>`) reproduces the same rows.

A local source is a .json/.jsonl/.parquet file, a folder laid out like the hub repo (what `hf download --repo-type
dataset ... --local-dir DIR` writes; `DIR:config` picks a config of its README YAML), a glob, or several of these
joined by "+".

Schemas (the SOURCES key picks the adapter):
- orca: Open-Orca/SlimOrca, `conversations` = [{from: system|human|gpt, value}]; a chat of several human/gpt
  exchanges becomes a conversation row.
- pubmed: qiaojin/PubMedQA pqa_labeled, `question, context{contexts, labels, meshes}, long_answer, final_decision`.
- stackexchange: HuggingFaceH4/stack-exchange-preferences, `qid, question, answers[{answer_id, author, pm_score,
  selected, text}], date, metadata`; HTML becomes plain text and the answer is the best by pm_score, then selected.
"""

from __future__ import annotations

import contextlib
import glob
import html
import json
import os
import re
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .cli import UserError
from .deadline import deadline
from .parquet_rows import ParquetRows
from .records import BadJSON, IgnoredFields, iter_json_rows, parse_json, validate_record
from .row_reading import PARQUET_BATCH_ROWS, RANDOM_SLOTS_PER_DRAW, FileRow, parquet_columns, shuffle_buffered

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
# Names that are plainly files (so a typo gives "file not found", not a failed hub lookup).
FILE_SUFFIXES = LOCAL_SUFFIXES + (".csv", ".tsv", ".txt", ".gz", ".zip", ".arrow", ".xlsx")
HUB_SPEC = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<config>[\w.-]+))?(?:@(?P<revision>[\w.-]+))?(?:/(?P<paths>.+))?"
)
HUB_CONFIGS = {"qiaojin/PubMedQA": "pqa_labeled"}  # hub datasets that need a config name
GLOB_CHARS = re.compile(r"[*?[]")
HUB_BATCH_ROWS = 1000  # hub rows made Python objects at a time (at most SHUFFLE_BUFFER; a lost stream resumes there)


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


@dataclass(frozen=True)
class Cut:
    """What Schema.convert returns for a chat it kept only in part: what it kept, and why the rest went (the
    manifest counts each reason)."""

    kept: tuple | list
    reason: str


class Schema(ABC):
    """Turns one raw row into (instruction, input, raw_output), or a conversation into its list of messages
    ({"role", "content"}, raw answers), or into a record written as it is (a dict: a conversation with tools or
    tool calls, a text row); `finish_output`, where a schema's costly part lives, runs only for rows that can still
    be kept (on each answer of a conversation)."""

    name = ""
    columns: tuple[str, ...] | None = None  # the only columns convert() reads (a Parquet stream reads only these)
    # The only fields convert() reads of a column holding a list of structs (a local Parquet file reads only those).
    subfields: dict[str, tuple[str, ...]] = {}
    config: str | None = None  # the config a snapshot folder that declares several is read with, unless named

    @abstractmethod
    def convert(self, row) -> tuple[str, str, str] | list[dict] | dict:
        """Raise WrongSchema for a row of another shape, Rejected for a row with nothing usable."""

    def finish_output(self, raw_output: str) -> str:
        return raw_output

    def narrow_batch(self, batch):
        """An Arrow record batch of this schema's rows without what convert() would never use (as convert gives
        the same result for each row), vectorised, so that fewer Python objects are made; or the batch itself."""
        return batch


class ReportSchema(Schema):
    name = "instruction/input/output"

    def convert(self, row):
        record = validate_record(row, "report")  # the file was validated whole before mixing starts
        if "text" in record or "tools" in record or any(
                turn["role"] == "tool" or "tool_calls" in turn for turn in record.get("messages", ())):
            return {key: value for key, value in record.items() if key != "source"}  # written as it is
        if "messages" in record:
            return [{"role": turn["role"], "content": turn["content"].strip()} for turn in record["messages"]]
        return record["instruction"].strip(), record["input"].strip(), record["output"].strip()


class SlimOrcaSchema(Schema):
    """SlimOrca's sharegpt chats. A chat with tool calls or tools (LLaMA-Factory's function_call and observation
    turns) is read whole by formats.py's sharegpt reader and written as it is; any other chat keeps its system text
    in the first question, and a chat that breaks off after its first exchange is kept up to there, as Cut."""

    name = "SlimOrca"

    def convert(self, row):
        turns = row.get("conversations") if isinstance(row, dict) else None
        if not isinstance(turns, list):
            raise WrongSchema('"conversations" must be a list of {"from", "value"} turns')
        if row.get("tools") or any(isinstance(turn, dict) and turn.get("from") in TOOL_TURNS for turn in turns):
            return _tool_chat(row)
        system, exchanges, cut = None, [], None
        for turn in turns:
            well_formed = isinstance(turn, dict) and isinstance(turn.get("value"), str)
            role = turn.get("from") if well_formed else None
            if exchanges and exchanges[0][1] is not None and role not in ("system", "human", "gpt"):
                cut = "broken_turn"
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
                cut = "stops_alternating"
                break  # the chat stops alternating: it keeps its exchanges so far
        unanswered = bool(exchanges) and exchanges[-1][1] is None and len(exchanges) > 1
        exchanges = [(human.strip(), answer.strip()) for human, answer in exchanges if answer is not None]
        if not exchanges:
            raise WrongSchema('"conversations" needs a "human" turn followed by a "gpt" turn')
        # A later exchange with an empty side ends the chat (the first one is judged as a single-turn row is).
        empty = next((index for index, pair in enumerate(exchanges) if index and not all(pair)), len(exchanges))
        if empty < len(exchanges):
            cut = cut or "empty_turn"
            del exchanges[empty:]
        cut = cut or ("unanswered_question" if unanswered else None)
        # The system turn often carries the task ("explain like I'm five"); the answer only fits with it.
        system = (system or "").strip()
        first = exchanges[0][0]
        exchanges[0] = ((f"{system}\n\n{first}" if system and first else first), exchanges[0][1])
        if len(exchanges) == 1:
            kept = (exchanges[0][0], "", exchanges[0][1])
        else:
            kept = [
                {"role": role, "content": content}
                for human, answer in exchanges
                for role, content in (("user", human), ("assistant", answer))
            ]
        return Cut(kept, cut) if cut else kept


TOOL_TURNS = ("function_call", "observation")


def _tool_chat(row: dict) -> dict:
    """A sharegpt chat with tool calls or tools, as formats.py reads it ({"messages", "tools"}), stripped of the
    answers' surrounding whitespace as the other chats are."""
    try:
        record = validate_record(row, "row", dataset_format="sharegpt", ignored=IgnoredFields())
    except UserError as error:
        raise WrongSchema(str(error).removeprefix("row: ")) from None
    return {key: value for key, value in record.items() if key != "source"}


class PubMedQASchema(Schema):
    name = "PubMedQA pqa_labeled"
    columns = ("question", "context", "long_answer", "final_decision")
    config = "pqa_labeled"
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
    columns = ("question", "answers")
    subfields = {"answers": ("pm_score", "selected", "text")}  # not the authors, their profiles and ids

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

    def narrow_batch(self, batch):
        """Each row's answers cut to the one convert() picks: the first non-blank one with the highest (pm_score,
        selected), or none. Answers are most of a row's bytes. A batch in which convert() could meet a bad answer
        (see _reducible_answers) is left whole, for convert() to judge."""
        answers = _reducible_answers(batch)
        if answers is None:
            return batch
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        answers, flat = answers
        parents = pc.list_parent_indices(answers).to_numpy()
        scores = pc.struct_field(flat, "pm_score").to_numpy()
        selected = _selected_flags(flat)
        blank = pc.match_substring_regex(pc.struct_field(flat, "text"), _BLANK_TEXT).to_numpy(zero_copy_only=False)
        candidates = np.flatnonzero(~blank)
        parents, scores, selected = parents[candidates], scores[candidates], selected[candidates]
        # Ascending by row, score, selected, then position reversed: each row's last entry is the first best answer.
        order = np.lexsort((-candidates, selected, scores, parents))
        rows = parents[order]
        last = order[np.append(rows[1:] != rows[:-1], True)] if len(order) else order
        counts = np.bincount(parents[last], minlength=len(answers))
        offsets = pa.array(np.concatenate(([0], np.cumsum(counts))), type=answers.offsets.type)
        narrowed = type(answers).from_arrays(offsets, flat.take(pa.array(candidates[last])), type=answers.type)
        return batch.set_column(batch.schema.get_field_index("answers"), batch.schema.field("answers"), narrowed)


# What str.isspace() calls whitespace (a test checks every code point); a text of only these, or none, is blank.
_BLANK_TEXT = r"^[\t-\r\x1c- \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]*$"


def _reducible_answers(batch):
    """The batch's "answers" column and its flattened answers if convert() would accept every answer in it (a list
    of structs with a numeric pm_score, a string text and a bool or string selected, if any; no nulls but in
    selected), and no score is NaN (convert() accepts one, but ranks it as no sort does), else None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "answers" not in batch.schema.names:
        return None
    answers = batch.column("answers")
    kind = answers.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_struct(kind.value_type):
        return None
    fields = {field.name: field.type for field in kind.value_type}
    score, text, selected = fields.get("pm_score"), fields.get("text"), fields.get("selected", pa.bool_())
    if score is None or not (pa.types.is_integer(score) or pa.types.is_floating(score)):
        return None
    if text is None or not (pa.types.is_string(text) or pa.types.is_large_string(text)):
        return None
    if not (pa.types.is_boolean(selected) or pa.types.is_string(selected) or pa.types.is_large_string(selected)):
        return None
    flat = answers.flatten()
    if answers.null_count or flat.null_count:
        return None
    scores, texts = pc.struct_field(flat, "pm_score"), pc.struct_field(flat, "text")
    if scores.null_count or texts.null_count:
        return None
    if pa.types.is_floating(score) and pc.any(pc.is_nan(scores)).as_py():
        return None
    return answers, flat


def _selected_flags(flat):
    """Each answer's `selected in _SELECTED`, as a numpy bool array (a null is not selected)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if "selected" not in [field.name for field in flat.type]:
        return np.zeros(len(flat), dtype=bool)
    selected = pc.struct_field(flat, "selected")
    if not pa.types.is_boolean(selected.type):
        selected = pc.is_in(selected, pa.array(["true", "True"]))
    return pc.fill_null(selected, False).to_numpy(zero_copy_only=False)


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
        """A hub spec (owner/name...) rather than local data: a path that exists, or that ends like a data file."""
        first = self.spec.split("+")[0]
        match = HUB_SPEC.fullmatch(self.spec)
        local = (
            Path(first).exists() or Path(first.rpartition(":")[0] or first).is_dir()
            or first.startswith(("/", ".", "~")) or bool(glob.glob(first))
            or (match is not None and match["repo"].lower().endswith(FILE_SUFFIXES))
        )
        return not local and match is not None

    @cached_property
    def files(self) -> list[Path]:
        """The local data files this source names, in reading order (a UserError if there are none)."""
        return local_files(self)

    @cached_property
    def path(self) -> str | None:
        """The one local file this source reads, or None (a hub stream, or several files)."""
        return None if self.is_hub or len(self.files) != 1 else str(self.files[0])

    def where(self, number) -> str:
        """A user-facing pointer to a row: file:line for JSON, file row N for Parquet, the stream position for hub."""
        if isinstance(number, FileRow):
            return str(number)
        if self.is_hub:
            return f"{self.spec} (streamed row {number})"
        if self.path.lower().endswith(".parquet"):
            return f"{self.path} row {number}"
        return f"{self.path}:{number}"


def warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stdout)  # above a progress bar, not inside it


def _folder_files(source: Source, folder: Path, config: str | None) -> list[Path]:
    """The train files of a folder laid out like a hub repo, as `datasets` finds them: the config's `data_files` in
    the README YAML, else files named by split (train-00000-of-00001.parquet) or any data file."""
    import datasets
    from datasets.data_files import DataFilesDict, sanitize_patterns
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub.repocard import metadata_load

    datasets.logging.set_verbosity_error()
    readme = folder / "README.md"
    configs = MetadataConfigs.from_dataset_card_data(metadata_load(readme) or {}) if readme.is_file() else {}
    if config is None and len(configs) > 1:
        if source.schema.config not in configs:
            raise UserError(f"{source.key}: {folder} declares configs {', '.join(configs)}; pick one: {folder}:NAME")
        config = source.schema.config
    if config is not None and not configs:
        raise UserError(f"{source.key}: {folder}:{config} names a config, but {folder} declares none (no configs in a "
                        f"README.md); drop :{config}")
    try:
        if configs:  # only the chosen config's files are resolved: a snapshot may hold only those
            config = config or next(iter(configs))
            if config not in configs:
                raise ValueError(f"no config {config!r} in its README (it has {', '.join(configs)})")
            patterns = sanitize_patterns(configs[config].get("data_files", []))
            data_files = DataFilesDict.from_patterns(patterns, base_path=str(folder))
        else:
            data_files = datasets.load_dataset_builder(str(folder)).config.data_files or {}
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetsError) as error:
        raise UserError(f"{source.key}: {folder}: not a readable dataset folder ({_first_line(error)})") from None
    train = _without_our_outputs(source, [Path(name) for name in data_files.get("train") or []])
    if not train:
        problem = (f"the train files of config {config!r} are not there (download them)" if configs
                   else "no train split (file names like train-00000-of-00001.parquet)")
        raise UserError(f"{source.key}: {folder}: {problem}")
    return train


def _without_our_outputs(source: Source, files: list[Path]) -> list[Path]:
    """`files` less the mixes this toolkit wrote among them and their manifests (a mix written into a snapshot
    folder would otherwise be read back as the source's rows)."""
    ours = set()
    for path in files:
        if path.name.endswith(".manifest.json"):
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
                written = Path(manifest["output"]["path"]).name
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(manifest.get("stage"), str):
                ours |= {path, path.with_name(written)}
    if ours & set(files):
        names = ", ".join(sorted(path.name for path in ours & set(files)))
        warn(f"{source.key}: skipped {names} in {files[0].parent}: written by this toolkit, not source data")
    return [path for path in files if path not in ours]


def _local_part_files(source: Source, part: str) -> list[Path]:
    folder, colon, config = part.rpartition(":")
    if colon and not folder and not Path(part).exists():
        raise UserError(f"{source.key}: {part!r} names a config but no folder; give FOLDER:{config}")
    if colon and folder and Path(folder).is_dir():
        return _folder_files(source, Path(folder), config)
    path = Path(part).expanduser()
    if path.is_dir():
        return _folder_files(source, path, None)
    if path.is_file():
        return [path]
    return [Path(name) for name in sorted(glob.glob(str(path), recursive=True)) if Path(name).is_file()]


def local_files(source: Source) -> list[Path]:
    """Every file of a local source, checked; a part (of several) that names nothing is a warning."""
    parts = [part.strip() for part in source.spec.split("+") if part.strip()]
    files = []
    for part in parts:
        found = _local_part_files(source, part)
        if not found and len(parts) > 1:
            warn(f"{source.key}: {part}: no such file, folder or glob match; skipped")
        files += found
    if not files:
        raise UserError(
            f"{source.key}: {source.spec}: file not found (nor a hub spec: owner/name[:config][@revision][/path+...])"
        )
    for path in files:
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise UserError(f"{source.key}: {path}: unsupported file type (use .json, .jsonl or .parquet)")
    return files


def check_local_file(source: Source) -> None:
    """Fail early, with one line, on a local source that cannot be read."""
    source.files  # noqa: B018  (resolving the files checks them)


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


def _numbered_files_rows(paths: list[Path], schema: Schema | None = None):
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


def _prefer_jemalloc() -> None:
    """Arrow's jemalloc pool where pyarrow has one (unless ARROW_DEFAULT_MEMORY_POOL names a pool): a ParquetRows
    holds on to the Parquet batches whose rows are not all drawn yet, and with the default pool (mimalloc) reading
    and gathering them then costs half as much again, in fresh pages."""
    import pyarrow as pa

    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        with contextlib.suppress(NotImplementedError):
            pa.set_memory_pool(pa.jemalloc_memory_pool())


# ---------------------------------------------------------------------------------------------------- hub streams


@dataclass(frozen=True)
class HubSettings:
    timeout_s: float = 30.0  # a hub request with no answer in this time fails
    retry_s: float = 120.0  # how long a stream that lost its connection is retried before the run stops


class StreamLost(Exception):
    """A hub stream stayed unreachable for HubSettings.retry_s; the stream's state is kept for a later run."""


def _single_attempt_reads() -> None:
    """Make huggingface_hub's file reads try once: its own backoff (about 23 s per read, logged as warnings) would
    hide inside every attempt of HubRows, which retries the stream visibly within NETWORK_RETRY_SECONDS."""
    import functools

    from huggingface_hub import hf_file_system
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # also "Repo card metadata block was not found" for repos without YAML
    for name in ("http_backoff", "http_stream_backoff"):
        backoff = getattr(hf_file_system, name, None)
        if backoff is not None and not isinstance(backoff, functools.partial):
            setattr(hf_file_system, name, functools.partial(backoff, max_retries=0))


def _is_network_error(error: BaseException) -> bool:
    """A lost or refused connection, a timeout, or a hub answer that says "try later" (429, 5xx)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else 0
        return status == 429 or status >= 500
    return isinstance(error, _network_errors())


def _network_errors() -> tuple:
    import httpx
    import requests
    from datasets.utils.file_utils import CONNECTION_ERRORS_TO_RETRY

    return (ConnectionError, TimeoutError, httpx.TransportError, requests.exceptions.RequestException,
            *CONNECTION_ERRORS_TO_RETRY)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _local_hint(source: Source) -> str:
    return (
        f"--sources {source.key}=/path/to/{source.key}.jsonl (or .json/.parquet files, a glob, or a folder that "
        f"`hf download` wrote, in the {source.schema.name} schema)"
    )


def _unreachable(source: Source, endpoint: str, error: BaseException) -> UserError:
    return UserError(
        f"{source.key}: the hub at {endpoint} did not answer for {source.spec!r} ({_first_line(error)}); "
        f"set HF_ENDPOINT to a reachable mirror (e.g. HF_ENDPOINT=https://hf-mirror.com), or download the data "
        f"where the hub is reachable and point the source at the local files, e.g. {_local_hint(source)}"
    )


def _hub_files(source: Source, repo: str, sha: str, paths: str) -> tuple[list[str], list[str]]:
    """The repo files that the "+"-joined folders and globs name at commit `sha`, and the names that match nothing."""
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem()
    base = f"datasets/{repo}@{sha}"
    files, missing = [], []
    for path in (part.strip().strip("/") for part in paths.split("+") if part.strip()):
        if GLOB_CHARS.search(path):
            found = sorted(fs.glob(f"{base}/{path}"))
        elif fs.isfile(f"{base}/{path}"):
            found = [f"{base}/{path}"]
        elif fs.isdir(f"{base}/{path}"):
            found = sorted(name for name in fs.find(f"{base}/{path}") if name.lower().endswith(LOCAL_SUFFIXES))
        else:
            found = []
        if not found:
            missing.append(path)
        files += [name[len(base) + 1 :] for name in found if name.lower().endswith(LOCAL_SUFFIXES)]
    return files, missing


def resolve_hub(source: Source, settings: HubSettings) -> dict:
    """Resolve a hub spec: its commit sha (one request bounded by the timeout, so a hanging route fails fast) and,
    for named folders or globs, the files they hold. A folder that does not exist is a warning."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    match = HUB_SPEC.fullmatch(source.spec)
    repo, revision, paths = match["repo"], match["revision"], match["paths"]
    api = HfApi()
    try:
        with deadline(settings.timeout_s):
            sha = api.dataset_info(repo, revision=revision, timeout=settings.timeout_s).sha
        if not isinstance(sha, str) or not sha:
            raise ValueError("no commit sha in the repo's info")
        with deadline(settings.timeout_s):
            files, missing = _hub_files(source, repo, sha, paths) if paths else (None, [])
    except OfflineModeIsEnabled:
        raise UserError(
            f"{source.key}: cannot stream the hub dataset {source.spec!r} while HF_HUB_OFFLINE=1; unset it, or point "
            f"the source at local files, e.g. {_local_hint(source)}"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{source.key}: the hub dataset {repo!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{source.key}: no hub dataset {repo!r} at {api.endpoint} (nor a local path {source.spec!r})"
        ) from None
    except (*_network_errors(), HfHubHTTPError) as error:  # after the not-found errors, which are HfHubHTTPErrors
        raise _unreachable(source, api.endpoint, error) from None
    except (ValueError, KeyError, TypeError) as error:  # an answer that is not the hub API's
        raise UserError(
            f"{source.key}: the hub at {api.endpoint} answered for {source.spec!r} with something that is not the "
            f"hub API ({type(error).__name__}: {_first_line(error)}); check HF_ENDPOINT, or point the source at local "
            f"files, e.g. {_local_hint(source)}"
        ) from None
    for path in missing:
        warn(f"{source.key}: {repo}@{sha[:8]} has no {path}; skipped (list its folders: see the README)")
    if files == []:
        raise UserError(f"{source.key}: none of the paths in {source.spec!r} exist in {repo}@{sha[:8]}")
    return {
        "endpoint": api.endpoint, "repo_id": repo, "config": match["config"] or HUB_CONFIGS.get(repo),
        "revision": revision or "main", "commit_sha": sha, "data_files": files, "missing_paths": missing,
        "columns": list(source.schema.columns) if source.schema.columns else None,
    }


def _hub_stream(source: Source, hub: dict, settings: HubSettings):
    """The source's rows as a `datasets` stream at the resolved commit, reading only the schema's columns."""
    import datasets

    datasets.logging.set_verbosity_error()
    if "torch" not in sys.modules:  # a stream made only for mixing never meets torch, whose import costs ~2.5 CPU s
        datasets.config.TORCH_AVAILABLE = False
    # One attempt per read inside datasets (whose own retries are silent): HubRows retries, visibly and bounded.
    datasets.config.STREAMING_READ_MAX_RETRIES = 1
    datasets.config.STREAMING_READ_RETRY_INTERVAL = 0
    try:
        with deadline(settings.timeout_s):
            builder = datasets.load_dataset_builder(
                hub["repo_id"], hub["config"], revision=hub["commit_sha"], data_files=hub["data_files"]
            )
        if hub["columns"] and hasattr(builder.config, "columns"):  # Parquet reads only those columns' pages
            builder.config.columns = hub["columns"]
        else:
            hub["columns"] = None
        with deadline(settings.timeout_s):
            return builder.as_streaming_dataset(split="train")
    except _network_errors() as error:
        raise _unreachable(source, hub["endpoint"], error) from None
    except Exception as error:  # unknown config, no data files, gated: all end the same way for the user
        raise UserError(
            f"{source.key}: cannot stream the hub dataset {source.spec!r} ({_first_line(error)}); download it "
            f"where the hub is reachable and point the source at the files, e.g. {_local_hint(source)}"
        ) from None


class HubRows:
    """(number, row, None) for each row of a hub stream through the seeded shuffle buffer, in the order
    `shuffle_buffered` gives: the same algorithm, but its state (stream position, buffer, random draws) is kept
    between batches, so a lost connection is retried from where it stopped, and a later run can continue it.
    """

    def __init__(self, source: Source, stream, hub: dict, seed: int, buffer_size: int, settings: HubSettings,
                 state: dict | None = None):
        import numpy as np

        self.source, self.hub, self.buffer_size, self.settings = source, hub, buffer_size, settings
        self.stream = stream.with_format("arrow")
        self.state = state or {
            "stream": None, "buffer": [], "rng": np.random.default_rng(seed).bit_generator.state, "slots": [],
            "number": 0, "hub": hub,
        }

    def __iter__(self):
        import numpy as np

        state = self.state
        buffer, slots, size = state["buffer"], state["slots"], self.buffer_size
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        try:
            for rows in self._batches():
                for row in rows:
                    if len(buffer) < size:
                        buffer.append(row)
                        continue
                    if not slots:  # drawn as datasets draws them, kept reversed so pop() takes the next one
                        slots.extend(reversed(rng.integers(0, size, size=RANDOM_SLOTS_PER_DRAW).tolist()))
                    slot = slots.pop()
                    drawn, buffer[slot] = buffer[slot], row
                    state["number"] += 1
                    yield state["number"], drawn, None
        finally:
            state["rng"] = rng.bit_generator.state
        rng.shuffle(buffer)
        for row in buffer:
            state["number"] += 1
            yield state["number"], row, None

    def _load_position(self) -> None:
        try:
            self.stream.load_state_dict(self.state["stream"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise UserError(
                f"{self.source.key}: the saved stream position does not fit this stream ({_first_line(error)}); "
                "delete the output's .work folder to start over"
            ) from None

    def _batches(self):
        """The stream's rows a batch at a time from the saved position; a lost connection is retried from the last
        whole batch until HubSettings.retry_s have passed without data, then StreamLost."""
        give_up, attempt = None, 0
        while True:
            if self.state["stream"] is not None:
                self._load_position()
            try:
                tables = iter(self.stream.iter(batch_size=min(HUB_BATCH_ROWS, self.buffer_size)))
                while True:
                    with deadline(self.settings.timeout_s):  # a batch's reads, however slowly bytes trickle in
                        table = next(tables, None)
                    if table is None:
                        return
                    give_up, attempt = None, 0
                    narrow = self.source.schema.narrow_batch
                    yield [row for batch in table.to_batches() for row in narrow(batch).to_pylist()]
                    self.state["stream"] = self.stream.state_dict()
            except Exception as error:
                if not _is_network_error(error):
                    raise
                now = time.monotonic()
                give_up = give_up or now + self.settings.retry_s
                if now >= give_up:
                    raise StreamLost(_first_line(error)) from None
                attempt += 1
                wait = min(2.0**attempt, 30.0, give_up - now)
                warn(
                    f"{self.source.key}: connection to {self.hub['endpoint']} lost ({_first_line(error)}); "
                    f"retry {attempt} in {wait:.0f} s ({give_up - now:.0f} s left before the run stops)"
                )
                time.sleep(wait)


def open_rows(source: Source, seed: int, buffer_size: int, settings: HubSettings | None = None,
              state: dict | None = None):
    """The source's rows through a seeded shuffle buffer, as (row number, parsed row or None, (offset, length) of a
    JSONL line or None); the number is the file's line or row for local files (a FileRow for several files) and the
    position in the stream for hub specs. A source made only of local Parquet files is a ParquetRows instead: the
    same rows in the same order, their answers narrowed by the schema, drawn a chunk at a time. Nothing is read
    yet.

    A local source must have passed check_local_file; a hub spec is resolved here (a HubRows, whose `hub` says
    what was resolved), so an unreachable one fails before any row is mixed. `state` continues a HubRows.
    """
    if not source.is_hub:
        if all(path.suffix.lower() == ".parquet" for path in source.files):
            _prefer_jemalloc()
            return ParquetRows(source.files, source.schema, seed, buffer_size, single_file=bool(source.path))
        if source.path:
            rows = numbered_local_rows(source.path, source.schema)
        else:
            rows = _numbered_files_rows(source.files, source.schema)
        return shuffle_buffered(rows, seed, buffer_size)
    from huggingface_hub import constants

    settings = settings or HubSettings()
    # Every request (file reads mid-stream included) gets the same bound, so a route that hangs fails fast.
    constants.HF_HUB_ETAG_TIMEOUT = constants.HF_HUB_DOWNLOAD_TIMEOUT = settings.timeout_s
    _single_attempt_reads()
    hub = state["hub"] if state else resolve_hub(source, settings)  # a continued stream stays at its commit
    return HubRows(source, _hub_stream(source, hub, settings), hub, seed, buffer_size, settings, state)
