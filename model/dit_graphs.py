"""The DiT's exported graphs as PyTorch modules: each computes exactly its mirage.core.graphs spec from
explicit inputs to explicit outputs, with WanDiT's own blocks, and keeps no state.

`dit_step` / `dit_cache_write` are the cached block pass of mirage.model.dit_cache.BlockStepper made
pure: instead of writing the block's keys/values into the cache in place and attending over the
cache's first `span` rows, each layer scatters them into a copy of the cache rows at `slots` and
attends over the rows `valid` marks (the same softmax: masked rows get no weight), and returns them as
outputs for the runtime to write.

How the rows not held are masked out (`mask_form`): "bool", a boolean mask with the query axis spelled out,
(B, 1, N·T, W·T), as the exported graphs carry it (ONNX Runtime's `Attention` wants that axis); or "bias", an
additive 0 / -inf bias broadcast over the queries, (B, 1, 1, W·T), made once for every layer, as the runtime's
PyTorch backend runs them. PyTorch turns a boolean mask into a bias of the full (B, 1, N·T, W·T) shape in every
layer (613 MB a call for wan-1.3b at batch 2), and cuDNN's attention under it took 6.6 ms against 3.5 ms unmasked
on an H100 (scripts/bench_sdpa.py --masked).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mirage.core import graphs as G
from mirage.model.dit import WanDiT


MASKS = ("bool", "bias")


def cached_pass(model: WanDiT, x_t, t_emb, text_k, text_v, cache_k, cache_v, rope_cos, rope_sin, slots, valid,
                mask_form: str = "bool"):
    """Velocity (B, out_dim, N, h, w) and the block's keys and values (B, L, H, N·T, D) (see module doc)."""
    cfg = model.cfg
    rows = slots.long()[:, None, :, None].expand(-1, cfg.num_heads, -1, cfg.head_dim)
    held = (valid > 0.5)[:, None, None, :]  # (B, 1, 1, W·T)
    if mask_form == "bool":  # (B, 1, N·T, W·T)
        mask = held.expand(-1, 1, slots.shape[1], -1)
    else:  # (B, 1, 1, W·T), once for every layer
        mask = torch.zeros(held.shape, dtype=cache_k.dtype, device=held.device).masked_fill(~held, float("-inf"))
    keys, values = [], []

    def layer(i, blk, h, e0, rope):
        def attend(q, k, v):
            keys.append(k)
            values.append(v)
            return F.scaled_dot_product_attention(q, cache_k[:, i].scatter(2, rows, k),
                                                  cache_v[:, i].scatter(2, rows, v), attn_mask=mask)

        return blk(h, e0, rope, (text_k[:, i], text_v[:, i]), attend)

    velocity = model.run_embedded(x_t, model.embed_time(t_emb), (rope_cos[:, None], rope_sin[:, None]), layer)
    return velocity, torch.stack(keys, 1), torch.stack(values, 1)


class DiTGraph(nn.Module):
    """One DiT graph: forward(*inputs in the spec's order) -> its outputs in the spec's order."""

    def __init__(self, model: WanDiT, graph: str, mask_form: str = "bool"):
        super().__init__()
        if graph not in G.DIT_GRAPHS:
            raise ValueError(f"{graph!r} is not a DiT graph ({', '.join(G.DIT_GRAPHS)})")
        if mask_form not in MASKS:
            raise ValueError(f"mask_form {mask_form!r}: choose {' or '.join(MASKS)}")
        self.model, self.graph, self.mask_form = model, graph, mask_form

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.graph == G.DIT_TEXT:
            k, v = zip(*self.model.text_kv(inputs[0]))
            return torch.stack(k, 1), torch.stack(v, 1)
        velocity, k, v = cached_pass(self.model, *inputs, mask_form=self.mask_form)
        return (velocity, k, v) if self.graph == G.DIT_STEP else (k, v)
