"""Model loading for every stage: the backend choice, the base model (hub id, local folder or `tiny`), LoRA.

The backend is Unsloth when CUDA and `unsloth` are both present, otherwise transformers + PEFT, with
bitsandbytes 4-bit where requested. Unsloth must be imported before transformers to patch it, so nothing here
imports transformers at module level.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .adapter_manifest import ADAPTER_MANIFEST
from .cli import UserError
from .template import require_chat_template
from .tiny import TINY_NAME, tiny_path

BACKENDS = ("auto", "unsloth", "hf")
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_backend(requested: str) -> str:
    """'auto' means Unsloth when CUDA and unsloth are both present, else 'hf'."""
    if requested not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "unsloth" and not (cuda_available() and has_unsloth):
        raise UserError(
            "--backend unsloth needs a CUDA GPU and `pip install -r requirements-gpu.txt`; use --backend hf or auto"
        )
    if requested == "auto":
        return "unsloth" if has_unsloth and cuda_available() else "hf"
    return requested


def resolve_model_path(name: str) -> str:
    """`tiny` -> its cached folder; an existing folder -> itself; anything else is taken as a hub id."""
    if name == TINY_NAME:
        return str(tiny_path())
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UserError(f"base model folder {name} holds no config.json, so it is not a model folder; give a "
                            "hub id, a complete local model folder (config, weights, tokenizer), or `tiny`")
        return str(folder)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"base model folder {name} not found; give a hub id, a local model folder, or `tiny`")
    return name


def unreachable_model_error(name: str, error: Exception) -> UserError:
    return UserError(
        f"could not load model {name!r} ({type(error).__name__}: {str(error).splitlines()[0][:160]}); "
        "without hub access, download it elsewhere and pass the local folder (e.g. --base_model /models/Qwen2.5-7B-Instruct), "
        "or use --base_model tiny"
    )


def compute_dtype():
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(load_in_4bit: bool):
    if not load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype(),
        bnb_4bit_use_double_quant=True,
    )


def device_map():
    """Each process (one per GPU under a launcher) loads its own copy onto its own device."""
    if cuda_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return None


def load_base_model(name: str, backend: str, load_in_4bit: bool, max_seq_length: int, dtype=None):
    """Load the base model and its tokenizer with the chosen backend (`dtype` None = the backend's default)."""
    path = resolve_model_path(name)
    try:
        if backend == "unsloth":
            from unsloth import FastLanguageModel

            model, tokenizer = FastLanguageModel.from_pretrained(
                model_name=path,
                max_seq_length=max_seq_length,
                dtype=dtype,
                load_in_4bit=load_in_4bit,
                device_map=device_map(),
            )
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype or compute_dtype(),
                quantization_config=quantization_config(load_in_4bit),
                device_map=device_map(),
            )
    except OSError as error:
        raise unreachable_model_error(name, error) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def add_lora(model, backend: str, rank: int, alpha: int, dropout: float, target_modules: list[str], seed: int,
             gradient_checkpointing: bool):
    """Wrap the base model with trainable LoRA adapters; the base weights stay frozen."""
    check_target_modules(model, target_modules)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model,
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=target_modules,
            bias="none",
            use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
            random_state=seed,
        )
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def enable_recomputation(model, backend: str) -> None:
    """Gradient checkpointing switched on for a model that already has its adapters (add_lora's mode)."""
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_training(model, use_gradient_checkpointing="unsloth")
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_target_modules(model, target_modules: list[str]) -> None:
    """Each name must match a module as PEFT matches them (the whole name or its dotted end), or PEFT's
    all-linear: a UserError naming the model's linear layers, right after the model loads."""
    import torch

    names = [name for name, _ in model.named_modules()]
    missing = [target for target in target_modules if target != "all-linear"
               and not any(name == target or name.endswith("." + target) for name in names)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise UserError(f"--lora_target_modules: the model has no module named {', '.join(missing)}; its linear "
                        f"layers are {', '.join(linear)} (or pass all-linear)")


def adapter_base_path(adapter_dir: str, manifest: dict) -> str:
    """The base model an adapter was trained on, resolved; a base folder that is gone is a UserError."""
    name = manifest["base_model"]
    try:
        return resolve_model_path(name)
    except UserError:
        raise UserError(
            f"{adapter_dir}: its base model {name} is not there; put that folder back (or set base_model in "
            f"{Path(adapter_dir) / ADAPTER_MANIFEST}), or re-run Qwen_finetuning.py"
        ) from None


def chosen_base_path(adapter_dir: str, manifest: dict, base_model: str) -> str:
    """The base model to load, resolved; the one the adapter was trained on gets adapter_base_path's line."""
    if base_model == manifest["base_model"]:
        return adapter_base_path(adapter_dir, manifest)
    return resolve_model_path(base_model)


def load_adapter_tokenizer(adapter_dir: str):
    """The tokenizer saved with the adapter; it must carry the chat template training used."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    require_chat_template(tokenizer, adapter_dir)
    return tokenizer


def load_adapter_model(adapter_dir: str, *, base_model: str, backend: str, load_in_4bit: bool, max_seq_length: int):
    """Load base + adapter for evaluation, inference or chat, with the settings given (the stages settle `auto`
    ones from the adapter's manifest at parse time: inherit.py).

    Returns (model, tokenizer, loaded): loaded["base_model"] is the base loaded, loaded["backend_loaded"] the
    backend. The tokenizer, with its chat template, comes from the adapter folder.
    """
    backend = choose_backend(backend)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (it patches transformers, so it is imported before the tokenizer loads)
    tokenizer = load_adapter_tokenizer(adapter_dir)  # checked before the slow base-model load
    model, _ = load_base_model(base_model, backend, load_in_4bit, max_seq_length)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    return model, tokenizer, {"base_model": base_model, "backend_loaded": backend}
