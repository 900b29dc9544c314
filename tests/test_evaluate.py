"""evaluate.py: metric definitions on fixed strings, the completion-only loss against a hand computation, batched
against one-at-a-time generation, and whole runs on the tiny model (base vs tuned, bad input)."""

import json
import math
import statistics

import pytest
import torch
from transformers import AutoTokenizer

from conftest import FIXTURES, run_script
from qwen_sft.data import split_records
from qwen_sft.evaluation import (
    answer_nll,
    choose_generation_rows,
    delta,
    distinct_n,
    generation_metrics,
    length_stats,
    rouge_metrics,
    rouge_scorer,
    text_units,
)
from qwen_sft.generation import decoding_kwargs, generate_token_ids
from qwen_sft.modeling import load_adapter_model
from qwen_sft.records import read_records
from qwen_sft.template import DEFAULT_SYSTEM_PROMPT, build_messages, prompt_ids, tokenize_example
from qwen_sft.tiny import tiny_path

RATES = ("exact_match", "stop_rate", "empty_rate", "distinct-1", "distinct-2", "rouge1", "rouge2", "rougeL")
MODEL_KEYS = ("eval_loss", "perplexity", "avg_pred_len_tokens", "avg_ref_len_tokens", "len_ratio_pred_over_ref", *RATES)
RUN_FLAGS = ["--eval_ratio", "0.5", "--max_new_tokens", "32", "--gen_batch_size", "4", "--eval_batch_size", "3"]


def test_text_units_split_cjk_per_character_and_words_per_run():
    assert text_units("LoRA微调 is GREAT, 2024! snake_case") == ["lora", "微", "调", "is", "great", "2024", "snake", "case"]
    assert text_units(" ，。!? ") == []


def test_distinct_n_hand_computed():
    texts = ["the cat the cat", "猫猫狗", ""]
    # unigrams: the cat the cat 猫 猫 狗 -> 4 unique of 7; bigrams: (the cat)(cat the)(the cat)(猫猫)(猫狗) -> 4 of 5,
    # and none spans two texts (there is no (cat, 猫)).
    assert distinct_n(texts, 1) == pytest.approx(4 / 7)
    assert distinct_n(texts, 2) == pytest.approx(4 / 5)
    assert distinct_n(["", "!!"], 1) == 0.0


def test_length_stats_hand_computed():
    assert length_stats([7, 3, 10, 1, 2, 9, 4, 6, 5, 8]) == {"min": 1, "mean": 5.5, "median": 5.5, "p90": pytest.approx(9.1),
                                                             "max": 10}
    assert length_stats([5, 1, 2]) == {"min": 1, "mean": pytest.approx(8 / 3), "median": 2, "p90": pytest.approx(4.4),
                                       "max": 5}


def test_generation_metrics_hand_computed():
    predictions = [
        {"text": "报告良率为80%。", "tokens": 4, "stopped": True},
        {"text": "", "tokens": 2, "stopped": False},
        {"text": "yes", "tokens": 6, "stopped": True},
    ]
    metrics = generation_metrics(predictions, ["报告良率为80%。", "no", " yes\n"], [4, 1, 7])
    assert metrics["exact_match"] == pytest.approx(2 / 3)  # the reference is compared without its outer whitespace
    assert metrics["stop_rate"] == pytest.approx(2 / 3)
    assert metrics["empty_rate"] == pytest.approx(1 / 3)
    assert metrics["avg_pred_len_tokens"] == pytest.approx(4)
    assert metrics["avg_ref_len_tokens"] == pytest.approx(4)
    assert metrics["len_ratio_pred_over_ref"] == pytest.approx(1)
    # units: 报 告 良 率 为 80 | yes -> 7 unique of 7; bigrams: 5 + 0
    assert metrics["distinct-1"] == pytest.approx(1.0) and metrics["distinct-2"] == pytest.approx(1.0)


def test_rouge_counts_chinese_characters():
    scores = rouge_metrics(rouge_scorer(), ["今天天气好", "completely different"], ["今天天气不好", "LoRA 微调"])
    # Row 1, pred 今天天气好 vs ref 今天天气不好: ROUGE-1 P 5/5 R 5/6 -> F 10/11; ROUGE-2 bigrams 3 shared of 4 and 5
    # -> F 2/3; the longest common subsequence is 5 characters -> F 10/11. Row 2 shares nothing.
    assert scores["rouge1"] == pytest.approx((10 / 11) / 2)
    assert scores["rouge2"] == pytest.approx((2 / 3) / 2)
    assert scores["rougeL"] == pytest.approx((10 / 11) / 2)


def test_delta_and_generation_row_choice():
    assert delta({"a": 3.0, "b": None}, {"a": 1.0, "b": 2.0}) == {"a": 2.0, "b": None}
    chosen = choose_generation_rows(50, 7, seed=42)
    assert chosen == choose_generation_rows(50, 7, seed=42) and chosen == sorted(set(chosen)) and len(chosen) == 7
    assert chosen != choose_generation_rows(50, 7, seed=1)
    assert choose_generation_rows(5, 0, 42) == choose_generation_rows(5, -1, 42) == choose_generation_rows(5, 9, 42) == [
        0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def tuned(learned_adapter):
    model, tokenizer, _ = load_adapter_model(str(learned_adapter / "Qwen_finetuning_model"),
                                             base_model="tiny", backend="hf", load_in_4bit=False, max_seq_length=2048)
    return model, tokenizer


def hand_computed_answer_nll(model, tokenizer, record):
    """Summed NLL and count of the answer tokens, from the full rendered conversation and a mask built by hand."""
    messages = build_messages(record, with_answer=True)
    text = tokenizer.apply_chat_template(messages, tokenize=False).removesuffix("\n")  # ends with the answer's <|im_end|>
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer_start = max(i for i, token in enumerate(ids) if token == tokenizer.convert_tokens_to_ids("<|im_start|>"))
    answer_start += 1 + len(tokenizer("assistant\n", add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    positions = range(answer_start, len(ids))
    return -sum(log_probs[position - 1, ids[position]].item() for position in positions), len(positions)


def test_completion_only_loss_matches_hand_computation(tuned):
    model, tokenizer = tuned
    records = read_records(FIXTURES / "learning_20.jsonl")[:2]  # one without, one with "input": different lengths
    examples = [tokenize_example(tokenizer, record, DEFAULT_SYSTEM_PROMPT, 2048)[0] for record in records]
    assert len(examples[0]["input_ids"]) != len(examples[1]["input_ids"])
    computed = answer_nll(model, examples, batch_size=2, pad_token_id=tokenizer.pad_token_id)
    by_hand = [hand_computed_answer_nll(model, tokenizer, record) for record in records]
    assert [count for _, count in computed] == [count for _, count in by_hand]
    for (total, _), (expected, _) in zip(computed, by_hand):
        assert total == pytest.approx(expected, rel=1e-5)
    loss = sum(total for total, _ in computed) / sum(count for _, count in computed)
    assert loss == pytest.approx(sum(t for t, _ in by_hand) / sum(c for _, c in by_hand), rel=1e-5)


def test_batched_generation_equals_one_at_a_time(tuned):
    model, tokenizer = tuned
    records = read_records(FIXTURES / "learning_20.jsonl")[:7]
    prompts = [prompt_ids(tokenizer, build_messages(record)) for record in records]
    assert len({len(prompt) for prompt in prompts}) > 3  # batches hold prompts of different lengths: real padding
    kwargs = decoding_kwargs(tokenizer, max_new_tokens=30)
    batched = generate_token_ids(model, prompts, kwargs, batch_size=4)
    single = generate_token_ids(model, prompts, kwargs, batch_size=1)
    assert batched == single
    assert all(row["stopped"] for row in batched) and len({len(row["ids"]) for row in batched}) > 1
    with model.disable_adapter():  # the random base model: long, unstopped answers, sensitive to any padding leak
        base_batched = generate_token_ids(model, prompts, kwargs, batch_size=4)
        base_single = generate_token_ids(model, prompts, kwargs, batch_size=1)
    assert base_batched == base_single and base_batched != batched


@pytest.fixture(scope="module")
def dataset_with_sources(tmp_path_factory):
    """learning_20.jsonl with a source per row: "zh" for the Chinese rows, "en" for the English ones."""
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    rows = [json.loads(line) for line in (FIXTURES / "learning_20.jsonl").read_text(encoding="utf-8").splitlines()]
    for row in rows:
        row["source"] = "zh" if row["instruction"].startswith("报告") else "en"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def full_run(learned_adapter, dataset_with_sources, tmp_path_factory):
    """evaluate.py with base comparison and ROUGE on half of the rows the adapter was trained on."""
    workdir = tmp_path_factory.mktemp("evaluate")
    result = run_script(
        "evaluate.py", "--adapter_dir", learned_adapter / "Qwen_finetuning_model", "--dataset_path",
        dataset_with_sources, *RUN_FLAGS, "--rouge", cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((workdir / "evaluation_results" / "metrics.json").read_text(encoding="utf-8"))
    assert list(metrics["files"]) == ["predictions.jsonl"]  # written as one unit with metrics.json, listed as ours
    predictions = [json.loads(line) for line in (workdir / "evaluation_results" / "predictions.jsonl").open(encoding="utf-8")]
    return result, metrics, predictions


def assert_model_metrics(metrics):
    assert set(MODEL_KEYS) <= set(metrics)
    assert metrics["eval_loss"] > 0 and metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    for name in RATES:
        assert 0 <= metrics[name] <= 1, name
    assert metrics["avg_pred_len_tokens"] > 0 and metrics["avg_ref_len_tokens"] > 0
    assert metrics["len_ratio_pred_over_ref"] == pytest.approx(metrics["avg_pred_len_tokens"] / metrics["avg_ref_len_tokens"])


def test_every_metric_present_and_in_range(full_run):
    _, metrics, _ = full_run
    assert_model_metrics(metrics)
    assert_model_metrics(metrics["base"])
    assert set(metrics["delta"]) == set(metrics["base"]) >= set(MODEL_KEYS)
    for name in MODEL_KEYS:
        assert metrics["delta"][name] == pytest.approx(metrics[name] - metrics["base"][name])
    assert metrics["dataset"]["rows"] == 20 and metrics["dataset"]["eval_rows"] == metrics["dataset"]["generated_rows"] == 10
    stats = metrics["length_stats"]
    assert 0 < stats["min"] <= stats["median"] <= stats["p90"] <= stats["max"] and stats["min"] <= stats["mean"] <= stats["max"]
    assert metrics["truncation_rate"] == 0.0 and metrics["teacher_forcing"]["rows"] == 10
    assert metrics["teacher_forcing"]["answer_tokens"] > 10
    assert metrics["backend"] == "hf" and metrics["config"]["ROUGE"] is True and "torch" in metrics["versions"]
    assert metrics["generation"]["throughput"]["tuned"]["tokens_per_s"] > 0


def test_tuned_beats_base_on_its_training_rows(full_run):
    _, metrics, predictions = full_run
    assert metrics["exact_match"] == 1.0 and metrics["stop_rate"] == 1.0 and metrics["base"]["exact_match"] == 0.0
    assert metrics["eval_loss"] < metrics["base"]["eval_loss"] and metrics["delta"]["rougeL"] > 0.5
    assert all(row["prediction"] == row["reference"] for row in predictions)
    assert any(row["base_prediction"] != row["reference"] for row in predictions)


def test_predictions_and_per_source_breakdown(full_run, dataset_with_sources):
    result, metrics, predictions = full_run
    rows = {row["instruction"]: row for row in read_records(dataset_with_sources)}
    assert len(predictions) == 10
    for line in predictions:
        assert set(line) == {"instruction", "input", "reference", "prediction", "source", "base_prediction"}
        row = rows[line["instruction"]]
        assert (line["input"], line["reference"], line["source"]) == (row["input"], row["output"], row["source"])
    by_source = metrics["by_source"]
    assert set(by_source) == {"zh", "en"}
    for source, group in by_source.items():
        assert group["eval_rows"] == group["generated_rows"] == sum(line["source"] == source for line in predictions)
        assert_model_metrics(group)
        assert set(group["base"]) == set(group["delta"]) == set(metrics["base"])
    # The whole split's loss is the mean over answer tokens (answer + <|im_end|>), so the groups weigh by their tokens.
    tokenizer = AutoTokenizer.from_pretrained(tiny_path())
    answer_tokens = {source: sum(len(tokenizer(line["reference"] + "<|im_end|>")["input_ids"]) for line in predictions
                                 if line["source"] == source) for source in by_source}
    weighted = sum(by_source[s]["eval_loss"] * answer_tokens[s] for s in by_source) / sum(answer_tokens.values())
    assert metrics["eval_loss"] == pytest.approx(weighted, rel=1e-9)
    assert metrics["eval_loss"] != pytest.approx(statistics.fmean(group["eval_loss"] for group in by_source.values()))
    table = result.stdout[result.stdout.index("metric"):]
    assert "base" in table and "tuned" in table and "delta" in table
    assert f"{metrics['eval_loss']:.4f}" in table and f"{metrics['base']['exact_match']:.4f}" in table


def test_tuned_only_run_truncation_and_sample_cap(learned_adapter, tmp_path):
    # Full-sample lengths of the eval rows, counted from the whole rendered conversation; the limit cuts about half.
    tokenizer = AutoTokenizer.from_pretrained(learned_adapter / "Qwen_finetuning_model")
    _, eval_records = split_records(read_records(FIXTURES / "learning_20.jsonl"), 0.5, 42)
    lengths = [
        len(tokenizer(tokenizer.apply_chat_template(build_messages(r, with_answer=True), tokenize=False).removesuffix("\n"),
                      add_special_tokens=False)["input_ids"])
        for r in eval_records
    ]
    max_seq_length = sorted(lengths)[len(lengths) // 2]
    result = run_script(
        "evaluate.py", "--adapter_dir", learned_adapter / "Qwen_finetuning_model", "--dataset_path",
        FIXTURES / "learning_20.jsonl", *RUN_FLAGS, "--compare_base", "false", "--max_gen_samples", "3",
        "--max_seq_length", max_seq_length, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "evaluation_results" / "metrics.json").read_text(encoding="utf-8"))
    predictions = (tmp_path / "evaluation_results" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert "base" not in metrics and "delta" not in metrics and "rouge1" not in metrics
    assert len(predictions) == metrics["dataset"]["generated_rows"] == 3
    assert all("base_prediction" not in json.loads(line) for line in predictions)

    assert metrics["length_stats"] == pytest.approx(length_stats(lengths))
    assert metrics["truncation_rate"] == pytest.approx(sum(n > max_seq_length for n in lengths) / len(lengths))
    assert 0 < metrics["truncation_rate"] < 1
    assert metrics["teacher_forcing"]["prompts_cut_from_left"] == sum(n > max_seq_length for n in lengths)


def test_help_lists_every_flag():
    result = run_script("evaluate.py", "--help")
    assert result.returncode == 0
    for flag in ("--adapter_dir", "--dataset_path auto", "--max_seq_length auto", "--max_new_tokens 512",
                 "--eval_ratio auto", "--split_seed auto", "--generation_seed 42", "--rouge false", "--gen_batch_size",
                 "--max_gen_samples 0", "--compare_base true"):
        assert flag in result.stdout


BAD_ROWS = {"malformed row": (3, '{"instruction": "x", "output": '), "row without output": (2, '{"instruction": "x"}')}


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing adapter", "no LoRA adapter there; run Qwen_finetuning.py first"),
        ("missing dataset", "missing.jsonl: dataset not found; run data_integration.py"),
        ("malformed row", "bad.jsonl:3: malformed JSON"),
        ("row without output", 'bad.jsonl:2: field "output" is missing'),
        ("empty eval split", "the eval split is empty (20 rows at --eval_ratio 0.0)"),
        ("rouge not installed", "--rouge needs the rouge-score package: pip install rouge-score"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, message, learned_adapter, tmp_path):
    adapter, dataset, extra, env = learned_adapter / "Qwen_finetuning_model", FIXTURES / "learning_20.jsonl", [], None
    if case == "missing adapter":
        adapter = tmp_path / "Qwen_finetuning_model"
    elif case == "missing dataset":
        dataset = tmp_path / "missing.jsonl"
    elif case in BAD_ROWS:
        line_number, bad_line = BAD_ROWS[case]
        lines = (FIXTURES / "learning_20.jsonl").read_text(encoding="utf-8").splitlines()
        lines[line_number - 1] = bad_line
        dataset = tmp_path / "bad.jsonl"
        dataset.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif case == "empty eval split":
        extra = ["--eval_ratio", "0"]
    else:  # a rouge_score that cannot be imported, ahead of the installed one
        (tmp_path / "rouge_score.py").write_text("raise ImportError('no rouge_score here')\n", encoding="utf-8")
        extra, env = ["--rouge"], {"PYTHONPATH": str(tmp_path)}
    result = run_script("evaluate.py", "--adapter_dir", adapter, "--dataset_path", dataset, *extra, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "evaluation_results").exists()

