"""What a local Parquet StackExchange source costs once drawn: the bytes of the chunks handed to the worker
processes (pickled, as the pool sends them) and the CPU time of preparing them all in one process, with the answers
narrowed as the mix does (StackExchangeSchema.narrow_batch) and without (every answer, as before).

Reads the default sites of the hub benchmark's replica (written by `bench/hub_benchmark.py --data_dir DIR`):

  python bench/parquet_chunks.py --data_dir /tmp/hubbench
"""

import pickle
import runpy
import time
from pathlib import Path

from qwen_sft.cli import parse_config, run_stage

repo_root = Path(__file__).resolve().parents[1]

DATA_DIR = "/tmp/hub_benchmark"  # the hub benchmark's replicas
SEED = 42  # the shuffle seed (data_set_generation.py's default)


class WholeAnswers:
    """The StackExchange schema without narrowing: the rows as they were handed over before it."""

    def __init__(self, schema):
        self.schema = schema

    def __getattr__(self, name):
        return getattr(self.schema, name)

    def narrow_batch(self, batch):
        return batch


def measure(files, schema, rules, defaults) -> dict:
    from qwen_sft.mix.parquet import ParquetRows
    from qwen_sft.mix.workers import ARROW_CHUNK_ROWS, pack_chunk, prepare_packed

    rows = ParquetRows(files, schema, SEED, defaults["SHUFFLE_BUFFER"], single_file=False)
    packed = [pack_chunk(chunk) for chunk in rows.chunks(ARROW_CHUNK_ROWS)]
    sent = sum(len(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)) for item in packed)
    started = time.process_time()
    prepared = sum(len(prepare_packed(rules, item)) for item in packed)
    return {"rows": prepared, "pickled_mb": round(sent / 1e6), "prepare_cpu_s": round(time.process_time() - started, 2)}


def main():
    cfg = parse_config(globals())
    from qwen_sft.mix.rows import RowRules, content_byte_budget, keyword_patterns
    from qwen_sft.mix.schemas import SCHEMAS

    defaults = runpy.run_path(str(repo_root / "data_set_generation.py"))
    sites = defaults["SOURCES"]["stackexchange"].split("/", 2)[2].split("+")
    files = [path for site in sites for path in sorted((Path(cfg.data_dir) / "stackexchange" / site).glob("*.parquet"))]
    keywords = {domain: defaults["KEYWORDS"][domain] for domain in ("ai", "ic", "bio")}
    budget = content_byte_budget(defaults["MAX_SEQ_LENGTH"], defaults["SYSTEM_PROMPT"])
    for name, schema in (("narrowed", SCHEMAS["stackexchange"]), ("whole", WholeAnswers(SCHEMAS["stackexchange"]))):
        rules = RowRules(schema, None, budget, defaults["MIN_OUTPUT_CHARS"], keyword_patterns(keywords), tuple(keywords))
        print(name, measure(files, schema, rules, defaults))


if __name__ == "__main__":
    run_stage(main)
