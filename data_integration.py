"""Option A: mix your own reports with a small sample of SlimOrca and PubMedQA into mixed_finetune_dataset.jsonl.

Each SOURCES value is a hub dataset (streamed, never downloaded whole; owner/name[:config][@revision][/paths]) or
local files in that dataset's own schema (.json/.jsonl/.parquet files, a glob, or a snapshot folder). Rows are validated, length-filtered and de-duplicated, each source gives its exact share of
TOTAL_SAMPLES, and the manifest next to the output accounts for every row read.

  python data_integration.py                                         # hub sources (needs the Hugging Face Hub)
  python data_integration.py --sources orca=samples/slimorca.jsonl,pubmed=samples/pubmedqa_pqa_labeled.jsonl \\
      --total_samples 200                                            # offline, from the bundled samples
  python data_integration.py --ratios reports=0.2,orca=0.5,pubmed=0.3 --seed 7
"""

from qwen_sft import defaults
from qwen_sft.cli import parse_config, run_stage
from qwen_sft.template import DEFAULT_SYSTEM_PROMPT

MY_REPORT_DATA_PATH = defaults.MY_REPORT_DATA_PATH  # your rows: JSON array or JSONL, alpaca or "messages"
SOURCES = {
    "orca": "Open-Orca/SlimOrca",
    "pubmed": "qiaojin/PubMedQA:pqa_labeled",
}  # hub spec owner/name[:config][@revision][/folder+glob...] or local files/folder (README: "Sources")
TOTAL_SAMPLES = 2000  # rows in the mix (fewer only when a source falls short)
RATIOS = {"reports": 0.1, "orca": 0.6, "pubmed": 0.3}  # share of TOTAL_SAMPLES per source; must sum to 1
OUTPUT_FILE = defaults.MIX_FILE  # the mix; its manifest is written next to it
OVERWRITE_OUTPUT = False  # replace an OUTPUT_FILE this toolkit did not write (or that was changed since)
SEED = defaults.MIX_SEED  # shuffle-buffer and final-shuffle seed: same seed and inputs give a byte-identical file
MAX_SEQ_LENGTH = defaults.MAX_SEQ_LENGTH  # training sequence length; rows estimated to exceed it are dropped
SYSTEM_PROMPT = DEFAULT_SYSTEM_PROMPT  # the system message training will use (rows are measured with it)
MIN_OUTPUT_CHARS = defaults.MIN_OUTPUT_CHARS  # drop rows whose answer is shorter than this many characters
SHUFFLE_BUFFER = defaults.SHUFFLE_BUFFER  # rows each source's seeded shuffle buffer holds (bounds memory)
SHORTFALL_IS_ERROR = False  # exit 2 when a source cannot supply its share, instead of reporting it
FATAL_BAD_ROWS = False  # exit 2 at the first row in the wrong schema, instead of skipping it
BAD_ROW_REPORT_LIMIT = defaults.BAD_ROW_REPORT_LIMIT  # wrong-schema rows printed per source; the rest only counted
MAX_ROWS_READ = defaults.MAX_ROWS_READ  # rows read per source at most (its buckets may then fall short); 0 = no bound
HUB_TIMEOUT_SECONDS = defaults.HUB_TIMEOUT_SECONDS  # a hub request with no answer in this time fails (a route that hangs: use HF_ENDPOINT)
NETWORK_RETRY_SECONDS = defaults.NETWORK_RETRY_SECONDS  # a lost hub stream is retried this long, then the run stops and keeps its work


def main():
    cfg = parse_config(globals())
    from qwen_sft.mix.plan import OPTION_A_REPORT_KEY
    from qwen_sft.mix.stage import mix

    mix(cfg, report_key=OPTION_A_REPORT_KEY)


if __name__ == "__main__":
    run_stage(main)
