"""The training stage on the tiny model: it learns, it records, it resumes, and it refuses bad input."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, ROOT, run_script
from qwen_sft.adapter_manifest import read_adapter_manifest
from qwen_sft.cli import Config
from qwen_sft.generation import generate_batch
from qwen_sft.modeling import load_adapter_model
from qwen_sft.records import read_records
from qwen_sft.template import build_messages
from qwen_sft.tiny import tiny_path

# A short run that checkpoints every 2 steps, for the resume tests.
RESUME_FLAGS = [
    "--preset", "tiny_cpu", "--dataset_path", FIXTURES / "learning_20.jsonl",
    "--max_steps", "12", "--save_steps", "2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps",
    "2", "--learning_rate", "1e-3", "--eval_ratio", "0.2", "--eval_steps", "2",
    "--logging_steps", "2", "--save_total_limit", "20",
]


def test_learning_proof(learned_adapter):
    """Trained on 20 rows, the tiny model reproduces every answer greedily and stops at <|im_end|>."""
    adapter = str(learned_adapter / "Qwen_finetuning_model")
    model, tokenizer, _ = load_adapter_model(adapter, base_model="tiny", backend="hf", load_in_4bit=False,
                                             max_seq_length=2048)
    records = read_records(FIXTURES / "learning_20.jsonl")
    answers = generate_batch(model, tokenizer, [build_messages(r) for r in records], max_new_tokens=48)
    assert [a["text"] for a in answers] == [r["output"] for r in records]
    assert all(a["stopped"] for a in answers)
    manifest = read_adapter_manifest(adapter)
    assert manifest["base_model"] == "tiny" and manifest["backend"] == "hf"


def test_adapter_folder_is_complete(learned_adapter):
    adapter = learned_adapter / "Qwen_finetuning_model"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "loss_curve.png", "manifest.json"):
        assert (adapter / name).is_file(), name
    assert (adapter / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (learned_adapter / "Qwen_finetuning_tokenizer" / "tokenizer.json").is_file()
    assert list((learned_adapter / "outputs" / "runs").rglob("events.out.tfevents.*"))
    manifest = json.loads((adapter / "manifest.json").read_text())
    dataset = FIXTURES / "learning_20.jsonl"
    import hashlib

    assert manifest["dataset"] == {"path": str(dataset), "sha256": hashlib.sha256(dataset.read_bytes()).hexdigest(),
                                   "rows": 20, "formats": {"alpaca": 20}, "ignored_fields": {}}
    assert manifest["config"]["MAX_STEPS"] == 300 and manifest["config"]["LEARNING_RATE"] == 3e-3
    assert manifest["global_step"] == 300 and manifest["wall_time_s"] > 0
    assert manifest["tokens"]["real_tokens"] > 0 and 0 < manifest["tokens"]["real_token_share"] <= 1
    assert manifest["versions"]["transformers"] == "5.17.0" and manifest["world_size"] == 1
    assert [row["step"] for row in manifest["log_history"] if "loss" in row] == [50, 100, 150, 200, 250, 300]


def _tiny_config(tmp_path, **overrides) -> Config:
    import Qwen_finetuning as stage

    values = {name: getattr(stage, name) for name in dir(stage) if name.isupper()}
    values.update(
        BASE_MODEL="tiny", LOAD_IN_4BIT=False, DATASET_PATH=str(FIXTURES / "learning_20.jsonl"), MAX_STEPS=3,
        OPTIM="adamw_torch", LEARNING_RATE=1e-2, EVAL_RATIO=0.0, GRADIENT_CHECKPOINTING=False, SAVE_STEPS=100,
        OUTPUT_DIR=str(tmp_path / "outputs"), ADAPTER_DIR=str(tmp_path / "adapter"),
        TOKENIZER_DIR=str(tmp_path / "tokenizer"),
    )
    values.update(overrides)
    return Config(values)


def test_lora_weights_change_and_base_weights_do_not(tmp_path):
    from qwen_sft.training import train

    base = load_file(tiny_path() / "model.safetensors")
    trainer = train(_tiny_config(tmp_path), "Qwen_finetuning.py")
    state = {name: tensor.detach().cpu() for name, tensor in trainer.model.state_dict().items()}
    lora_b = [tensor for name, tensor in state.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)  # B starts at zero: training moved it
    base_layers = {name: tensor for name, tensor in state.items() if "base_layer.weight" in name}
    assert len(base_layers) == 2 * 7
    for name, tensor in base_layers.items():
        original = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(tensor, base[original]), name
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)


@pytest.mark.slow
def test_benchmarks_hook_in_through_callbacks_and_a_trainer_class(tmp_path):
    """How bench/profile_training.py and the fault tests watch a run without patching the stage: extra callbacks,
    and a function returning the trainer class, called by train() once the backend is loaded."""
    from transformers import TrainerCallback

    from qwen_sft.training import sft_trainer_class, train

    seen = {"micro_batches": 0, "steps_ended": []}

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen["steps_ended"].append(state.global_step)

    def counting_trainer_class():
        class CountingTrainer(sft_trainer_class()):
            def training_step(self, model, inputs, *args, **kwargs):
                seen["micro_batches"] += 1
                return super().training_step(model, inputs, *args, **kwargs)

        return CountingTrainer

    trainer = train(_tiny_config(tmp_path, MAX_STEPS=2, GRADIENT_ACCUMULATION_STEPS=2), "Qwen_finetuning.py",
                    callbacks=[StepEnds()], trainer_class=counting_trainer_class)
    assert seen == {"micro_batches": 4, "steps_ended": [1, 2]}
    assert type(trainer).__name__ == "CountingTrainer" and trainer.state.global_step == 2


def _adapter_weights(folder: Path) -> dict:
    return load_file(folder / "adapter_model.safetensors")


def _assert_same_weights(first: dict, second: dict):
    assert first.keys() == second.keys()
    for name in first:
        scale = first[name].abs().max().clamp(min=1e-12)
        assert ((first[name] - second[name]).abs().max() / scale) <= 1e-5, name


def _start(workdir: Path, *extra):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "Qwen_finetuning.py"), *map(str, RESUME_FLAGS), *extra],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for_checkpoint(process, checkpoint: Path, timeout=240):
    deadline = time.time() + timeout
    while not (checkpoint / "trainer_state.json").is_file():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run_script("Qwen_finetuning.py", *RESUME_FLAGS, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, uninterrupted_run):
    process = _start(tmp_path)
    _wait_for_checkpoint(process, tmp_path / "outputs" / "checkpoint-2")
    process.kill()  # SIGKILL: no chance to clean up, as in a crash or a pre-empted machine
    process.wait()
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "outputs").glob("checkpoint-*"))
    assert saved and max(saved) < 12, saved  # the kill came before the run finished
    assert not (tmp_path / "Qwen_finetuning_model").exists()
    # A later checkpoint cut short by the kill, as an interrupted save would leave it.
    partial = tmp_path / "outputs" / "checkpoint-11"
    partial.mkdir(exist_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"")

    resumed = run_script("Qwen_finetuning.py", *RESUME_FLAGS, "--resume_from_checkpoint", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping outputs/checkpoint-11: incomplete or corrupt checkpoint" in resumed.stdout
    assert f"resuming from outputs/checkpoint-{max(saved)}" in resumed.stdout
    _assert_same_weights(
        _adapter_weights(uninterrupted_run / "Qwen_finetuning_model"),
        _adapter_weights(tmp_path / "Qwen_finetuning_model"),
    )
    manifest = json.loads((tmp_path / "Qwen_finetuning_model" / "manifest.json").read_text())
    assert manifest["resumed_from"] == f"outputs/checkpoint-{max(saved)}" and manifest["global_step"] == 12
    assert manifest["final_eval_loss"] > 0
    assert manifest["final_eval_perplexity"] == pytest.approx(math.exp(manifest["final_eval_loss"]))
    assert manifest["best_checkpoint"].startswith("outputs/checkpoint-")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    process = _start(tmp_path)
    _wait_for_checkpoint(process, tmp_path / "outputs" / "checkpoint-2")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]
    assert "SIGTERM received" in output
    assert "Resume with: python Qwen_finetuning.py --resume_from_checkpoint auto" in output
    step = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert f"checkpoint outputs/checkpoint-{step} is saved" in output
    assert (tmp_path / "outputs" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (tmp_path / "Qwen_finetuning_model").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "data.jsonl: file not found"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n', "data.jsonl:2: malformed JSON"),
        ('{"instruction": "a", "output": "b"}\n{"output": "b"}\n', "data.jsonl:2: a row of unknown shape (keys 'output')"),
        ('{"instruction": "a", "output": "b"}\n', "1 training rows (after the split and length limit) are fewer than one batch"),
    ],
)
def test_bad_dataset_exits_2_with_one_line_and_writes_nothing(tmp_path, content, message):
    if content is not None:
        (tmp_path / "data.jsonl").write_text(content, encoding="utf-8")
    result = run_script("Qwen_finetuning.py", "--base_model", "tiny", "--dataset_path", "data.jsonl",
                        "--per_device_train_batch_size", "2", cwd=tmp_path)  # `auto` would train on one row
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["data.jsonl"] if content else [])


def test_packing_is_refused_without_unsloth(tmp_path):
    result = run_script("Qwen_finetuning.py", "--base_model", "tiny", "--packing", "--dataset_path",
                        FIXTURES / "learning_20.jsonl", cwd=tmp_path)
    assert result.returncode == 2 and "--packing true needs the Unsloth backend" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_plain_sdpa_lets_packed_examples_attend_across_boundaries():
    """Why packing is refused off Unsloth: position ids alone do not separate examples in transformers' sdpa."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_path())
    examples = [{"input_ids": list(range(10, 10 + length))} for length in (7, 12)]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    with torch.no_grad():
        separate = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    assert torch.allclose(separate[0, :7], together[0, :7], atol=1e-5)  # the first example sees only itself
    assert not torch.allclose(separate[1, :12], together[0, 7:19], atol=1e-2)  # the second sees the first


def test_unreachable_base_model_names_it(tmp_path):
    result = run_script("Qwen_finetuning.py", "--dataset_path", FIXTURES / "learning_20.jsonl", cwd=tmp_path)
    assert result.returncode == 2
    assert "could not load model 'Qwen/Qwen2.5-7B-Instruct'" in result.stderr and "--base_model" in result.stderr


def test_help_lists_the_seed_defaults():
    result = run_script("Qwen_finetuning.py", "--help")
    assert result.returncode == 0
    for line in ("--base_model Qwen/Qwen2.5-7B-Instruct", "--lora_r 16", "--lora_alpha 32", "--optim adamw_8bit",
                 "--num_train_epochs 3", "--learning_rate 0.0002", "--neftune_noise_alpha 5.0", "--split_seed 42",
                 "--seed 3407", "--resume_from_checkpoint false"):
        assert line in result.stdout, line


def test_answer_only_loss_equals_the_models_own_loss_and_gradients():
    """The CPU loss runs the LM head on labelled positions only; value and LoRA gradients match the full forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_sft.training import answer_only_loss

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path()),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(0, 151000, (2, 12))
    labels = ids.clone()
    labels[0, :7], labels[1, :4] = -100, -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    gradients = []
    for loss_of in (lambda: model(**inputs).loss, lambda: answer_only_loss(model, inputs)):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        gradients.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (full_loss, full_grads), (answer_loss, answer_grads) = gradients
    torch.testing.assert_close(answer_loss, full_loss)
    for full, answer in zip(full_grads, answer_grads, strict=True):
        torch.testing.assert_close(answer, full, rtol=1e-4, atol=1e-6)
    summed = answer_only_loss(model, inputs, num_items_in_batch=torch.tensor(2 * 12))  # token-weighted form
    torch.testing.assert_close(summed * 24, full_loss * (labels[:, 1:] != -100).sum())
