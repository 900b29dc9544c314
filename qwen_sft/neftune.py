"""NEFTune embedding noise sized per example, packed or not.

transformers' hook draws uniform noise in [-m, m] with m = alpha / sqrt(L * d), where L is the length of the row
it sees. Unpacked, that row is one example; packed, it holds many, so each example would get several times less
noise than unpacked. Here L is the length of the example each token belongs to: the non-padding tokens of its row
(attention_mask) or, for padding-free packed rows, its segment between position_ids resets to 0.
"""

from __future__ import annotations

import contextlib


def example_lengths(shape, attention_mask=None, position_ids=None):
    """(batch, seq) tensor: for each token, the length of the example it belongs to."""
    import torch

    batch, seq = shape[0], shape[1]
    if attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask.sum(1, keepdim=True).clamp(min=1).expand(batch, seq)
    if position_ids is not None and position_ids.shape[-1] == seq:
        starts = (position_ids.reshape(-1, seq) == 0).long()
        starts[:, 0] = 1
        segment = starts.cumsum(1) - 1  # segment index of each token within its row
        counts = torch.zeros_like(segment).scatter_add_(1, segment, torch.ones_like(segment))
        return counts.gather(1, segment).expand(batch, seq)
    return torch.full((batch, seq), seq)


def neftune_noise(output, alpha: float, attention_mask=None, position_ids=None):
    """Uniform noise in [-m, m] per token, m = alpha / sqrt(example length * hidden size)."""
    lengths = example_lengths(output.shape, attention_mask, position_ids).to(output.device)
    scale = alpha / (lengths.float() * output.shape[-1]).sqrt()
    return output.new_empty(output.shape).uniform_(-1, 1) * scale.unsqueeze(-1).to(output.dtype)


@contextlib.contextmanager
def per_example_neftune(model, alpha: float):
    """While active, training-mode forwards of `model` add per-example NEFTune noise to its input embeddings."""
    if not alpha:
        yield
        return
    batch = {}

    def remember_masks(module, args, kwargs):
        batch["attention_mask"] = kwargs.get("attention_mask")
        batch["position_ids"] = kwargs.get("position_ids")

    def add_noise(module, inputs, output):
        if not module.training:
            return output
        return output + neftune_noise(output, alpha, batch.get("attention_mask"), batch.get("position_ids"))

    handles = [
        model.register_forward_pre_hook(remember_masks, with_kwargs=True),
        model.get_input_embeddings().register_forward_hook(add_noise),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
