"""`tiny`: a small random-weight Qwen2 model with a byte-level BPE tokenizer, built offline in seconds.

It stands in for Qwen/Qwen2.5-7B-Instruct wherever a base model is named, so that the whole pipeline runs and is
tested on a CPU with no hub. The build is deterministic (fixed corpus, fixed seed) and cached on disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TINY_NAME = "tiny"
TINY_VERSION = "v1"  # bump when the build below changes, so stale caches are not reused
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 2048
# Qwen2's own pre-tokenization split: contractions, words, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEMPLATE_PATH = Path(__file__).with_name("qwen2_5_chat_template.jinja")

# The BPE merges are learned from this text (plus the system prompt and heading), so that typical prompts
# tokenize into a few hundred tokens rather than one token per byte.
CORPUS = """\
system user assistant You are Qwen, created by Alibaba Cloud. You are a helpful assistant.
Explain what LoRA fine-tuning is. LoRA (Low-Rank Adaptation) freezes the base weights and trains two small matrices.
Summarize the following report. The quarterly report shows revenue growth, lower defect rates and a new design.
The transistor count of the chip doubled; the wafer yield improved after the lithography step was tuned.
Integrated circuits, FPGA, ASIC, RTL, Verilog, timing closure, layout, tape-out, foundry, process node, 7nm, 5nm.
Machine learning, neural network, transformer, attention, gradient descent, training loss, evaluation, dataset.
Biomedical research: the clinical trial measured blood pressure, gene expression, protein binding and cell growth.
Patients who received the treatment showed a significant reduction in symptoms compared with the placebo group.
Does the study support the hypothesis? Yes. No. Maybe. The answer depends on the sample size and the p-value.
Question: What is the capital of France? Answer: Paris. Think step by step and give a short, accurate answer.
请解释什么是LoRA微调。LoRA是一种参数高效的微调方法，它冻结原模型权重，只训练低秩矩阵。
总结以下报告的要点：本季度营收增长，良率提升，新一代芯片完成流片。
集成电路设计包括架构、逻辑设计、验证、物理设计与制造测试。晶圆、光刻、封装、良率、功耗、时序。
人工智能模型的训练需要数据集、损失函数、优化器与评估指标。大语言模型、注意力机制、微调、推理。
生物医学研究关注基因、蛋白质、细胞、临床试验与药物疗效。患者、治疗、症状、诊断、风险。
结论：该方法有效。依据如下：第一，实验结果显著；第二，误差较小；第三，可重复。
0 1 2 3 4 5 6 7 8 9 10 100 2024 2025 3.14 95% (a) [b] {c} <d> "e" 'f' - * / + = : ; , . ! ?
"""


def cache_root() -> Path:
    return Path(os.environ.get("QWEN_SFT_CACHE", Path.home() / ".cache" / "qwen_sft"))


def tiny_path() -> Path:
    """The folder holding the tiny model and tokenizer, built on first use."""
    folder = cache_root() / f"tiny-{TINY_VERSION}"
    if not (folder / "config.json").is_file():
        _build(folder)
    return folder


def _build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .template import DEFAULT_SYSTEM_PROMPT, INPUT_HEADING

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([CORPUS, DEFAULT_SYSTEM_PROMPT, INPUT_HEADING], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=TEMPLATE_PATH.read_text(encoding="utf-8"),
        model_max_length=32768,
        padding_side="right",
    )


def _build(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _build_tokenizer()
    end_of_turn, end_of_text = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        eos_token_id=end_of_turn,
        pad_token_id=end_of_text,
        bos_token_id=None,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(
        eos_token_id=[end_of_turn, end_of_text], pad_token_id=end_of_text, do_sample=False
    )
    model.config.name_or_path = TINY_NAME

    # Build beside the final folder and rename, so a concurrent or interrupted build never leaves half a model.
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    try:
        os.rename(temporary, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # another process did not win the race: a real failure
            raise
        shutil.rmtree(temporary, ignore_errors=True)
