"""The fast generation path (qwen_sft/fast_generation.py): the merged weights against PEFT's own forward (fp32 and
NF4), and token-identical greedy answers against the 4-bit-style PEFT path for inference, evaluation and chat."""

import json

import pytest
import torch

from conftest import EXACT, FIXTURES, run_script
from qwen_sft.cli import UserError
from qwen_sft.fast_generation import (
    adapter_disabled,
    choose_fast,
    dense_model,
    load_generation_model,
    resolve_fast_generation,
    warm_up,
)
from qwen_sft.generation import decoding_kwargs, generate_token_ids, stream_reply
from qwen_sft.modeling import LORA_TARGET_MODULES
from qwen_sft.records import read_records
from qwen_sft.template import DEFAULT_SYSTEM_PROMPT, build_messages, prompt_ids
from qwen_sft.tiny import tiny_path

ROWS = read_records(FIXTURES / "learning_20.jsonl")


def random_lora_model(load_in_4bit: bool, seed: int = 0):
    """The tiny base (fp32, or NF4 through bitsandbytes on CPU) with a LoRA whose B is non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32) if load_in_4bit else None
    base = AutoModelForCausalLM.from_pretrained(tiny_path(), dtype=torch.float32, quantization_config=quantization)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGET_MODULES))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_merged_weights_match_peft_forward_and_base_swaps_back():
    peft_model = random_lora_model(load_in_4bit=False)
    dense = dense_model(peft_model, torch.float32, keep_base=True)
    input_ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    tuned = logits(peft_model, input_ids)
    with peft_model.disable_adapter():
        base = logits(peft_model, input_ids)
    assert (tuned - base).abs().max() > 0.1  # the adapter matters, so a merge that drops it would fail
    torch.testing.assert_close(logits(dense, input_ids), tuned, atol=1e-5, rtol=1e-5)
    with adapter_disabled(dense):
        torch.testing.assert_close(logits(dense, input_ids), base, atol=0, rtol=0)  # the exact base weights
    torch.testing.assert_close(logits(dense, input_ids), tuned, atol=1e-5, rtol=1e-5)  # swapped back
    assert type(dense).__name__ == "Qwen2ForCausalLM" and not hasattr(dense, "peft_config")


def test_nf4_base_is_dequantized_and_the_lora_added_in_fp32():
    pytest.importorskip("bitsandbytes")
    peft_model = random_lora_model(load_in_4bit=True)
    reference = random_lora_model(load_in_4bit=False)  # the same seeds: the unquantized weights and LoRA
    dense = dense_model(peft_model, torch.float32, keep_base=True)
    name = "model.layers.0.mlp.down_proj.weight"
    layer = peft_model.get_base_model().get_submodule(name.removesuffix(".weight"))
    original = reference.get_base_model().get_submodule(name.removesuffix(".weight")).get_base_layer().weight
    delta = layer.get_delta_weight("default").float()  # PEFT's own LoRA product
    merged, unmerged = dense.get_parameter(name), dense.base_weights[name]
    assert layer.get_base_layer().weight.dtype == torch.uint8  # really NF4
    torch.testing.assert_close(merged - unmerged, delta, atol=1e-6, rtol=1e-5)
    nf4_error = (unmerged - original).abs().max().item()
    assert 0 < nf4_error < 0.2 * original.abs().max().item()  # dequantized NF4, not the original, not garbage
    input_ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    adapter_effect = (logits(peft_model, input_ids) - logits(reference.get_base_model(), input_ids)).abs().max()
    gap = (logits(dense, input_ids) - logits(peft_model, input_ids)).abs().max()
    assert gap < 0.02 * adapter_effect  # bitsandbytes' CPU matmul rounds; a lost or doubled LoRA would not pass


def test_flag_values_and_auto_without_cuda():
    assert [resolve_fast_generation(word) for word in ("auto", " TRUE ", "false")] == ["auto", "true", "false"]
    with pytest.raises(UserError, match="--fast_generation must be auto, true or false"):
        resolve_fast_generation("yes please")
    if not torch.cuda.is_available():
        assert choose_fast("auto", str(tiny_path()), 1) == (False, "no CUDA GPU (auto)")
    assert choose_fast("true", str(tiny_path()), 2) == (True, "--fast_generation true")


AS_TRAINED = {"base_model": "tiny", "backend": "hf", "load_in_4bit": False, "max_seq_length": 2048}  # the adapter's


@pytest.fixture(scope="module")
def adapter(learned_adapter):
    return str(learned_adapter / "Qwen_finetuning_model")


@pytest.fixture(scope="module")
def both_paths(adapter):
    """The current path (PEFT on the base) and the fast path (merged, static cache) of the trained tiny adapter."""
    current, tokenizer, manifest = load_generation_model(adapter, fast_generation="false", **AS_TRAINED)
    fast, _, fast_manifest = load_generation_model(adapter, fast_generation="true", **AS_TRAINED, keep_base=True,
                                                   max_cache_len=256)
    assert not manifest["fast_generation"]["used"] and fast_manifest["fast_generation"]["used"]
    assert fast.generation_config.cache_implementation == "static" and hasattr(current, "peft_config")
    return current, fast, tokenizer


@pytest.mark.slow
def test_fast_path_is_token_identical_for_inference_and_evaluation(both_paths, monkeypatch):
    """generate_token_ids (inference files and evaluation) on 20 prompts, tuned and base, greedy."""
    import qwen_sft.generation

    current, fast, tokenizer = both_paths
    prompts = [prompt_ids(tokenizer, build_messages(row, DEFAULT_SYSTEM_PROMPT)) for row in ROWS]
    kwargs = decoding_kwargs(tokenizer, 40)
    tuned = generate_token_ids(fast, prompts, kwargs, batch_size=8)
    assert tuned == generate_token_ids(current, prompts, kwargs, batch_size=8)
    # As compiled on a GPU: the last batch (4 of 20 rows) is filled up to 8 rows, and only its own rows come back.
    monkeypatch.setattr(qwen_sft.generation, "compiled_generation", lambda model: True)
    assert generate_token_ids(fast, prompts, kwargs, batch_size=8) == tuned
    monkeypatch.undo()
    assert [tokenizer.decode(row["ids"]) for row in tuned] == [row["output"] for row in ROWS]
    with adapter_disabled(fast), adapter_disabled(current):
        base = generate_token_ids(fast, prompts, kwargs, batch_size=8)
        assert base == generate_token_ids(current, prompts, kwargs, batch_size=8)
    assert base != tuned


@pytest.mark.slow
def test_fast_path_is_token_identical_for_streamed_chat_replies(both_paths):
    """stream_reply (chat and single-prompt inference) on 20 conversations, each with an earlier exchange."""
    current, fast, tokenizer = both_paths
    assert warm_up(fast, tokenizer) == 0.0  # nothing is compiled off CUDA
    for index, row in enumerate(ROWS):
        earlier = ROWS[index - 1]
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                    {"role": "user", "content": earlier["instruction"]},
                    {"role": "assistant", "content": earlier["output"]},
                    {"role": "user", "content": row["instruction"]}]
        pieces = []
        reply = stream_reply(fast, tokenizer, messages, on_text=pieces.append, max_new_tokens=40)
        assert reply == stream_reply(current, tokenizer, messages, max_new_tokens=40)
        assert "".join(pieces).strip() == reply.text


@pytest.mark.slow
def test_stages_take_the_fast_path_on_request(learned_adapter, tmp_path):
    """inference.py, chat.py and evaluate.py with --fast_generation true answer as with false, and say so."""
    adapter = learned_adapter / "Qwen_finetuning_model"
    answered = run_script("inference.py", "--adapter_dir", adapter, "--instruction", ROWS[1]["instruction"],
                          "--input", ROWS[1]["input"], "--fast_generation", "true", *EXACT, cwd=tmp_path)
    assert answered.returncode == 0, answered.stderr[-2000:]
    assert "fast generation: merged float32, static cache, not compiled off CUDA" in answered.stdout
    assert answered.stdout.rstrip().endswith(ROWS[1]["output"])

    chatted = run_script("chat.py", "--adapter_dir", adapter, "--fast_generation", "true", "--history_file", "",
                         *EXACT, cwd=tmp_path, input_text=f"{ROWS[0]['instruction']}\nexit\n")
    assert chatted.returncode == 0, chatted.stderr[-2000:]
    assert f"助手> {ROWS[0]['output']}\n" in chatted.stdout and "fast generation: merged" in chatted.stdout

    dataset = FIXTURES / "learning_20.jsonl"
    metrics = {}
    for setting in ("true", "false"):
        evaluated = run_script("evaluate.py", "--adapter_dir", adapter, "--dataset_path", dataset, "--eval_ratio",
                               "0.3", "--max_new_tokens", "24", "--gen_batch_size", "4", "--fast_generation",
                               setting, "--output_dir", tmp_path / setting, cwd=tmp_path)
        assert evaluated.returncode == 0, evaluated.stderr[-2000:]
        metrics[setting] = json.loads((tmp_path / setting / "metrics.json").read_text(encoding="utf-8"))
        assert metrics[setting]["fast_generation"]["used"] == (setting == "true")
    assert ((tmp_path / "true" / "predictions.jsonl").read_text(encoding="utf-8")
            == (tmp_path / "false" / "predictions.jsonl").read_text(encoding="utf-8"))
    for model in ("tuned", "base"):
        fast, current = (metrics[setting] if model == "tuned" else metrics[setting]["base"] for setting in ("true", "false"))
        assert fast["eval_loss"] == pytest.approx(current["eval_loss"], rel=1e-4)


def test_bad_flag_is_one_line_exit_2_and_help_lists_it(tmp_path):
    adapter = tmp_path / "Qwen_finetuning_model"  # the flag is checked before the model loads
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "tiny"}', encoding="utf-8")
    (adapter / "manifest.json").write_text('{"stage": "train", "base_model": "tiny"}', encoding="utf-8")
    result = run_script("inference.py", "--fast_generation", "maybe", cwd=tmp_path)
    assert result.returncode == 2 and "--fast_generation must be auto, true or false" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for script in ("chat.py", "evaluate.py"):
        assert "\n  --fast_generation auto\n" in run_script(script, "--help").stdout


@pytest.mark.gpu
def test_compiled_fast_path_on_gpu_first_token_within_half_a_second(adapter):
    """On CUDA: the merged bf16 model compiles at warm-up, then a 200-token prompt's first token is quick and
    the compiled answers equal the uncompiled ones."""
    import time

    fast, tokenizer, manifest = load_generation_model(adapter, fast_generation="true", **AS_TRAINED,
                                                      max_cache_len=512)
    assert manifest["fast_generation"]["compiled"]
    warm_up(fast, tokenizer)
    filler = " ".join(["report"] * 190)
    messages = [{"role": "user", "content": filler}]
    started, first = time.perf_counter(), []
    reply = stream_reply(fast, tokenizer, messages, max_new_tokens=32,
                         on_text=lambda piece: first or first.append(time.perf_counter() - started))
    assert first and first[0] <= 0.5 and reply.tokens > 0


@pytest.mark.slow
def test_generation_benchmark_smoke_run_records_every_measurement(tmp_path):
    """bench/generation_throughput.py --smoke: setup, old and new in their own processes, then the report."""
    result = run_script("bench/generation_throughput.py", "--smoke", "--load_in_4bit", "false", "--results_dir",
                        tmp_path, "--eval_rows", "6", "--old_eval_rows", "4", "--new_tokens", "4", "--bs1_runs", "1",
                        "--identity_prompts", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "generation_throughput.json").read_text(encoding="utf-8"))
    old, new, summary = record["old"], record["new"], record["summary"]
    assert old["load"]["backend"] == "hf" and not old["load"]["fast_generation"]["used"]
    assert new["load"]["fast_generation"]["used"] and "ids" not in new["eval_base"]
    failed = [key for part in (old, new) for key, value in part.items() if isinstance(value, dict) and "error" in value]
    assert not failed
    assert (old["eval_tuned"]["rows"], new["eval_tuned"]["rows"], new["eval_base"]["tokens"]) == (4, 6, 6 * 4)
    assert old["adapter_max_logit_change"] > 0 and new["adapter_max_logit_change"] > 0
    assert new["bs1"]["runs"][0]["tokens"] == 8 and 0 < new["bs1"]["first_token_s"] < new["bs1"]["runs"][0]["seconds"]
    assert new["bs1_reused_cache"]["runs"][0]["tokens"] == 8 and "bs1_reused_cache" not in old
    assert summary["identity"]["prompts"] == 4 and 0 <= summary["identity"]["identical_share"] <= 1
    assert summary["eval_tokens_per_s"]["tuned"]["speedup"] == pytest.approx(
        new["eval_tuned"]["tokens_per_s"] / old["eval_tuned"]["tokens_per_s"], rel=0.01)


def test_auto_keeps_the_4bit_path_on_a_24_gb_gpu_and_takes_the_fast_one_on_an_h200(tmp_path, monkeypatch):
    """The room check counts Qwen2.5-7B's bf16 size (on the meta device) against the GPU's free memory."""
    from transformers import Qwen2Config

    from qwen_sft.families import family

    Qwen2Config(**family.SHAPE_7B).save_pretrained(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    gib = 2**30
    for free, copies, expected in ((23 * gib, 1, False), (30 * gib, 1, True), (30 * gib, 2, False),
                                   (139 * gib, 2, True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *args, free=free: (free, 141 * gib))
        fast, reason = choose_fast("auto", str(tmp_path), copies)
        assert fast == expected, reason
    assert "GiB needed for 2 dense copies" in reason


def test_memory_check_on_an_unreachable_base_is_one_user_error():
    """`auto` sizes the base from its config before loading it: a hub id that cannot be had is a UserError."""
    from qwen_sft.fast_generation import dense_bytes

    with pytest.raises(UserError, match="could not load model 'nobody/no-such-model'"):
        dense_bytes("nobody/no-such-model", torch.bfloat16)
