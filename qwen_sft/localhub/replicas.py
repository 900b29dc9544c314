"""Replicas of the three hub datasets with their real repo layouts, filled with synthetic rows (synthetic.py),
for the local hub server (server.py) and the hub benchmark:

- Open-Orca/SlimOrca: one `oo-labeled_correct.gpt4.sharegpt.jsonl`, no configs.
- qiaojin/PubMedQA: parquet per config, declared in the README YAML (`data_files: pqa_X/train-*`).
- HuggingFaceH4/stack-exchange-preferences: `data/<site>/train-NNNNN-of-MMMMM.parquet`, no configs,
  `stack_exchanges.json` at the root; `Stackoverflow.com` (capital S) is the large off-topic site.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .synthetic import pubmedqa_row, slimorca_row, stackexchange_row

ORCA_FILE = "oo-labeled_correct.gpt4.sharegpt.jsonl"
PUBMED_README = """---
configs:
- config_name: pqa_artificial
  data_files:
  - split: train
    path: pqa_artificial/train-*
- config_name: pqa_labeled
  data_files:
  - split: train
    path: pqa_labeled/train-*
- config_name: pqa_unlabeled
  data_files:
  - split: train
    path: pqa_unlabeled/train-*
---
# PubMedQA (replica)
"""
# site folder -> the synthetic domain mix of its questions
SITES = {
    "ai.stackexchange.com": {"ai": 0.9, "general": 0.1},
    "datascience.stackexchange.com": {"ai": 0.7, "general": 0.3},
    "electronics.stackexchange.com": {"ic": 0.8, "general": 0.2},
    "biology.stackexchange.com": {"bio": 0.8, "general": 0.2},
    "bioinformatics.stackexchange.com": {"bio": 0.9, "general": 0.1},
    "stats.stackexchange.com": {"ai": 0.5, "general": 0.5},
    "cs.stackexchange.com": {"ai": 0.3, "ic": 0.1, "general": 0.6},
    "chemistry.stackexchange.com": {"bio": 0.3, "general": 0.7},
    "medicalsciences.stackexchange.com": {"bio": 0.8, "general": 0.2},
    "askubuntu.com": {"general": 1.0},
    "Stackoverflow.com": {"general": 0.85, "ai": 0.1, "ic": 0.05},
}


def _write_parquet(path: Path, rows: list[dict], row_group_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def _stackexchange_rows(rng: random.Random, site: str, count: int, first_qid: int, distinct: int | None = None):
    """`count` rows of a site; with `distinct`, only that many are generated and the rest reuse them with the
    question id in the text (still unique rows, written much faster)."""
    rows = []
    for qid in range(first_qid, first_qid + min(count, distinct or count)):
        row = stackexchange_row(rng, qid, SITES[site])
        for answer in row["answers"]:
            answer["author_id"] = str(rng.randint(1, 10**6))
            answer["author_profile"] = f"https://{site}/users/{answer['author_id']}"
        rows.append(row)
    for qid in range(first_qid + len(rows), first_qid + count):
        row = dict(rows[qid % len(rows)], qid=qid)
        row["question"] = f"{row['question']}\n<p>(question {qid})</p>"
        rows.append(row)
    return rows


def write_slimorca(folder: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text("# SlimOrca (replica)\n", encoding="utf-8")
    with open(folder / ORCA_FILE, "w", encoding="utf-8") as handle:
        for _ in range(rows):
            handle.write(json.dumps(slimorca_row(rng), ensure_ascii=False) + "\n")
    return folder


def write_pubmedqa(folder: Path, labeled_rows: int = 1000, artificial_rows: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(PUBMED_README, encoding="utf-8")
    sizes = {"pqa_labeled": labeled_rows, "pqa_artificial": artificial_rows, "pqa_unlabeled": 50}
    for index, (config, count) in enumerate(sizes.items()):
        first = 10_000_000 * (index + 1)
        rows = [pubmedqa_row(rng, first + i) for i in range(count)]
        _write_parquet(folder / config / "train-00000-of-00001.parquet", rows, 500)
    return folder


def write_stackexchange(folder: Path, rows_per_site: dict[str, int], files_per_site: int | dict[str, int] = 2,
                        row_group_size: int = 100, seed: int = 0, distinct: int | None = None) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text("# stack-exchange-preferences (replica)\n", encoding="utf-8")
    (folder / "stack_exchanges.json").write_text(json.dumps(sorted(rows_per_site)), encoding="utf-8")
    qid = 1
    for site, count in rows_per_site.items():
        rows = _stackexchange_rows(rng, site, count, qid, distinct)
        qid += count
        files = files_per_site if isinstance(files_per_site, int) else files_per_site[site]
        per_file = -(-count // files)
        for index in range(files):
            name = f"train-{index:05d}-of-{files:05d}.parquet"
            _write_parquet(folder / "data" / site / name, rows[index * per_file : (index + 1) * per_file],
                           row_group_size)
    return folder
