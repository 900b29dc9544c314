"""UTF-8 bytes per real Qwen2.5 token on the bundled sources, and the template's tokens around a row: the numbers
behind the data stage's length estimate (qwen_sft/families/qwen2_5.py: BYTES_PER_TOKEN, TEMPLATE_TOKENS), which
drops rows by bytes before any tokenizer is loaded.

  HF_HUB_OFFLINE=1 python bench/bytes_per_token.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    from transformers import AutoTokenizer

    from qwen_sft.records import read_records
    from qwen_sft.template import DEFAULT_SYSTEM_PROMPT, build_messages
    from qwen_sft.tiny import tiny_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_path())
    samples = ROOT / "samples"
    with tempfile.TemporaryDirectory() as folder:
        mix = Path(folder) / "mix.jsonl"
        subprocess.run(
            [sys.executable, str(ROOT / "data_set_generation.py"), "--total_samples", "400", "--output_file", str(mix),
             "--my_report_data_path", str(ROOT / "my_dataset.json"), "--sources",
             f"orca={samples / 'slimorca.jsonl'},pubmed={samples / 'pubmedqa_pqa_labeled.jsonl'},"
             f"stackexchange={samples / 'stack_exchange_preferences.jsonl'}"],
            check=True, capture_output=True)
        rows = [row for row in read_records(mix) if "messages" not in row]

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    system_tokens = tokens(DEFAULT_SYSTEM_PROMPT)
    per_source, template = {}, []
    for row in rows:
        fields = (row["instruction"], row["input"], row["output"])
        content_tokens = sum(tokens(text) for text in fields)
        totals = per_source.setdefault(row["source"], [0, 0, 0])
        totals[0] += sum(len(text.encode()) for text in fields)
        totals[1] += content_tokens
        totals[2] += 1
        rendered = tokenizer.apply_chat_template(build_messages(row, with_answer=True), tokenize=False)
        template.append(tokens(rendered) - content_tokens - system_tokens)
    report = {
        "bytes_per_token": {key: round(size / count, 2) for key, (size, count, _) in per_source.items()},
        "rows": {key: rows_seen for key, (_, _, rows_seen) in per_source.items()},
        "template_tokens": [min(template), max(template)],
        "system_prompt": {"bytes": len(DEFAULT_SYSTEM_PROMPT.encode()), "tokens": system_tokens},
    }
    print(json.dumps(report, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
