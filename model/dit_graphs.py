"""The DiT's exported graphs as PyTorch modules: each computes exactly its mirage.core.graphs spec from
explicit inputs to explicit outputs, with WanDiT's own blocks, and keeps no state.

`dit_step` / `dit_cache_write` are the cached block pass of mirage.model.dit_cache.BlockStepper made
pure: instead of writing the block's keys/values into the cache in place and attending over the
cache's first `span` rows, each layer scatters them into a copy of the cache rows at `slots` and
attends over the rows `valid` marks (the same softmax: masked rows get no weight), and returns them as
outputs for the runtime to write.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mirage.core import graphs as G
from mirage.model.dit import WanDiT


def cached_pass(model: WanDiT, x_t, t_emb, text_k, text_v, cache_k, cache_v, rope_cos, rope_sin, slots, valid):
    """Velocity (B, out_dim, N, h, w) and the block's keys and values (B, L, H, N·T, D) (see module doc)."""
    cfg = model.cfg
    rows = slots.long()[:, None, :, None].expand(-1, cfg.num_heads, -1, cfg.head_dim)
    # (B, 1, N·T, W·T): ONNX Runtime's `Attention` wants the query axis of the mask spelled out
    mask = (valid > 0.5)[:, None, None, :].expand(-1, 1, slots.shape[1], -1)
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

    def __init__(self, model: WanDiT, graph: str):
        super().__init__()
        if graph not in G.DIT_GRAPHS:
            raise ValueError(f"{graph!r} is not a DiT graph ({', '.join(G.DIT_GRAPHS)})")
        self.model, self.graph = model, graph

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.graph == G.DIT_TEXT:
            k, v = zip(*self.model.text_kv(inputs[0]))
            return torch.stack(k, 1), torch.stack(v, 1)
        velocity, k, v = cached_pass(self.model, *inputs)
        return (velocity, k, v) if self.graph == G.DIT_STEP else (k, v)
