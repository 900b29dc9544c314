"""Generation shared by evaluation, inference and chat: batched greedy/sampled decoding and streaming.

Every path stops at the end-of-turn token(s) and never shows special tokens.
"""

from __future__ import annotations

from .template import END_OF_TURN, render_prompt


def stop_token_ids(tokenizer) -> list[int]:
    """`<|im_end|>` plus the tokenizer's EOS and `<|endoftext|>`, whichever exist."""
    ids = []
    for token in (END_OF_TURN, tokenizer.eos_token, "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
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


def model_device(model):
    return next(model.parameters()).device


def generate_batch(model, tokenizer, conversations: list[list[dict]], **decoding) -> list[dict]:
    """Generate one answer per conversation in a single left-padded batch.

    Returns, per row, the answer text (special tokens removed), its token count and whether it stopped at an
    end-of-turn token rather than at the length limit.
    """
    import torch

    prompts = [render_prompt(tokenizer, messages) for messages in conversations]
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = previous_side
    batch = batch.to(model_device(model))
    kwargs = decoding_kwargs(tokenizer, **decoding)
    with torch.inference_mode():
        output = model.generate(**batch, **kwargs)
    stops = set(kwargs["eos_token_id"])
    results = []
    for row in output[:, batch["input_ids"].shape[1]:].tolist():
        length = next((index for index, token in enumerate(row) if token in stops), None)
        answer_tokens = row if length is None else row[:length]
        results.append(
            {
                "text": tokenizer.decode(answer_tokens, skip_special_tokens=True).strip(),
                "tokens": len(answer_tokens),
                "stopped": length is not None,
            }
        )
    return results


def stream_reply(model, tokenizer, messages: list[dict], on_text=None, **decoding) -> str:
    """Generate one reply, handing each decoded piece to `on_text` as it arrives; returns the whole reply.

    Uses transformers' TextIteratorStreamer with special tokens skipped; generation runs in a worker thread so
    that the caller (and Ctrl-C) stays responsive.
    """
    import threading

    import torch
    from transformers import TextIteratorStreamer

    prompt = render_prompt(tokenizer, messages)
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model_device(model))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = decoding_kwargs(tokenizer, **decoding)

    def run():
        with torch.inference_mode():
            model.generate(**batch, **kwargs, streamer=streamer)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        if on_text:
            on_text(piece)
    worker.join()
    return "".join(pieces).strip()
