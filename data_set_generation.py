"""Option B: a large mix (240,000 rows by default) of your reports, SlimOrca, PubMedQA and StackExchange questions
split into AI, IC (integrated circuits) and biomedical domains by keyword, into mixed_finetune_dataset.jsonl.

A StackExchange question belongs to a domain when it contains one of the domain's KEYWORDS as a whole word or
phrase, in any case ("AI" does not match "said", "IC" does not match "basic"); a question that matches several
domains goes to the one with the most hits that still needs rows. `bio` takes PubMedQA first, then biomedical
StackExchange questions. Sources are streamed through a seeded shuffle buffer, so memory stays bounded however
large they are, and the manifest next to the output accounts for every row read and every keyword hit.

  python data_set_generation.py                    # hub sources (the Hugging Face Hub, or HF_ENDPOINT's mirror)
  python data_set_generation.py --sources orca=/data/slimorca,pubmed=/data/pubmedqa,stackexchange=/data/se  # snapshots
  # offline, from the bundled samples:
  python data_set_generation.py --total_samples 300 \\
      --sources orca=samples/slimorca.jsonl,pubmed=samples/pubmedqa_pqa_labeled.jsonl,stackexchange=samples/stack_exchange_preferences.jsonl
  python data_set_generation.py --keywords '{"ai": ["LLM", "neural network"], "ic": ["FPGA"], "bio": ["genome"]}'
"""

from qwen_sft import defaults
from qwen_sft.cli import parse_config, run_stage
from qwen_sft.template import DEFAULT_SYSTEM_PROMPT

MY_REPORT_DATA_PATH = defaults.MY_REPORT_DATA_PATH  # your rows: JSON array or JSONL, alpaca or "messages"
SOURCES = {
    "orca": "Open-Orca/SlimOrca",
    "pubmed": "qiaojin/PubMedQA:pqa_labeled",
    "stackexchange": "HuggingFaceH4/stack-exchange-preferences/data/ai.stackexchange.com"
    "+data/electronics.stackexchange.com+data/biology.stackexchange.com+data/datascience.stackexchange.com"
    "+data/bioinformatics.stackexchange.com+data/stats.stackexchange.com+data/medicalsciences.stackexchange.com"
    "+data/cs.stackexchange.com+data/chemistry.stackexchange.com",
}  # hub spec owner/name[:config][@revision][/folder+glob...] or local files/folder (README: "Sources")
TOTAL_SAMPLES = 240000  # rows in the mix (fewer only when a source falls short)
RATIOS = {"my_reports": 0.05, "orca": 0.45, "bio": 0.2, "ai": 0.15, "ic": 0.15}  # shares of TOTAL_SAMPLES; sum 1
KEYWORDS = {
    "ai": [
        "artificial intelligence", "AI", "machine learning", "deep learning", "neural network", "neural networks",
        "neural net", "LLM", "LLMs", "large language model", "large language models", "language model", "NLP",
        "natural language processing", "computer vision", "reinforcement learning", "supervised learning",
        "unsupervised learning", "self-attention", "attention mechanism", "CNN", "convolutional neural network",
        "RNN", "LSTM", "GAN", "generative adversarial network", "diffusion model", "backpropagation",
        "gradient descent", "overfitting", "hyperparameter", "hyperparameters", "PyTorch", "TensorFlow", "Keras",
        "scikit-learn", "word embeddings", "GPT", "BERT", "fine-tuning", "Q-learning", "object detection",
        "image classification", "speech recognition", "人工智能", "机器学习", "深度学习", "神经网络", "大模型",
    ],
    "ic": [
        "integrated circuit", "integrated circuits", "IC", "ICs", "ASIC", "ASICs", "FPGA", "FPGAs", "VLSI", "CMOS",
        "MOSFET", "MOSFETs", "transistor", "transistors", "Verilog", "SystemVerilog", "VHDL", "RTL design",
        "netlist", "standard cell", "place and route", "static timing analysis", "timing closure", "setup time",
        "hold time", "clock domain crossing", "flip-flop", "flip-flops", "tape-out", "tapeout", "wafer",
        "lithography", "photolithography", "semiconductor", "semiconductors", "EDA tool", "EDA tools",
        "system on chip", "system-on-chip", "SoC", "op-amp", "op amp", "DRC", "LVS", "集成电路", "芯片", "半导体",
    ],
    "bio": [
        "biomedical", "biomedicine", "bioinformatics", "biology", "genome", "genomics", "gene", "genes",
        "gene expression", "DNA", "RNA", "mRNA", "protein", "proteins", "CRISPR", "PCR", "clinical trial",
        "clinical trials", "patients", "disease", "diseases", "cancer", "tumor", "tumour", "antibody", "antibodies",
        "vaccine", "vaccines", "bacteria", "enzyme", "enzymes", "metabolism", "medical imaging", "MRI", "ECG", "EKG",
        "EEG", "biosensor", "biosensors", "pharmacology", "immune system", "immunology", "epidemiology",
        "neuroscience", "physiology", "stem cell", "stem cells", "biomarker", "biomarkers", "生物医学", "基因",
        "蛋白质", "临床",
    ],
}  # terms per domain, matched in StackExchange questions as whole words or phrases, any case (JSON on the command line)
DOMAIN_SOURCES = {
    "ai": ["stackexchange"],
    "ic": ["stackexchange"],
    "bio": ["pubmed", "stackexchange"],
}  # SOURCES that fill each domain (read in SOURCES order); StackExchange rows are split by KEYWORDS
OUTPUT_FILE = defaults.MIX_FILE  # the mix; its manifest is written next to it
OVERWRITE_OUTPUT = False  # replace an OUTPUT_FILE this toolkit did not write (or that was changed since)
SEED = defaults.MIX_SEED  # shuffle-buffer and final-shuffle seed: same seed and inputs give a byte-identical file
MAX_SEQ_LENGTH = defaults.MAX_SEQ_LENGTH  # training sequence length; rows estimated to exceed it are dropped
SYSTEM_PROMPT = DEFAULT_SYSTEM_PROMPT  # the system message training will use (rows are measured with it)
MIN_OUTPUT_CHARS = defaults.MIN_OUTPUT_CHARS  # drop rows whose answer is shorter than this many characters
SHUFFLE_BUFFER = defaults.SHUFFLE_BUFFER  # rows each source's seeded shuffle buffer holds (bounds memory)
SHORTFALL_IS_ERROR = False  # exit 2 when a bucket's sources cannot supply its share, instead of reporting it
FATAL_BAD_ROWS = False  # exit 2 at the first row in the wrong schema, instead of skipping it
BAD_ROW_REPORT_LIMIT = defaults.BAD_ROW_REPORT_LIMIT  # wrong-schema rows printed per source; the rest only counted
MAX_ROWS_READ = defaults.MAX_ROWS_READ  # rows read per source at most (its buckets may then fall short); 0 = no bound
HUB_TIMEOUT_SECONDS = defaults.HUB_TIMEOUT_SECONDS  # a hub request with no answer in this time fails (a route that hangs: use HF_ENDPOINT)
NETWORK_RETRY_SECONDS = defaults.NETWORK_RETRY_SECONDS  # a lost hub stream is retried this long, then the run stops and keeps its work


def main():
    cfg = parse_config(globals())
    from qwen_sft.mix.plan import OPTION_B_REPORT_KEY
    from qwen_sft.mix.stage import mix

    mix(cfg, report_key=OPTION_B_REPORT_KEY)


if __name__ == "__main__":
    run_stage(main)
