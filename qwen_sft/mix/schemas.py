"""Step 3 of the mix: the adapters that turn one raw row of each source into instruction/input/output, a
conversation ("messages") or a record written as it is. The SOURCES key picks the adapter:
- orca: Open-Orca/SlimOrca, `conversations` = [{from: system|human|gpt, value}]; a chat of several human/gpt
  exchanges becomes a conversation row.
- pubmed: qiaojin/PubMedQA pqa_labeled, `question, context{contexts, labels, meshes}, long_answer, final_decision`.
- stackexchange: HuggingFaceH4/stack-exchange-preferences, `qid, question, answers[{answer_id, author, pm_score,
  selected, text}], date, metadata`; HTML becomes plain text and the answer is the best by pm_score, then selected.
"""

from __future__ import annotations

import html
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..cli import UserError
from ..records import IgnoredFields, validate_record


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
