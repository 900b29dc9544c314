"""The evaluation stage: did fine-tuning help? Teacher-forced loss, length statistics and generated answers,
for the adapter and (with the adapter switched off) for its base model, on the eval split training held out.

Metric definitions (README, "evaluate.py"):
- eval_loss: mean negative log-likelihood per answer token under teacher forcing, over every answer token of the
  split (token-weighted: a long answer counts per token, not once). Only the answers (every assistant turn of a
  conversation) and their closing <|im_end|> carry loss, exactly as in training (template.tokenize_example).
  perplexity = exp(eval_loss).
- length statistics: tokens of each full sample (system + user + reference answer + <|im_end|>, or the whole
  conversation); truncation_rate is the share longer than MAX_SEQ_LENGTH.
- generation, from system + user only (for a conversation: every turn before its last answer, which is the
  reference): empty_rate (share of empty answers), exact_match (answer == reference
  after trimming whitespace), stop_rate (share ended by <|im_end|> within MAX_NEW_TOKENS), avg_pred_len_tokens
  and avg_ref_len_tokens (model tokens, stop token excluded), len_ratio_pred_over_ref (ratio of those means),
  distinct-1/2 (unique n-grams / all n-grams over all answers, in text units, see `text_units`) and, on request,
  ROUGE-1/2/L F1 in the same text units.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import statistics
import time
from pathlib import Path

from .artifacts import (
    FOLDER,
    Output,
    atomic_directory,
    atomic_file,
    build_manifest,
    claim_outputs,
    sha256_file,
    write_json_atomic,
)
from .cli import UserError
from .data import split_records, tokenize_records
from .inherit import overrides
from .records import json_line, read_records

NO_SOURCE = "unspecified"
METRICS_FILE = "metrics.json"  # also the manifest of OUTPUT_DIR
# Metrics computed per model; `base` and `delta` carry the same keys (ROUGE keys only with --rouge).
LOSS_METRICS = ("eval_loss", "perplexity")
GENERATION_METRICS = (
    "exact_match", "stop_rate", "empty_rate", "avg_pred_len_tokens", "avg_ref_len_tokens",
    "len_ratio_pred_over_ref", "distinct-1", "distinct-2",
)
ROUGE_METRICS = ("rouge1", "rouge2", "rougeL")

# CJK ideographs and Japanese kana: these scripts do not separate words by spaces, so each character is a unit.
_CJK_CHARACTERS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TEXT_UNIT = re.compile(f"[{_CJK_CHARACTERS}]|[^\\W_{_CJK_CHARACTERS}]+")


def text_units(text: str) -> list[str]:
    """The units distinct-n and ROUGE count: each CJK character, and each run of other letters or digits
    (lower-cased). Punctuation and whitespace are not units. Independent of the model's tokenizer, so base and
    tuned answers (and different models) are measured alike."""
    return _TEXT_UNIT.findall(text.lower())


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / all n-grams over every text (n-grams never cross texts); 0.0 when there are none."""
    ngrams = [
        tuple(units[start:start + n])
        for units in map(text_units, texts)
        for start in range(len(units) - n + 1)
    ]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def percentile(sorted_values: list[float], share: float) -> float:
    """Linear interpolation between the closest ranks (numpy.percentile's default)."""
    position = share * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def length_stats(lengths: list[int]) -> dict:
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "mean": statistics.fmean(ordered),
        "median": statistics.median(ordered),
        "p90": percentile(ordered, 0.9),
        "max": ordered[-1],
    }


def loss_metrics(nll_sum: float, answer_tokens: int) -> dict:
    if not answer_tokens:
        return {"eval_loss": None, "perplexity": None}
    loss = nll_sum / answer_tokens
    return {"eval_loss": loss, "perplexity": math.exp(loss)}


def generation_metrics(predictions: list[dict], references: list[str], reference_tokens: list[int]) -> dict:
    """Metrics of generated answers ({"text", "tokens", "stopped"}) against their references."""
    if not predictions:
        return dict.fromkeys(GENERATION_METRICS)
    texts = [row["text"] for row in predictions]
    count = len(predictions)
    average_prediction = sum(row["tokens"] for row in predictions) / count
    average_reference = sum(reference_tokens) / count
    return {
        "exact_match": sum(text == reference.strip() for text, reference in zip(texts, references)) / count,
        "stop_rate": sum(row["stopped"] for row in predictions) / count,
        "empty_rate": sum(not text for text in texts) / count,
        "avg_pred_len_tokens": average_prediction,
        "avg_ref_len_tokens": average_reference,
        "len_ratio_pred_over_ref": average_prediction / average_reference if average_reference else None,
        "distinct-1": distinct_n(texts, 1),
        "distinct-2": distinct_n(texts, 2),
    }


def rouge_scorer():
    """rouge_score's scorer with the CJK-aware `text_units` (its own tokenizer drops non-ASCII text entirely).

    `evaluate.load("rouge")` would fetch its metric script from the hub, which fails offline, and it wraps this
    same scorer, so the scorer is used directly.
    """
    try:
        from rouge_score import rouge_scorer as scoring
    except ImportError:
        raise UserError("--rouge needs the rouge-score package: pip install rouge-score (or run without --rouge)") from None

    class TextUnitTokenizer:
        def tokenize(self, text):
            return text_units(text)

    return scoring.RougeScorer(list(ROUGE_METRICS), tokenizer=TextUnitTokenizer())


def rouge_metrics(scorer, predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L F1 over the rows."""
    if not predictions:
        return dict.fromkeys(ROUGE_METRICS)
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    return {name: statistics.fmean(score[name].fmeasure for score in scores) for name in ROUGE_METRICS}


def delta(tuned: dict, base: dict) -> dict:
    """tuned - base for every metric both have a number for."""
    return {
        name: tuned[name] - base[name] if tuned.get(name) is not None and base.get(name) is not None else None
        for name in tuned
    }


def choose_generation_rows(count: int, limit: int, seed: int) -> list[int]:
    """Indices of the eval rows to generate for: all when `limit` <= 0 or >= count, else a seeded sample."""
    if limit <= 0 or limit >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))


def answer_nll(model, examples: list[dict], batch_size: int, pad_token_id: int, progress: str | None = None):
    """Teacher forcing: per example, the summed negative log-likelihood of its completion tokens (the answer and
    <|im_end|>, `completion_mask`) and how many there are.

    Examples are batched longest first and padded on the right, so real tokens never attend to padding. Logits
    are kept only from the shortest prompt's end onwards, which spares the vocabulary-wide logits of the prompts.
    """
    import torch
    from tqdm.auto import tqdm

    from .generation import model_device
    from .modeling import compute_dtype

    device = model_device(model)
    # On a GPU, run in the compute dtype as training's mixed precision and Unsloth's generate() do.
    precision = torch.autocast("cuda", dtype=compute_dtype()) if device.type == "cuda" else contextlib.nullcontext()
    order = sorted(range(len(examples)), key=lambda index: len(examples[index]["input_ids"]), reverse=True)
    per_example = [(0.0, 0)] * len(examples)
    for first in tqdm(range(0, len(order), batch_size), desc=progress, unit="batch", disable=progress is None):
        rows = [examples[index] for index in order[first:first + batch_size]]
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for position, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[position, :length] = torch.tensor(row["input_ids"])
            attention_mask[position, :length] = 1
            completion_mask[position, :length] = torch.tensor(row["completion_mask"], dtype=torch.bool)
        # The first logit needed predicts the first answer token, from the last prompt position.
        start = min(row["completion_mask"].index(1) for row in rows) - 1
        with torch.inference_mode(), precision:
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), logits_to_keep=width - start
            ).logits
        targets = input_ids[:, start + 1:].to(logits.device)
        scored = completion_mask[:, start + 1:].to(logits.device)
        # float32 log-softmax over the vocabulary, a chunk of answer tokens at a time to bound the memory it takes.
        nll = torch.cat([
            torch.nn.functional.cross_entropy(chunk.float(), chunk_targets, reduction="none")
            for chunk, chunk_targets in zip(logits[:, :-1][scored].split(1024), targets[scored].split(1024))
        ])
        row_of_token = scored.nonzero()[:, 0]
        sums = torch.zeros(len(rows), dtype=torch.float64, device=logits.device).index_add_(0, row_of_token, nll.double())
        for index, total, count in zip(order[first:first + batch_size], sums.tolist(), scored.sum(1).tolist()):
            per_example[index] = (total, count)
    return per_example


def evaluation_split(cfg) -> tuple[list[dict], list[dict]]:
    """All rows and the eval split (training's split_records), or a UserError naming the file and what to do."""
    path = Path(cfg.dataset_path)
    if not path.is_file():
        raise UserError(
            f"{path}: dataset not found; run data_integration.py (or data_set_generation.py) first, or pass --dataset_path"
        )
    try:
        records = read_records(path, cfg.dataset_format)
    except UserError as error:
        raise UserError(f"{error}; fix that row, or rebuild the file with data_integration.py") from None
    _, eval_records = split_records(records, cfg.eval_ratio, cfg.split_seed)
    if not eval_records:
        raise UserError(
            f"{path}: the eval split is empty ({len(records)} rows at --eval_ratio {cfg.eval_ratio}); "
            "use --eval_ratio > 0 (training's default is 0.1) and a dataset of at least 2 rows"
        )
    return records, eval_records


def split_warnings(adapter_manifest: dict, cfg, dataset_sha256: str) -> list[str]:
    """Where this evaluation differs from how the adapter was trained, so its eval rows may be training rows (the
    settings given were printed with the config; they are recorded here)."""
    warnings = overrides(adapter_manifest, cfg)
    trained_sha = adapter_manifest.get("dataset", {}).get("sha256")
    if trained_sha and trained_sha != dataset_sha256:
        changed = f"{cfg.dataset_path} is not the file the adapter was trained on (its sha256 differs)"
        print(f"warning: {changed}")
        warnings.append(changed)
    return warnings


class EvalRows:
    """The eval split tokenized once, for teacher forcing (exactly as training tokenizes) and for generation."""

    def __init__(self, tokenizer, records: list[dict], cfg):
        from .template import answer_ids, build_messages, prompt_ids, prompt_within, reference_answer

        self.records = records
        self.sources = [record.get("source", NO_SOURCE) for record in records]
        self.references = [reference_answer(record) for record in records]  # None for a text row: nothing to answer
        prompts = [prompt_ids(tokenizer, build_messages(record, cfg.system_prompt), record.get("tools"))
                   if reference is not None else [] for record, reference in zip(records, self.references)]
        answers = [answer_ids(tokenizer, reference or "") for reference in self.references]
        self.full_lengths = [len(prompt) + len(answer) for prompt, answer in zip(prompts, answers)]
        self.reference_tokens = [len(answer) - 1 for answer in answers]  # the answer without its <|im_end|>

        # Teacher forcing, fitted to MAX_SEQ_LENGTH as in training: a prompt is cut from the left and a
        # conversation loses its oldest exchanges; a row whose (last) answer alone does not fit carries no loss.
        tokenized = tokenize_records(tokenizer, records, cfg.system_prompt, cfg.max_seq_length)
        self.examples, self.example_rows = tokenized.rows, tokenized.record_indices
        self.prompts_cut, self.dropped = tokenized.stats["prompt_truncated"], tokenized.stats["dropped_answer_too_long"]
        self.conversations_shortened = tokenized.stats["conversations_shortened"]
        self.conversations_dropped = tokenized.stats["dropped_last_exchange_too_long"]

        # Generation: a seeded subset; a prompt longer than MAX_SEQ_LENGTH loses a conversation's oldest exchanges
        # first, then keeps its end.
        answerable = [row for row, reference in enumerate(self.references) if reference is not None]
        chosen = choose_generation_rows(len(answerable), cfg.max_gen_samples, cfg.generation_seed)
        self.generation_rows = [answerable[position] for position in chosen]
        fitted = [
            prompt_within(tokenizer, build_messages(records[row], cfg.system_prompt), cfg.max_seq_length,
                          records[row].get("tools"))
            if len(prompts[row]) > cfg.max_seq_length else (prompts[row], False)
            for row in self.generation_rows
        ]
        self.generation_prompts = [ids for ids, _ in fitted]
        self.generation_prompts_cut = sum(cut for _, cut in fitted)


def run_model(model, tokenizer, cfg, rows: EvalRows, label: str) -> dict:
    """Loss terms per example and generated answers of the model as it is now (adapter on or off)."""
    from .generation import decode_answer, decoding_kwargs, generate_token_ids

    losses = answer_nll(model, rows.examples, cfg.eval_batch_size, tokenizer.pad_token_id, progress=f"eval_loss {label}")
    decoding = decoding_kwargs(tokenizer, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    started = time.perf_counter()
    generated = generate_token_ids(model, rows.generation_prompts, decoding, cfg.gen_batch_size,
                                   progress=f"generate {label}")
    seconds = time.perf_counter() - started
    tokens = sum(len(row["ids"]) for row in generated)
    answers = [
        {"text": decode_answer(tokenizer, row["ids"]), "tokens": len(row["ids"]), "stopped": row["stopped"]}
        for row in generated
    ]
    throughput = {"generated_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": tokens / max(seconds, 1e-9)}
    return {"losses": losses, "answers": answers, "throughput": throughput}


def grouped_metrics(runs: dict, rows: EvalRows, scorer, source: str | None = None) -> dict:
    """Tuned metrics, plus `base` and `delta` when the base ran, over the rows of `source` (None = all rows)."""
    loss_positions = [i for i, row in enumerate(rows.example_rows) if source in (None, rows.sources[row])]
    answer_positions = [i for i, row in enumerate(rows.generation_rows) if source in (None, rows.sources[row])]
    references = [rows.references[rows.generation_rows[i]] for i in answer_positions]
    reference_tokens = [rows.reference_tokens[rows.generation_rows[i]] for i in answer_positions]

    per_model = {}
    for label, run in runs.items():
        answers = [run["answers"][i] for i in answer_positions]
        metrics = {
            **loss_metrics(sum(run["losses"][i][0] for i in loss_positions), sum(run["losses"][i][1] for i in loss_positions)),
            **generation_metrics(answers, references, reference_tokens),
        }
        if scorer is not None:
            metrics.update(rouge_metrics(scorer, [answer["text"] for answer in answers], references))
        per_model[label] = metrics
    result = dict(per_model["tuned"])
    if "base" in per_model:
        result["base"] = per_model["base"]
        result["delta"] = delta(per_model["tuned"], per_model["base"])
    return result


def summary_table(metrics: dict) -> str:
    """Key metrics side by side: base, tuned and their difference (tuned only without COMPARE_BASE)."""
    names = [name for name in (*LOSS_METRICS, *GENERATION_METRICS, *ROUGE_METRICS) if name in metrics]
    has_base = "base" in metrics

    def cell(value):
        return "-" if value is None else f"{value:.4f}"

    header = f"{'metric':<26}" + (f"{'base':>12}{'tuned':>12}{'delta':>12}" if has_base else f"{'tuned':>12}")
    lines = [header, "-" * len(header)]
    for name in names:
        row = f"{name:<26}"
        if has_base:
            row += f"{cell(metrics['base'][name]):>12}{cell(metrics[name]):>12}{cell(metrics['delta'][name]):>12}"
        else:
            row += f"{cell(metrics[name]):>12}"
        lines.append(row)
    return "\n".join(lines)


def write_predictions(path: Path, rows: EvalRows, runs: dict) -> None:
    with atomic_file(path) as handle:
        for position, row in enumerate(rows.generation_rows):
            record = rows.records[row]
            # A conversation is shown up to the answer that was generated: its turns, less the reference.
            shown = ({"messages": record["messages"][:-1]} if "messages" in record
                     else {"instruction": record["instruction"], "input": record["input"]})
            line = {**shown, "reference": rows.references[row],
                    "prediction": runs["tuned"]["answers"][position]["text"], "source": rows.sources[row]}
            if "base" in runs:
                line["base_prediction"] = runs["base"]["answers"][position]["text"]
            handle.write(json_line(line))


def run_models(model, tokenizer, cfg, rows: EvalRows) -> dict:
    """The tuned model's run and, with --compare_base, the base model's; out of GPU memory is one line."""
    import torch

    from .fast_generation import adapter_disabled

    try:
        runs = {"tuned": run_model(model, tokenizer, cfg, rows, "tuned")}
        if cfg.compare_base:
            with adapter_disabled(model):  # the same model with the LoRA switched off (or unmerged): no second load
                runs["base"] = run_model(model, tokenizer, cfg, rows, "base")
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            f"out of GPU memory; lower --gen_batch_size (now {cfg.gen_batch_size}) or --eval_batch_size "
            f"(now {cfg.eval_batch_size})"
        ) from None
    return runs


def row_statistics(cfg, rows: EvalRows, runs: dict) -> dict:
    """The metrics file's account of the rows: their lengths, and what teacher forcing and generation ran on."""
    return {
        "length_stats": length_stats(rows.full_lengths),
        "truncation_rate": sum(length > cfg.max_seq_length for length in rows.full_lengths) / len(rows.full_lengths),
        "teacher_forcing": {"rows": len(rows.examples),
                            "answer_tokens": sum(count for _, count in runs["tuned"]["losses"]),
                            "prompts_cut_from_left": rows.prompts_cut, "rows_dropped_answer_too_long": rows.dropped,
                            "conversations_shortened": rows.conversations_shortened,
                            "conversations_dropped_last_exchange_too_long": rows.conversations_dropped},
        "generation": {"rows": len(rows.generation_rows), "prompts_cut_from_left": rows.generation_prompts_cut,
                       "decoding": "greedy" if cfg.temperature <= 0 else "sampled",
                       "throughput": {label: run["throughput"] for label, run in runs.items()}},
    }


def metrics_by_source(runs: dict, rows: EvalRows, scorer) -> dict:
    return {
        source: {"eval_rows": rows.sources.count(source),
                 "generated_rows": sum(rows.sources[row] == source for row in rows.generation_rows),
                 **grouped_metrics(runs, rows, scorer, source)}
        for source in sorted(set(rows.sources))
    }


def write_results(output_dir: Path, rows: EvalRows, runs: dict, metrics: dict) -> None:
    """metrics.json and predictions.jsonl as one unit, then the summary table."""
    with atomic_directory(output_dir, manifest_name=METRICS_FILE) as folder:
        write_predictions(folder / "predictions.jsonl", rows, runs)
        write_json_atomic(folder / METRICS_FILE, metrics)

    print()
    print(summary_table(metrics))
    print(f"\nmetrics and {len(rows.generation_rows)} predictions written to {output_dir}/ "
          "(metrics.json, predictions.jsonl)")


def evaluate(cfg) -> dict:
    """Run the whole stage and write OUTPUT_DIR/metrics.json and predictions.jsonl; returns the metrics."""
    from .fast_generation import resolve_fast_generation

    # Every check that needs no model comes first, so bad input fails in a second (each flag alone: settings.RULES).
    resolve_fast_generation(cfg.fast_generation)
    with claim_outputs({"--adapter_dir": cfg.adapter_dir, "--dataset_path": cfg.dataset_path},
                       [Output("--output_dir", cfg.output_dir, FOLDER, METRICS_FILE)], "evaluate",
                       cfg.overwrite_output) as targets:
        return _evaluate(cfg, targets["--output_dir"])


def _evaluate(cfg, output_dir: Path) -> dict:
    from .fast_generation import generation_path, load_generation_model
    from .modeling import chosen_base_path

    scorer = rouge_scorer() if cfg.rouge else None
    records, eval_records = evaluation_split(cfg)
    dataset_sha256 = sha256_file(cfg.dataset_path)
    warnings = split_warnings(cfg.adapter_manifest, cfg, dataset_sha256)

    chosen_base_path(cfg.adapter_dir, cfg.adapter_manifest, cfg.base_model)  # a trained base that is gone: one line
    model, tokenizer, loaded = load_generation_model(cfg.adapter_dir, base_model=cfg.base_model, backend=cfg.backend,
                                                     fast_generation=cfg.fast_generation,
                                                     load_in_4bit=cfg.load_in_4bit, max_seq_length=cfg.max_seq_length,
                                                     keep_base=cfg.compare_base)
    backend = loaded["backend_loaded"]
    four_bit = bool(getattr(model, "is_loaded_in_4bit", False))
    print(f"backend: {backend} (base model {loaded['base_model']}, 4-bit {four_bit}); "
          f"{len(eval_records)} eval rows of {len(records)}; {generation_path(loaded)}")
    if cfg.temperature > 0:
        from transformers import set_seed

        set_seed(cfg.generation_seed)

    rows = EvalRows(tokenizer, eval_records, cfg)
    runs = run_models(model, tokenizer, cfg, rows)
    metrics = build_manifest(
        "evaluate",
        dict(cfg),
        adapter={"path": str(cfg.adapter_dir), "base_model": loaded["base_model"]},
        backend=backend,
        load_in_4bit=four_bit,
        fast_generation=loaded["fast_generation"],
        dataset={"path": str(cfg.dataset_path), "sha256": dataset_sha256, "rows": len(records),
                 "eval_rows": len(eval_records), "generated_rows": len(rows.generation_rows)},
        warnings=warnings,
        **row_statistics(cfg, rows, runs),
        **grouped_metrics(runs, rows, scorer),
        by_source=metrics_by_source(runs, rows, scorer),
    )
    write_results(output_dir, rows, runs, metrics)
    return metrics
