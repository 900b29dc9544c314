"""`auto` batch shapes: explicit settings win, the CPU keeps the seed's 2 × 4, a step keeps the seed's 8 rows on any
number of processes, the memory model (fed fake numbers here) picks the largest micro-batch that fits, and an
out-of-memory in the first step steps down once."""

import json

import pytest
import torch

from qwen_sft.batching import (
    AUTO,
    BATCH_FLAGS,
    MemoryModel,
    ModelSize,
    Rows,
    choose_batch,
    model_size,
    parse_batch_flags,
    step_down,
)
from qwen_sft.cli import UserError
from qwen_sft.presets import PRESETS

AUTO_ALL = dict.fromkeys(BATCH_FLAGS, AUTO)
QWEN_7B = model_size(type("Config", (), {"hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944,
                                         "num_attention_heads": 28, "num_key_value_heads": 4}),
                     16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
MIX = Rows(longest=1087, mean=545, packed=False)  # the data stage's 1,500-row mix
PACKED = Rows(longest=2048, mean=2048, packed=True)
# Fake numbers: 1 GiB per micro-batch row without recomputation, 0.1 GiB with it, nothing fixed.
FAKE = MemoryModel(fixed_gib=0.0, bytes_per_lora_parameter=0.0,
                   activation_bytes={(False, False): 2**30, (False, True): 2**30 / 10,
                                     (True, False): 2**30, (True, True): 2**30 / 10})
ONE_UNIT = ModelSize(layers=1, hidden=0, intermediate=1, lora_parameters=0)  # width 1
ONE_TOKEN = Rows(longest=1, mean=1, packed=False)


def shape(choice):
    return (choice.shape.micro_batch, choice.shape.accumulation, choice.shape.recompute)


def test_lora_parameters_of_the_7b_shape():
    assert QWEN_7B.lora_parameters == 40_370_176 and QWEN_7B.width == 28 * (3584 + 18944)


@pytest.mark.parametrize(("free_gib", "expected"), [
    (100, (8, 1, False)),  # 8 GiB fits: the largest micro-batch, no recomputation
    (8 / 0.9, (8, 1, False)),  # exactly at the headroom
    (7, (8, 1, True)),  # 8 rows fit only with recomputation, which beats 4 rows without it
    (0.5, (4, 2, True)),
    (0.1, (1, 8, True)),  # nothing fits: the smallest shape, said so in the line
])
def test_the_largest_micro_batch_that_fits_then_recomputation_only_where_needed(free_gib, expected):
    choice = choose_batch(AUTO_ALL, 1, 1000, ONE_TOKEN, ONE_UNIT, free_gib, FAKE)
    assert shape(choice) == expected
    assert choice.line().startswith(f"batch: auto chose {choice.shape}: ")
    assert ("more than the estimate allows" in choice.reason) == (free_gib == 0.1)


def test_the_line_says_what_auto_chose_and_why():
    choice = choose_batch(AUTO_ALL, 1, 1350, MIX, QWEN_7B, 74.2)
    assert choice.line() == ("batch: auto chose 8 × 1, no recomputation: 33 GiB needed of 74 free "
                             "(rows up to 1087 tokens)")
    assert choice.record()["auto"] == sorted(BATCH_FLAGS) and choice.record()["need_gib"] == pytest.approx(33, abs=1)


@pytest.mark.parametrize(("free_gib", "unpacked", "packed"), [
    (72.6, (8, 1, False), (4, 2, False)),  # an 80 GB card after the 7B's 5.2 GiB: packed as --preset h200_fast
    (18.3, (8, 1, True), (4, 2, True)),  # a 24 GB card: packed as --preset gpu24
    (10.3, (8, 1, True), (4, 2, True)),  # 16 GB
])
def test_the_7b_on_each_card_and_the_presets_are_what_auto_chooses_packed(free_gib, unpacked, packed):
    assert shape(choose_batch(AUTO_ALL, 1, 1350, MIX, QWEN_7B, free_gib)) == unpacked
    assert shape(choose_batch(AUTO_ALL, 1, 1350, PACKED, QWEN_7B, free_gib)) == packed
    preset = PRESETS["training"]["h200_fast" if free_gib > 48 else "gpu24"]
    assert packed == tuple(preset[name] for name in BATCH_FLAGS)


def test_explicit_values_always_win():
    given = {"PER_DEVICE_TRAIN_BATCH_SIZE": 16, "GRADIENT_ACCUMULATION_STEPS": 3, "GRADIENT_CHECKPOINTING": False}
    for free_gib in (None, 0.01, 1000):
        choice = choose_batch(given, 1, 1000, ONE_TOKEN, ONE_UNIT, free_gib, FAKE)
        assert shape(choice) == (16, 3, False) and choice.line() == "batch: 16 × 3, no recomputation (as given)"
        assert step_down(choice) is None  # explicit values never step down
    # One given, the rest auto: the given one stays, the others keep 8 rows a step and fit the memory.
    micro_given = {**AUTO_ALL, "PER_DEVICE_TRAIN_BATCH_SIZE": 2}
    assert shape(choose_batch(micro_given, 1, 1000, ONE_TOKEN, ONE_UNIT, 100, FAKE)) == (2, 4, False)
    assert shape(choose_batch(micro_given, 1, 1000, ONE_TOKEN, ONE_UNIT, 1, FAKE)) == (2, 4, True)
    accumulation_given = {**AUTO_ALL, "GRADIENT_ACCUMULATION_STEPS": 8}
    assert shape(choose_batch(accumulation_given, 1, 1000, ONE_TOKEN, ONE_UNIT, 100, FAKE)) == (1, 8, False)
    recompute_given = {**AUTO_ALL, "GRADIENT_CHECKPOINTING": True}
    assert shape(choose_batch(recompute_given, 1, 1000, ONE_TOKEN, ONE_UNIT, 100, FAKE)) == (8, 1, True)


def test_without_a_gpu_or_a_model_shape_auto_keeps_the_seeds_split():
    for size, free_gib, why in ((ONE_UNIT, None, "no CUDA GPU"), (None, 80.0, "the model's shape is unknown")):
        choice = choose_batch(AUTO_ALL, 1, 1000, ONE_TOKEN, size, free_gib, FAKE)
        assert shape(choice) == (2, 4, True) and choice.reason == f"the seed's split ({why})"
    no_config = type("Config", (), {"hidden_size": 8})
    assert model_size(no_config, 16, ["q_proj"]) is None


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("free_gib", [None, 0.3, 100])
def test_a_step_takes_the_seeds_8_rows_on_any_number_of_processes(world_size, free_gib):
    for settings in (AUTO_ALL, {**AUTO_ALL, "GRADIENT_CHECKPOINTING": False}):
        choice = choose_batch(settings, world_size, 1000, ONE_TOKEN, ONE_UNIT, free_gib, FAKE)
        assert choice.shape.micro_batch * choice.shape.accumulation * world_size == 8, (choice, world_size)


def test_a_micro_batch_never_exceeds_the_rows_there_are():
    assert shape(choose_batch(AUTO_ALL, 2, 6, ONE_TOKEN, ONE_UNIT, 100, FAKE)) == (2, 2, False)


def test_one_step_down_smaller_micro_batch_then_recomputation():
    choice = choose_batch(AUTO_ALL, 1, 1000, ONE_TOKEN, ONE_UNIT, 100, FAKE)
    smaller = step_down(choice)
    assert shape(smaller) == (4, 2, False) and "stepped down from 8 × 1, no recomputation" in smaller.reason
    one_row = choose_batch({**AUTO_ALL, "PER_DEVICE_TRAIN_BATCH_SIZE": 1}, 1, 1000, ONE_TOKEN, ONE_UNIT, 100, FAKE)
    assert shape(one_row) == (1, 8, False) and shape(step_down(one_row)) == (1, 8, True)
    assert step_down(step_down(one_row)) is None


def test_flags_parse_as_auto_or_a_value():
    values = {"PER_DEVICE_TRAIN_BATCH_SIZE": "4", "GRADIENT_ACCUMULATION_STEPS": "Auto",
              "GRADIENT_CHECKPOINTING": "false"}
    parse_batch_flags(values)
    assert values == {"PER_DEVICE_TRAIN_BATCH_SIZE": 4, "GRADIENT_ACCUMULATION_STEPS": AUTO,
                      "GRADIENT_CHECKPOINTING": False}
    with pytest.raises(UserError, match="^--per_device_train_batch_size \\(or auto\\) expects an integer, got 'x'$"):
        parse_batch_flags({**values, "PER_DEVICE_TRAIN_BATCH_SIZE": "x"})


def _out_of_memory_once(failures: dict):
    """A trainer class whose first micro-batch runs out of memory `failures["left"]` times (CPU tensors)."""
    from qwen_sft.training import sft_trainer_class

    class OutOfMemoryOnce(sft_trainer_class()):
        def training_step(self, model, inputs, *args, **kwargs):
            failures["micro_batches"].append(len(inputs["input_ids"]))
            if failures["left"]:
                failures["left"] -= 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().training_step(model, inputs, *args, **kwargs)

    return OutOfMemoryOnce


def test_out_of_memory_in_the_first_step_steps_down_once_under_auto(tmp_path, capsys):
    from qwen_sft.training import train
    from test_training import _tiny_config

    failures = {"left": 1, "micro_batches": []}
    trainer = train(_tiny_config(tmp_path, MAX_STEPS=2, GRADIENT_CHECKPOINTING=AUTO), "Qwen_finetuning.py",
                    trainer_class=lambda failures=failures: _out_of_memory_once(failures))
    out = capsys.readouterr().out
    assert "batch: auto chose 2 × 4, recomputation: the seed's split (no CUDA GPU)" in out
    assert ("CUDA out of memory in the first step with 2 × 4, recomputation: stepping down to 1 × 8, "
            "recomputation") in out
    assert failures["micro_batches"] == [2] + [1] * 16 and trainer.state.global_step == 2
    manifest = json.loads((tmp_path / "adapter" / "manifest.json").read_text())
    assert manifest["batch_choice"]["micro_batch"] == 1 and manifest["effective_batch_size"] == 8
    assert manifest["config"]["GRADIENT_ACCUMULATION_STEPS"] == 8 and manifest["batch_choice"]["auto"]


def test_out_of_memory_with_explicit_values_or_twice_is_one_line(tmp_path):
    from qwen_sft.training import train
    from test_training import _tiny_config

    for name, overrides, left in (("explicit", {"PER_DEVICE_TRAIN_BATCH_SIZE": 2, "GRADIENT_ACCUMULATION_STEPS": 4,
                                                "GRADIENT_CHECKPOINTING": True}, 1),
                                  ("twice", {"GRADIENT_CHECKPOINTING": AUTO}, 2)):
        failures = {"left": left, "micro_batches": []}
        with pytest.raises(UserError, match="^CUDA out of memory at step 0: lower --per_device_train_batch_size"):
            train(_tiny_config(tmp_path / name, MAX_STEPS=2, **overrides), "Qwen_finetuning.py",
                  trainer_class=lambda failures=failures: _out_of_memory_once(failures))
        assert len(failures["micro_batches"]) == left


def test_the_seeds_split_is_one_flag_away():
    from qwen_sft.cli import FROM_COMMAND_LINE
    from qwen_sft.presets import with_preset

    values = {"PRESET": "seed", **AUTO_ALL}
    with_preset("training")(values, {"PRESET": FROM_COMMAND_LINE})
    assert tuple(values[name] for name in BATCH_FLAGS) == (2, 4, True)
    assert shape(choose_batch(values, 1, 1000, ONE_TOKEN, ONE_UNIT, 1000, FAKE)) == (2, 4, True)


def test_auto_trains_a_dataset_smaller_than_the_seeds_micro_batch():
    assert shape(choose_batch(AUTO_ALL, 1, 1, ONE_TOKEN, ONE_UNIT, None, FAKE)) == (1, 8, True)
    assert shape(choose_batch(AUTO_ALL, 2, 3, ONE_TOKEN, ONE_UNIT, None, FAKE)) == (1, 4, True)


def test_at_one_row_the_step_down_turns_recomputation_on(tmp_path, capsys, monkeypatch):
    """As on a GPU (free memory faked): `auto` drops recomputation for one row per micro-batch, the first step runs
    out of memory, and the stage trains again with recomputation switched on."""
    from qwen_sft import training
    from test_training import _tiny_config

    monkeypatch.setattr(training, "least_free_gpu_gib", lambda: 1000.0)
    failures = {"left": 1, "micro_batches": []}
    trainer = training.train(_tiny_config(tmp_path, MAX_STEPS=1, PER_DEVICE_TRAIN_BATCH_SIZE=1,
                                          GRADIENT_CHECKPOINTING=AUTO), "Qwen_finetuning.py",
                             trainer_class=lambda failures=failures: _out_of_memory_once(failures))
    out = capsys.readouterr().out
    assert "batch: auto chose 1 × 8, no recomputation: " in out
    assert "stepping down to 1 × 8, recomputation" in out and trainer.state.global_step == 1
    assert trainer.model.is_gradient_checkpointing and len(failures["micro_batches"]) == 1 + 8
