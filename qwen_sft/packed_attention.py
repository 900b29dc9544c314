"""Packed (padding-free) attention on Unsloth 2026.10.9 with torch 2.11.

Unsloth runs packed rows through torch's variable-length flash kernel (`torch.nn.attention.varlen.varlen_attn`)
only when that function takes `enable_gqa`, which arrived in torch 2.12. On torch 2.11 it falls back to one SDPA
call per run of equal segment lengths, which makes a packed token cost about 1.75x a dense one on an H200.
Qwen2.5 uses grouped-query attention (28 query heads, 4 key/value heads), so on torch 2.11 we hand Unsloth a
`varlen_attn` that repeats the key/value heads itself: the same kernel and the same result, one launch per layer.
"""

from __future__ import annotations

import inspect


def enable_varlen_packed_attention() -> str:
    """Route Unsloth's packed attention through torch's varlen flash kernel; returns what is in use."""
    try:
        from torch.nn.attention.varlen import varlen_attn
        from unsloth.utils import attention_dispatch
    except ImportError:
        return "per-segment SDPA (torch varlen attention unavailable)"
    if attention_dispatch._TORCH_VARLEN_ATTN is not None:
        return "torch varlen flash attention (Unsloth's own)"
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" not in parameters:
        return "per-segment SDPA (this torch's varlen_attn has no window_size)"

    def varlen_attn_with_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                             window_size=(-1, -1), enable_gqa=False):
        if enable_gqa and key.shape[1] != query.shape[1]:
            repeats = query.shape[1] // key.shape[1]
            key = key.repeat_interleave(repeats, dim=1)
            value = value.repeat_interleave(repeats, dim=1)
        return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)

    attention_dispatch._TORCH_VARLEN_ATTN = varlen_attn_with_gqa
    return "torch varlen flash attention (K/V heads repeated for grouped-query attention on torch < 2.12)"
