"""The fast generation path of chat, inference and evaluation: the LoRA merged into a dense copy of the base, a
static KV cache, and (on CUDA) transformers' automatic torch.compile of the decoding step.

Why: the 4-bit base + PEFT adapter decodes at about 20 tokens/s on an H200 because every step launches hundreds
of small kernels (dequantize, base matmul, two LoRA matmuls per projection). A merged bf16 model has one matmul
per projection, and with a static cache its decoding step compiles into CUDA graphs.

The merge follows the issue's rule: each base weight is dequantized (NF4 via bitsandbytes) to fp32, the LoRA
product scaling * B @ A is added in fp32, and only the sum is cast to the compute dtype. Nothing is re-quantized.
Evaluation's base model is the same dense model with the un-merged weights swapped in (`adapter_disabled`),
copied in place so compiled CUDA graphs stay valid.

FAST_GENERATION = auto picks this path on a CUDA GPU whose free memory holds the dense copies next to the 4-bit
model that is merged from (plus a margin for the cache); otherwise, and always on CPU, the 4-bit path runs as
before. `true` forces it (also on CPU, where nothing is compiled: the tests' exactness check), `false` never.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time

from .cli import UserError
from .generation import compiled_generation, decoding_kwargs, model_device, start_in_generation_thread
from .template import prompt_ids

FAST_GENERATION_CHOICES = ("auto", "true", "false")
MEMORY_MARGIN_GIB = 4.0  # KV cache, activations and the compiled graphs' pools, beside the weights
FOUR_BIT_SHARE = 0.35  # an NF4 model's size over its bf16 size (double-quantized, norms and embeddings in bf16)
WARM_UP_TOKENS = 8  # decoding steps at load time: compile, then CUDA-graph warm-up, recording and a replay


def resolve_fast_generation(setting: str) -> str:
    word = setting.strip().lower()
    if word not in FAST_GENERATION_CHOICES:
        raise UserError(f"--fast_generation must be auto, true or false, got {setting!r}")
    return word


def dense_bytes(base_path: str, dtype) -> int:
    """Bytes of the base model's weights in `dtype`, counted on the meta device (nothing is loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling import unreachable_model_error

    try:
        config = AutoConfig.from_pretrained(base_path)
    except OSError as error:  # an unreachable or uncached hub id: one line, as the model load itself would say
        raise unreachable_model_error(base_path, error) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters()) * torch.tensor([], dtype=dtype).element_size()


def choose_fast(setting: str, base_path: str, copies: int) -> tuple[bool, str]:
    """Whether to take the fast path, and why (printed and recorded)."""
    import torch

    from .modeling import compute_dtype

    setting = resolve_fast_generation(setting)
    if setting != "auto":
        return setting == "true", f"--fast_generation {setting}"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU (auto)"
    free, _ = torch.cuda.mem_get_info()
    dense = dense_bytes(base_path, compute_dtype())
    needed = dense * (copies + FOUR_BIT_SHARE) + MEMORY_MARGIN_GIB * 2**30
    verdict = f"{free / 2**30:.1f} GiB free, {needed / 2**30:.1f} GiB needed for {copies} dense copies (auto)"
    return free >= needed, verdict


def full_precision(parameter):
    """A weight as fp32: NF4/FP4 parameters (bitsandbytes Params4bit) are dequantized first."""
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(parameter.data, quant_state).float()
    return parameter.detach().float()


def lora_delta(layer):
    """scaling * B @ A of a PEFT LoRA layer's active adapter, in fp32."""
    (name,) = layer.active_adapters
    if layer.use_dora.get(name) or getattr(layer, "fan_in_fan_out", False):
        raise UserError("the fast generation path merges plain LoRA only (not DoRA); use --fast_generation false")
    down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.scaling[name] * (up.float() @ down.float().to(up.device))


def _dense_tensor(base, name: str, merged: bool):
    """The fp32 value of the dense model's tensor `name`, from the PEFT-wrapped `base` (LoRA added if `merged`)."""
    from peft.tuners.lora import LoraLayer

    path, _, leaf = name.rpartition(".")
    module = base.get_submodule(path) if path else base
    if isinstance(module, LoraLayer):
        if leaf != "weight":
            return full_precision(getattr(module.get_base_layer(), leaf))
        weight = full_precision(module.get_base_layer().weight)
        return weight + lora_delta(module) if merged else weight
    return full_precision(getattr(module, leaf))


def dense_model(peft_model, dtype, keep_base: bool):
    """A plain transformers model with the adapter merged (see the module docstring), on the adapter's device.

    With `keep_base`, the model also carries the un-merged weights of the LoRA-wrapped layers
    (`model.base_weights`), for `adapter_disabled`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    peft_config = peft_model.peft_config[peft_model.active_adapter]
    if getattr(peft_config, "modules_to_save", None):
        raise UserError("the fast generation path does not merge modules_to_save; use --fast_generation false")
    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=config._attn_implementation)
    device = next(base.parameters()).device
    wrapped = {name.rpartition(".")[0] for name, _ in base.named_modules() if name.endswith(".base_layer")}
    state, base_weights = {}, {}
    with torch.no_grad():
        for name, meta in dense.state_dict(keep_vars=True).items():
            if isinstance(meta, torch.nn.Parameter):
                state[name] = _dense_tensor(base, name, merged=True).to(device, dtype)
                if keep_base and name.rpartition(".")[0] in wrapped and name.endswith(".weight"):
                    base_weights[name] = _dense_tensor(base, name, merged=False).to(device, dtype)
            else:  # buffers such as the rotary frequencies keep their own dtype
                state[name] = base.get_buffer(name).detach().clone()
    dense.load_state_dict(state, strict=True, assign=True)
    for name, buffer in list(dense.named_buffers()):  # non-persistent ones (rotary frequencies) are not in `state`
        if buffer.is_meta:
            module_path, _, leaf = name.rpartition(".")
            dense.get_submodule(module_path).register_buffer(leaf, base.get_buffer(name).detach().clone(),
                                                             persistent=False)
    if getattr(config, "tie_word_embeddings", False):
        dense.tie_weights()
    dense.generation_config = copy.deepcopy(base.generation_config)
    dense.eval()
    dense.base_weights = base_weights or None
    return dense


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model inside the block: PEFT's disable_adapter(), or the dense model's base weights swapped in
    place (the same storage, so compiled CUDA graphs stay valid) and swapped back after."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
        return
    if getattr(model, "base_weights", None) is None:
        raise RuntimeError("this dense model was built without its base weights (keep_base=False)")
    _swap_base_weights(model)
    try:
        yield
    finally:
        _swap_base_weights(model)


def _swap_base_weights(model) -> None:
    import torch

    with torch.no_grad():
        for name, other in model.base_weights.items():
            live = model.get_parameter(name)
            held = live.detach().clone()
            live.copy_(other)
            other.copy_(held)


def set_static_cache(model, max_cache_len: int | None) -> None:
    """Every later generate() uses a static KV cache of at least `max_cache_len` positions (one shape, so the
    compiled step is reused; transformers compiles it automatically on CUDA)."""
    model.generation_config.cache_implementation = "static"
    model.generation_config.max_cache_len = max_cache_len


def load_generation_model(adapter_dir: str, *, base_model: str, backend: str, fast_generation: str,
                          load_in_4bit: bool, max_seq_length: int, keep_base: bool = False,
                          max_cache_len: int | None = None):
    """Load the adapter for chat, inference or evaluation on the fast path when chosen, else as before.

    The settings are as load_adapter_model takes them (settled at parse time). `max_cache_len` fixes the static
    cache's size (chat: its context budget, so every reply reuses the compiled step); None sizes it by the first
    generate() call, and it grows when a later call needs more (recompiling).
    Returns (model, tokenizer, loaded); loaded["fast_generation"] says which path and why. The fast path
    loads through transformers + PEFT (Unsloth patches transformers' model classes in place, which the dense
    model must not inherit), merges, and frees the 4-bit model.
    """
    import torch

    from .modeling import compute_dtype, load_adapter_model, resolve_model_path

    resolve_fast_generation(fast_generation)
    fast, reason = choose_fast(fast_generation, resolve_model_path(base_model), 2 if keep_base else 1)
    settings = {"base_model": base_model, "load_in_4bit": load_in_4bit, "max_seq_length": max_seq_length}
    if not fast:
        model, tokenizer, loaded = load_adapter_model(adapter_dir, backend=backend, **settings)
        loaded["fast_generation"] = {"used": False, "reason": reason}
        return model, tokenizer, loaded
    peft_model, tokenizer, loaded = load_adapter_model(adapter_dir, backend="hf", **settings)
    model = dense_model(peft_model, compute_dtype(), keep_base)
    del peft_model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    set_static_cache(model, max_cache_len)
    loaded["fast_generation"] = {
        "used": True, "reason": reason, "dtype": str(compute_dtype()).removeprefix("torch."),
        "compiled": model.device.type == "cuda",
    }
    return model, tokenizer, loaded


def generation_path(loaded: dict, warm_up_seconds: float = 0.0) -> str:
    """One line on the generation path that was chosen, for the stage's start-up message."""
    chosen = loaded["fast_generation"]
    if not chosen["used"]:
        return f"fast generation off: {chosen['reason']}"
    compiled = "compiled" if chosen["compiled"] else "not compiled off CUDA"
    warmed = f", warmed up in {warm_up_seconds:.1f} s" if warm_up_seconds else ""
    return f"fast generation: merged {chosen['dtype']}, static cache, {compiled}{warmed} ({chosen['reason']})"


def warm_up(model, tokenizer) -> float:
    """Generate a few tokens in the streaming path's thread, so the first user message pays neither compilation
    nor CUDA-graph recording. Returns the seconds it took (0 when nothing is compiled)."""
    import torch

    if not compiled_generation(model):
        return 0.0
    print("compiling the decoding step (once per process; the first time takes about a minute)...", flush=True)
    started = time.perf_counter()
    prompt = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": "hello"}])], device=model_device(model))
    kwargs = {**decoding_kwargs(tokenizer, WARM_UP_TOKENS), "min_new_tokens": WARM_UP_TOKENS}

    def run():
        with torch.inference_mode():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)

    try:
        start_in_generation_thread(model, run)()
    except Exception as error:  # e.g. no working compiler toolchain: the merged model still decodes eagerly
        print(f"warning: torch.compile failed ({type(error).__name__}: {str(error)[:200]}); decoding uncompiled")
        model.generation_config.disable_compile = True
        start_in_generation_thread(model, run)()
    return time.perf_counter() - started
