"""The dataset as training and evaluation both see it: the seeded train/eval split, and the records tokenized for
teacher forcing and fitted to MAX_SEQ_LENGTH. Evaluation imports these so that it scores exactly the rows that
training held out, tokenized exactly as training tokenized them."""

from __future__ import annotations

from typing import NamedTuple

from .cli import UserError
from .template import is_conversation, is_text, tokenize_example

# What fitting records to MAX_SEQ_LENGTH did: single-turn prompts cut from the left, rows dropped (answer alone too
# long), conversations shortened, the oldest exchanges they lost, conversations dropped (last exchange too long),
# text rows cut to their first MAX_SEQ_LENGTH tokens.
FIT_COUNTS = ("prompt_truncated", "dropped_answer_too_long", "conversations_shortened", "exchanges_dropped",
              "dropped_last_exchange_too_long", "text_truncated")


def split_records(records: list[dict], eval_ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """The seeded train/eval split that training and evaluation share (datasets' train_test_split)."""
    if not 0 <= eval_ratio < 1:
        raise UserError(f"--eval_ratio must be in [0, 1), got {eval_ratio}")
    if eval_ratio == 0 or len(records) < 2:
        return records, []
    from datasets import Dataset

    indices = Dataset.from_dict({"index": list(range(len(records)))})
    split = indices.train_test_split(test_size=max(1, round(len(records) * eval_ratio)), seed=seed)
    return [records[i] for i in split["train"]["index"]], [records[i] for i in split["test"]["index"]]


class TokenizedRecords(NamedTuple):
    rows: list[dict]  # input_ids + completion_mask, one per record that fits
    stats: dict  # FIT_COUNTS: what fitting the records to max_seq_length did
    record_indices: list[int]  # the position in `records` of each row


def tokenize_records(tokenizer, records: list[dict], system_prompt: str, max_seq_length: int) -> TokenizedRecords:
    """Tokenize once: a row of input_ids + completion_mask per record that fits `max_seq_length` (a prompt cut
    from the left, a conversation less its oldest exchanges), and counts of what fitting did (FIT_COUNTS)."""
    rows, record_indices = [], []
    stats = dict.fromkeys(FIT_COUNTS, 0)
    for index, record in enumerate(records):
        example, cut = tokenize_example(tokenizer, record, system_prompt, max_seq_length)
        conversation = is_conversation(record)
        if example is None:
            stats["dropped_last_exchange_too_long" if conversation else "dropped_answer_too_long"] += 1
            continue
        cut_kind = "conversations_shortened" if conversation else "text_truncated" if is_text(record) else (
            "prompt_truncated")
        stats[cut_kind] += bool(cut)
        stats["exchanges_dropped"] += cut if conversation else 0
        rows.append(example)
        record_indices.append(index)
    return TokenizedRecords(rows, stats, record_indices)
