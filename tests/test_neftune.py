"""NEFTune noise per example: packed rows get the same noise per example as unpacked ones."""

import torch
from transformers.integrations.neftune import neftune_post_forward_hook

from qwen_sft.neftune import per_example_neftune

LENGTHS = [37, 120, 300]  # examples of very different lengths, packed into one row
HIDDEN, ALPHA = 256, 5.0


class EmbeddingOnly(torch.nn.Module):
    """The part of a causal LM that NEFTune touches: input embeddings called from the model's forward."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(1000, HIDDEN)

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.embed_tokens(input_ids)


def noise_norms_packed(model, examples):
    row = torch.cat(examples).unsqueeze(0)
    position_ids = torch.cat([torch.arange(len(ids)) for ids in examples]).unsqueeze(0)
    noise = (model(input_ids=row, position_ids=position_ids) - model.embed_tokens.weight[row]).detach()[0]
    return [part.norm().item() for part in noise.split(LENGTHS)]


def noise_norms_unpacked(model, examples):
    norms = []
    for ids in examples:
        row = ids.unsqueeze(0)
        noise = (model(input_ids=row, attention_mask=torch.ones_like(row)) - model.embed_tokens.weight[row]).detach()
        norms.append(noise.norm().item())
    return norms


def test_noise_per_example_packed_equals_unpacked():
    torch.manual_seed(0)
    model = EmbeddingOnly().train()
    examples = [torch.randint(0, 1000, (length,)) for length in LENGTHS]
    with per_example_neftune(model, ALPHA):
        packed, unpacked = noise_norms_packed(model, examples), noise_norms_unpacked(model, examples)
    for length, p, u in zip(LENGTHS, packed, unpacked):
        assert abs(p / u - 1) < 0.05, (length, p, u)
        assert abs(u / (ALPHA / 3**0.5) - 1) < 0.05  # uniform in [-m, m] over L*d entries: norm alpha/sqrt(3)


def test_transformers_hook_weakens_packed_noise():
    """The bug being fixed: transformers' hook sizes the noise by the packed row, not by the example."""
    torch.manual_seed(0)
    model = EmbeddingOnly().train()
    model.embed_tokens.neftune_noise_alpha = ALPHA
    model.embed_tokens.register_forward_hook(neftune_post_forward_hook)
    examples = [torch.randint(0, 1000, (length,)) for length in LENGTHS]
    packed, unpacked = noise_norms_packed(model, examples), noise_norms_unpacked(model, examples)
    assert packed[0] / unpacked[0] < 0.35  # sqrt(37 / 457)


def test_padded_rows_use_their_own_length_and_eval_adds_no_noise():
    torch.manual_seed(0)
    model = EmbeddingOnly().train()
    ids = torch.randint(0, 1000, (2, 300))
    mask = torch.ones_like(ids)
    mask[0, 40:] = 0  # a 40-token example padded to its batch's 300
    with per_example_neftune(model, ALPHA):
        noise = (model(input_ids=ids, attention_mask=mask) - model.embed_tokens.weight[ids]).detach()
        assert abs(noise[0, :40].norm().item() / (ALPHA / 3**0.5) - 1) < 0.05
        model.eval()
        assert torch.equal(model(input_ids=ids, attention_mask=mask), model.embed_tokens.weight[ids])
    model.train()
    assert torch.equal(model(input_ids=ids), model.embed_tokens.weight[ids])  # the hooks are gone
