"""Many samples of one long prompt: every row attends to a single copy of the prompt's KV cache.

The agentic suite samples N answers to a 2.6k-token inbox. Copying the prompt's cache to every
row of a batch makes each decode step read (and, as the cache grows by concatenation, copy) N
copies of it: on 2 CPU cores a step at 16 rows took 841 ms against 73 ms at one row. Here the
prompt's keys and values are kept once, the rows keep only what they generate, and attention is
split in two and merged by log-sum-exp (as cascade or shared-prefix inference kernels do): the
queries of all rows against the one prompt copy in a single product, then each row against its
own generated tokens.

Valid only when every row has the same prompt and no padding, which is how `LocalBackend` uses it.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface

NAME = "msm_shared_prefix"
_active = threading.local()


class SharedPrefixLayer(DynamicLayer):
    """A layer's generated keys and values per row, plus the prompt's once (batch 1)."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor):
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values

    def generated_length(self) -> int:
        return DynamicLayer.get_seq_length(self)

    def get_seq_length(self) -> int:  # positions: the prompt's tokens come first
        return self.prefix_keys.shape[-2] + self.generated_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.generated_length() + query_length, 0


def shareable(prompt_cache) -> bool:
    """Plain full-attention layers only (no sliding window, no linear attention): the attention
    below reads every prompt position and no mask."""
    return all(type(layer) is DynamicLayer for layer in prompt_cache.layers)


def shared_prefix_cache(prompt_cache) -> DynamicCache:
    """A cache for a batch of rows that all continue the prompt held (batch 1) in `prompt_cache`."""
    cache = DynamicCache()
    cache.layers = [SharedPrefixLayer(layer.keys, layer.values) for layer in prompt_cache.layers]
    return cache


def _part(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-weighted values and the log-sum-exp of the scores (consumed in place)."""
    top = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(top).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    return torch.matmul(weights, values) / total, (total.log_() + top).squeeze(-1)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Rows' queries against the shared prompt, then against their own tokens, merged exactly.

    query: [B, H, q, d]; key/value: [B, kvh, S, d] (the rows' own tokens, the q new ones last).
    The mask is not read: the rows have no padding, and causality among the q new tokens is
    applied here.
    """
    layer = _active.cache.layers[module.layer_idx]
    batch, heads, q, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads  # query head h reads kv head h // group, as repeat_kv pairs them
    scaling = dim ** -0.5 if scaling is None else scaling
    grouped = query.reshape(batch, kv_heads, group * q, dim) * scaling
    # the prompt: one product for every row's queries
    flat = grouped.transpose(0, 1).reshape(kv_heads, batch * group * q, dim)
    out_p, lse_p = _part(torch.matmul(flat, layer.prefix_keys[0].transpose(-1, -2)), layer.prefix_values[0])
    out_p = out_p.reshape(kv_heads, batch, group * q, dim).transpose(0, 1)
    lse_p = lse_p.reshape(kv_heads, batch, group * q).transpose(0, 1)
    # the rows' own tokens, causal among the q new ones
    scores = torch.matmul(grouped, key.transpose(-1, -2))  # [B, kvh, group*q, S]
    if q > 1:
        own = key.shape[-2]
        qpos = torch.arange(q, device=query.device).repeat(group) + own - q
        scores = scores.masked_fill(torch.arange(own, device=query.device)[None, :] > qpos[:, None], float("-inf"))
    out_s, lse_s = _part(scores, value)
    top = torch.maximum(lse_p, lse_s)
    w_p, w_s = torch.exp(lse_p - top), torch.exp(lse_s - top)
    out = (out_p * w_p[..., None] + out_s * w_s[..., None]) / (w_p + w_s)[..., None]
    out = out.reshape(batch, kv_heads, group, q, dim).reshape(batch, heads, q, dim)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, _no_mask)


@contextlib.contextmanager
def sharing(model, cache: DynamicCache):
    """Run `model.generate(..., cache=cache)` with shared-prefix attention, then restore the model."""
    previous = model.config._attn_implementation
    _active.cache = cache
    model.config._attn_implementation = NAME
    try:
        yield
    finally:
        model.config._attn_implementation = previous
        _active.cache = None
