"""The export stage behind export_model.py: merge the LoRA adapter into its base model and write a standalone
16-bit model folder (safetensors weights, config, generation config, tokenizer with the chat template training
used, manifest) that plain transformers, vLLM and llama.cpp's convert_hf_to_gguf.py load; optionally a GGUF file
written by that converter, and an Ollama Modelfile.

With Unsloth, its merged save does the merge. Otherwise PEFT merges into a base loaded fresh in 16 bits (or
float32), never into a 4-bit one, whose rounding would be baked into every weight.
"""

from __future__ import annotations

import time
from pathlib import Path

from .adapter_manifest import read_adapter_manifest
from .artifacts import (
    FOLDER,
    Output,
    atomic_directory,
    build_manifest,
    claim_outputs,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from .cli import UserError
from .families import family
from .generation import stop_token_ids
from .llama_cpp import GGUF_TYPES, LLAMA_CPP_PYTHON, convert, converter_dir, gguf_summary
from .locking import folder_lock
from .modeling import (
    ADAPTER_MANIFEST,
    choose_backend,
    chosen_base_path,
    load_adapter_tokenizer,
    load_base_model,
)
from .qwen_tokenizer_build import write_portable_tokenizer_config

EXPORT_DTYPES = ("bfloat16", "float16", "float32")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODELFILE = "Modelfile"


def modelfile_system(system_prompt: str) -> str:
    check_system_prompt_for_modelfile(system_prompt)
    return f'SYSTEM """{system_prompt}"""'


def ollama_modelfile(cfg, stop_tokens: list[str], context_length: int, gguf_file: str = "") -> str:
    """Ollama's Modelfile: FROM the GGUF when one was written (Ollama imports safetensors only for some families),
    the ChatML template, the training system prompt, its context and the seed's sampling settings."""
    lines = [
        "# Ollama model of this folder: `ollama create NAME -f Modelfile` here, then `ollama run NAME`.",
        f"FROM ./{gguf_file}" if gguf_file else "FROM .",
        f'TEMPLATE """{family.OLLAMA_TEMPLATE}"""',
        modelfile_system(cfg.system_prompt),
        f"PARAMETER num_ctx {context_length}",
        f"PARAMETER temperature {cfg.temperature}",
        f"PARAMETER top_p {cfg.top_p}",
        f"PARAMETER repeat_penalty {cfg.repetition_penalty}",
        *(f'PARAMETER stop "{token}"' for token in stop_tokens),
    ]
    return "\n".join(lines) + "\n"


def check_system_prompt_for_modelfile(system_prompt: str) -> None:
    """The Modelfile quotes the system prompt in triple quotes, which it cannot escape: a prompt holding them would
    end the SYSTEM block early and add its own lines to the Modelfile (so would a final quote, next to the closing
    ones)."""
    if '"""' in system_prompt or system_prompt.endswith('"'):
        raise UserError('--system_prompt holds """ (or ends with "), which an Ollama Modelfile cannot quote; '
                        "remove it, or pass --ollama_modelfile false")


def merge_with_peft(adapter_dir: str, base_model: str, folder: Path, dtype, max_seq_length: int) -> None:
    from peft import PeftModel

    model, _ = load_base_model(base_model, "hf", load_in_4bit=False, max_seq_length=max_seq_length, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(folder)


def merge_with_unsloth(adapter_dir: str, folder: Path, dtype, max_seq_length: int, tokenizer) -> None:
    from unsloth import FastLanguageModel

    # Loading the adapter folder brings its base in 16 bits (load_in_4bit=False), so the merge is not rounded.
    model, _ = FastLanguageModel.from_pretrained(
        model_name=adapter_dir, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=False
    )
    # safe_serialization=None keeps safetensors even where Unsloth would fall back to a pickle (few CPUs).
    model.save_pretrained_merged(str(folder), tokenizer, save_method="merged_16bit", safe_serialization=None)


def write_generation_config(folder: Path, tokenizer) -> None:
    """Make plain generate() (and vLLM) stop at <|im_end|> as well as <|endoftext|>."""
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(folder)
    generation.eos_token_id = stop_token_ids(tokenizer)
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(folder)


def gguf_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def write_gguf(cfg, folder: Path, tokenizer) -> dict:
    """llama.cpp's converter on the merged folder, then its gguf-py reads the file back: Qwen's pre-tokenizer, the
    stop and pad ids and the chat template must be there. The GGUF lands inside the folder, so it appears with it."""
    outfile = folder / gguf_name(cfg.gguf)
    convert(folder, outfile, cfg.gguf, Path(cfg.output_dir).resolve().name, cfg.llama_cpp_dir)
    summary = gguf_summary(outfile, cfg.llama_cpp_dir)
    expected = {"pre_tokenizer": family.GGUF_PRE_TOKENIZER, "eos_token_id": tokenizer.eos_token_id,
                "padding_token_id": tokenizer.pad_token_id, "chat_template": tokenizer.chat_template}
    wrong = [f"{key} {summary[key]!r:.40}" for key, value in expected.items() if summary[key] != value]
    if wrong:
        raise UserError(f"{outfile.name} from llama.cpp's converter is not as expected: {', '.join(wrong)}")
    converter = cfg.llama_cpp_dir or f"llama-cpp-python {LLAMA_CPP_PYTHON} sdist"
    checked = {key: value for key, value in summary.items() if key != "chat_template"}
    return {"file": outfile.name, "type": cfg.gguf, "sha256": sha256_file(outfile), "converter": converter, **checked}


def check_export_flags(cfg) -> None:
    if cfg.dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {cfg.dtype!r}")
    if cfg.gguf and cfg.gguf not in GGUF_TYPES:
        raise UserError(f"--gguf must be one of {', '.join(GGUF_TYPES)} (or empty for none), got {cfg.gguf!r}")
    if cfg.ollama_modelfile:
        check_system_prompt_for_modelfile(cfg.system_prompt)
    if cfg.gguf:
        converter_dir(cfg.llama_cpp_dir)  # fetched (or found missing) before the merge, not after it


def export_merged(cfg) -> None:
    check_export_flags(cfg)
    # The adapter is locked shared before its manifest is read again (parse time read it unlocked): a training run
    # cannot replace it meanwhile or during the merge (nor start into it).
    with folder_lock(cfg.adapter_dir, "--adapter_dir", shared=True):
        manifest = read_adapter_manifest(cfg.adapter_dir)
        base_path = chosen_base_path(cfg.adapter_dir, manifest, cfg.base_model)
        inputs = {"--adapter_dir": cfg.adapter_dir, "base model": base_path if Path(base_path).exists() else ""}
        with claim_outputs(inputs, [Output("--output_dir", cfg.output_dir, FOLDER)], "export",
                           cfg.overwrite_output) as targets:
            _export(cfg, manifest, targets["--output_dir"])


def _export(cfg, manifest: dict, output_dir: Path) -> None:
    backend = choose_backend(cfg.backend)
    if backend == "unsloth" and cfg.base_model != manifest["base_model"]:
        raise UserError(f"--base_model {cfg.base_model}: Unsloth's merge loads the base the adapter names; pass "
                        "--backend hf to merge into another base")
    if backend == "unsloth":
        import unsloth  # noqa: F401  (it patches transformers, so it is imported before the tokenizer loads)
    tokenizer = load_adapter_tokenizer(cfg.adapter_dir)
    import torch

    dtype = getattr(torch, cfg.dtype)
    print(f"merging {cfg.adapter_dir} into {cfg.base_model} ({backend}, {cfg.dtype})")
    started = time.time()
    adapter_sha256 = sha256_file(Path(cfg.adapter_dir) / ADAPTER_WEIGHTS)  # of the weights the merge reads
    with atomic_directory(output_dir) as folder:
        if backend == "unsloth":
            merge_with_unsloth(cfg.adapter_dir, folder, dtype, cfg.max_seq_length, tokenizer)
        else:
            merge_with_peft(cfg.adapter_dir, cfg.base_model, folder, dtype, cfg.max_seq_length)
        tokenizer.save_pretrained(folder)  # the adapter's tokenizer: the chat template training used
        write_portable_tokenizer_config(folder)
        write_generation_config(folder, tokenizer)
        stops = tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer))
        gguf = write_gguf(cfg, folder, tokenizer) if cfg.gguf else None
        if cfg.ollama_modelfile:
            modelfile = ollama_modelfile(cfg, stops, cfg.max_seq_length, gguf["file"] if gguf else "")
            write_text_atomic(folder / MODELFILE, modelfile)
        if sha256_file(Path(cfg.adapter_dir) / ADAPTER_WEIGHTS) != adapter_sha256:
            raise UserError(f"{cfg.adapter_dir}/{ADAPTER_WEIGHTS} changed during the merge (another program wrote "
                            f"it); the previous {cfg.output_dir} is unchanged: run the export again")
        write_json_atomic(
            folder / ADAPTER_MANIFEST,
            build_manifest(
                "export", cfg, base_model=cfg.base_model, backend=backend, dtype=cfg.dtype,
                adapter={"path": cfg.adapter_dir, "sha256": adapter_sha256,
                         "trained": manifest.get("created"), "dataset": manifest.get("dataset")},
                stop_tokens=stops, gguf=gguf, wall_time_s=round(time.time() - started, 2),
            ),
        )
    extra = f", {gguf['file']}" if gguf else ""
    extra += f" and an Ollama {MODELFILE}" if cfg.ollama_modelfile else ""
    print(f"merged {cfg.dtype} model, tokenizer, generation config, manifest{extra} written to {cfg.output_dir}/")
