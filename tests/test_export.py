"""export_model.py on the tiny model: the merged 16-bit folder loads with plain transformers and answers exactly as
base + adapter; the Ollama Modelfile; bad input."""

import json
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import FIXTURES, run_script
from qwen_sft.artifacts import sha256_file
from qwen_sft.generation import generate_batch
from qwen_sft.modeling import load_adapter_model
from qwen_sft.records import read_records
from qwen_sft.template import DEFAULT_SYSTEM_PROMPT, build_messages

ROWS = read_records(FIXTURES / "learning_20.jsonl")


@pytest.fixture(scope="module")
def adapter(learned_adapter):
    return learned_adapter / "Qwen_finetuning_model"


@pytest.fixture(scope="module")
def exported(adapter, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("export")
    result = run_script("export_model.py", "--adapter_dir", adapter, "--output_dir", workdir / "merged", cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir / "merged"


def safetensors_dtypes(path) -> set[str]:
    """The tensor types recorded in a .safetensors header (8-byte length, then JSON)."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def test_help_lists_every_setting():
    result = run_script("export_model.py", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--adapter_dir", "--output_dir", "--dtype", "--ollama_modelfile", "--system_prompt", "--backend"):
        assert f"\n  {flag} " in result.stdout
    assert "--dtype bfloat16" in result.stdout


def test_merged_folder_is_standalone_16_bit(exported, adapter):
    names = {path.name for path in exported.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "manifest.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}  # merged, not an adapter
    assert safetensors_dtypes(exported / "model.safetensors") == {"BF16"}
    assert not any(name.startswith(".") for name in names)  # no temporary leftovers

    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(adapter).chat_template
    end_of_turn, end_of_text = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    generation = json.loads((exported / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["eos_token_id"] == [end_of_turn, end_of_text]

    manifest = json.loads((exported / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["stage"] == "export" and manifest["backend"] == "hf" and manifest["dtype"] == "bfloat16"
    assert manifest["base_model"] == "tiny"
    assert manifest["adapter"]["sha256"] == sha256_file(adapter / "adapter_model.safetensors")


def test_merged_model_answers_like_base_plus_adapter(exported, adapter):
    tokenizer = AutoTokenizer.from_pretrained(exported, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(exported)  # plain transformers: no PEFT, no project code
    assert model.dtype == torch.bfloat16
    prompts = [tokenizer.apply_chat_template(build_messages(row), tokenize=False, add_generation_prompt=True)
               for row in ROWS]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        output = model.generate(**batch, max_new_tokens=40, do_sample=False)  # stops come from generation_config
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(end_of_turn in row.tolist() for row in new_tokens)  # every answer stopped at <|im_end|>
    merged_answers = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]

    peft_model, peft_tokenizer, _ = load_adapter_model(str(adapter), base_model="tiny", backend="hf",
                                                       load_in_4bit=False, max_seq_length=2048)
    unmerged = generate_batch(peft_model, peft_tokenizer, [build_messages(row) for row in ROWS], max_new_tokens=40)
    assert merged_answers == [answer["text"] for answer in unmerged] == [row["output"] for row in ROWS]


def test_ollama_modelfile(exported):
    modelfile = (exported / "Modelfile").read_text(encoding="utf-8")
    lines = modelfile.splitlines()
    assert "FROM ." in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    assert f'SYSTEM """{DEFAULT_SYSTEM_PROMPT}"""' in modelfile
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for piece in ("<|im_start|>system\n{{ .System }}<|im_end|>", "<|im_start|>user\n{{ .Content }}<|im_end|>",
                  "<|im_start|>assistant\n"):
        assert piece in template


def test_bad_input_is_one_line_exit_2_and_writes_nothing(adapter, tmp_path):
    missing = run_script("export_model.py", "--adapter_dir", tmp_path / "nowhere", cwd=tmp_path)
    bad_dtype = run_script("export_model.py", "--adapter_dir", adapter, "--dtype", "int8", cwd=tmp_path)
    over_adapter = run_script("export_model.py", "--adapter_dir", adapter, "--output_dir", adapter, cwd=tmp_path)
    assert [result.returncode for result in (missing, bad_dtype, over_adapter)] == [2, 2, 2]
    assert missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: no LoRA adapter there; run Qwen_finetuning.py first (or pass --adapter_dir)"
    ]
    assert bad_dtype.stderr.strip().splitlines() == [
        "error: --dtype must be one of bfloat16, float16, float32, got 'int8'"
    ]
    assert over_adapter.stderr.strip().splitlines() == [
        f"error: --output_dir {adapter} is the input --adapter_dir {adapter}; writing it would destroy that input: "
        "choose another --output_dir"
    ]
    assert (adapter / "adapter_config.json").is_file() and not list(tmp_path.iterdir())
