"""Generation shared by evaluation, inference and chat: batched greedy/sampled decoding and streaming.

Every path stops at the end-of-turn token(s) and never shows special tokens.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .families import family
from .template import prompt_ids


def stop_token_ids(tokenizer) -> list[int]:
    """`<|im_end|>` plus the tokenizer's EOS and `<|endoftext|>`, whichever exist."""
    ids = []
    for token in (family.END_OF_TURN, tokenizer.eos_token, family.END_OF_TEXT):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        # A token the vocabulary lacks maps to the unknown id (0 even without an unk token), so check the round trip.
        known = isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == token
        if known and token_id not in ids:
            ids.append(token_id)
    return ids


def decoding_kwargs(tokenizer, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                    repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> dict:
    """generate() arguments; temperature 0 means greedy."""
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": stop_token_ids(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": temperature > 0,
        "repetition_penalty": repetition_penalty,
        "no_repeat_ngram_size": no_repeat_ngram_size,
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def decoding_settings(cfg) -> dict:
    """decoding_kwargs' settings from a stage's MAX_NEW_TOKENS, TEMPERATURE, TOP_P, REPETITION_PENALTY and
    NO_REPEAT_NGRAM_SIZE constants."""
    return {
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "repetition_penalty": cfg.repetition_penalty,
        "no_repeat_ngram_size": cfg.no_repeat_ngram_size,
    }


def cut_at_stop(ids: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """The answer up to its first stop token, and whether one ended it (rather than the length limit)."""
    end = next((position for position, token in enumerate(ids) if token in stops), None)
    return (ids, False) if end is None else (ids[:end], True)


def model_device(model):
    return next(model.parameters()).device


def left_padded_batch(prompts: list[list[int]], pad_token_id: int, device) -> dict:
    """input_ids and attention_mask of token-id prompts, padded on the left so every row ends where generation
    starts."""
    import torch

    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def generate_token_ids(model, prompts: list[list[int]], generate_kwargs: dict, batch_size: int = 0,
                       progress: str | None = None) -> list[dict]:
    """Generate for each prompt (a list of token ids) in left-padded batches of `batch_size` (0 = one batch).

    Prompts are batched longest first, so rows of similar length share a batch and little is padding; results
    come back in input order, each {"ids": the answer's token ids up to the first stop token, "stopped": whether
    a stop token ended it before the length limit}. `generate_kwargs` are generate() arguments and must hold
    `eos_token_id` (the stop ids) and `pad_token_id`. With `progress` set, a tqdm bar of that name shows rows
    done and answer tokens generated per second.
    """
    import time

    import torch
    from tqdm.auto import tqdm

    stops = generate_kwargs["eos_token_id"]
    stops = set(stops) if isinstance(stops, (list, tuple)) else {stops}
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]), reverse=True)
    batch_size = batch_size if batch_size > 0 else max(len(prompts), 1)
    results: list[dict | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=progress, unit="row", disable=progress is None)
    started, generated = time.perf_counter(), 0
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        batch_prompts = [prompts[index] for index in rows]
        if len(rows) < batch_size and compiled_generation(model):  # one batch shape: no recompilation
            batch_prompts += [batch_prompts[-1]] * (batch_size - len(rows))
        batch = left_padded_batch(batch_prompts, generate_kwargs["pad_token_id"], model_device(model))
        with torch.inference_mode():
            output = model.generate(**batch, **generate_kwargs)
        for index, new_tokens in zip(rows, output[:len(rows), batch["input_ids"].shape[1]:].tolist()):
            answer, stopped = cut_at_stop(new_tokens, stops)
            results[index] = {"ids": answer, "stopped": stopped}
            generated += len(answer)
        bar.update(len(rows))
        bar.set_postfix_str(f"{generated / max(time.perf_counter() - started, 1e-9):,.0f} tok/s")
    bar.close()
    return results


def compiled_generation(model) -> bool:
    """True when generate() compiles its decoding step: a static KV cache (the fast path) on a GPU."""
    config = getattr(model, "generation_config", None)
    static = getattr(config, "cache_implementation", None) == "static" and not getattr(config, "disable_compile", False)
    return static and model_device(model).type == "cuda"


def decode_answer(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_batch(model, tokenizer, conversations: list[list[dict]], batch_size: int = 0,
                   progress: str | None = None, tools: list[list | None] | None = None, **decoding) -> list[dict]:
    """Generate one answer per conversation (offered its `tools`, if any), in left-padded batches of `batch_size`
    (0 = all in one batch).

    Returns, per row, the answer text (special tokens removed), its token count and whether it stopped at an
    end-of-turn token rather than at the length limit.
    """
    tools = tools or [None] * len(conversations)
    prompts = [prompt_ids(tokenizer, messages, row_tools) for messages, row_tools in zip(conversations, tools)]
    generated = generate_token_ids(model, prompts, decoding_kwargs(tokenizer, **decoding), batch_size, progress)
    return [
        {"text": decode_answer(tokenizer, row["ids"]), "tokens": len(row["ids"]), "stopped": row["stopped"]}
        for row in generated
    ]


@dataclass
class Reply:
    """One streamed reply and how it ended."""

    text: str  # the answer, special tokens removed
    tokens: int  # answer tokens, up to the first stop token
    stopped: bool  # ended at an end-of-turn token (not at the length limit, not interrupted)
    interrupted: bool  # Ctrl-C stopped it


def _flag_criterion(flag):
    """A StoppingCriteria that ends generation at the next step once `flag` (a threading.Event) is set."""
    import torch
    from transformers import StoppingCriteria

    class StopWhenFlagged(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), flag.is_set(), dtype=torch.bool, device=input_ids.device)

    return StopWhenFlagged()


def generation_worker(model) -> ThreadPoolExecutor:
    """The one thread that runs this model's streamed generate() calls. CUDA-graph trees are per thread, so a
    fresh thread per reply would record the graphs again; one long-lived thread records them once (at warm-up)."""
    worker = getattr(model, "generation_executor", None)
    if worker is None:
        worker = model.generation_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
    return worker


def start_in_generation_thread(model, work):
    """Run `work` in a worker thread; returns the call that waits for it. A model whose decoding step is
    compiled into CUDA graphs keeps one long-lived worker (the graphs are recorded per thread)."""
    if compiled_generation(model):
        return generation_worker(model).submit(work).result
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    return worker.join


@contextlib.contextmanager
def _ctrl_c_sets(flag):
    """While in the block, Ctrl-C (SIGINT) sets `flag` rather than raising KeyboardInterrupt wherever the main
    thread happens to be, which could leave the generation thread running unseen. Only the main thread can
    install signal handlers; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stream_reply(model, tokenizer, messages: list[dict], on_text=None, tools: list | None = None, **decoding) -> Reply:
    """Generate one reply (offered `tools`, if any), handing each decoded piece to `on_text` as it arrives.

    transformers' TextIteratorStreamer decodes with special tokens skipped, and generation stops at the
    end-of-turn ids, so nothing past `<|im_end|>` is ever shown. Generation runs in a worker thread while this
    one prints; Ctrl-C sets a flag that a stopping criterion checks, so the reply ends within one step and the
    caller carries on (the returned Reply says it was interrupted).
    """
    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    prompt = prompt_ids(tokenizer, messages, tools)
    input_ids = torch.tensor([prompt], device=model_device(model))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = decoding_kwargs(tokenizer, **decoding)
    interrupt = threading.Event()
    outcome = {}

    def run():
        try:
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_flag_criterion(interrupt)]), **kwargs,
                )
            outcome["ids"] = output[0, len(prompt):].tolist()
        except BaseException as error:  # handed to the caller's thread, which re-raises it
            outcome["error"] = error
            streamer.end()  # the reader would otherwise wait for text forever

    with _ctrl_c_sets(interrupt):
        finished = start_in_generation_thread(model, run)
        for piece in streamer:
            if on_text:
                on_text(piece)
        finished()
    if "error" in outcome:
        raise outcome["error"]
    answer, stopped = cut_at_stop(outcome["ids"], set(kwargs["eos_token_id"]))
    return Reply(decode_answer(tokenizer, answer), len(answer), stopped, interrupt.is_set())
