"""The Wan 2.1 video transformer (text-to-video), written for chunk-causal generation.

Layout and parameter names are exactly those of Wan 2.1's `WanModel` state dict (the names Self-Forcing,
CausVid and LongLive checkpoints use after their `model.` prefix), so their weights load with no mapping:

    patch_embedding            Conv3d(in_dim, dim, patch, stride=patch)
    text_embedding.{0,2}       Linear(text_dim, dim), tanh-GELU, Linear(dim, dim)
    time_embedding.{0,2}       Linear(freq_dim, dim), SiLU, Linear(dim, dim)       -> e  (per latent frame)
    time_projection.1          SiLU, Linear(dim, 6 dim)                             -> e0 (6 modulation vectors)
    blocks.N.self_attn.{q,k,v,o,norm_q,norm_k}   3-D RoPE, RMSNorm over q and k across heads
    blocks.N.norm3             affine LayerNorm before cross-attention (cross_attn_norm)
    blocks.N.cross_attn.{q,k,v,o,norm_q,norm_k}  to the text embeddings
    blocks.N.ffn.{0,2}         Linear(dim, ffn_dim), tanh-GELU, Linear(ffn_dim, dim)
    blocks.N.modulation        (1, 6, dim), added to e0: shift/scale/gate of self-attention and FFN
    head.head, head.modulation Linear(dim, out_dim * patch), (1, 2, dim) added to e: shift/scale

(norm1, norm2 and head.norm are LayerNorms without parameters, so they have no keys.) Timesteps are
per latent frame, as Self-Forcing's causal model takes them: t is (B, F) and every frame's tokens get
their own modulation.

Every attention is `F.scaled_dot_product_attention` on (B, heads, tokens, head_dim). A block takes its
self-attention proper as an `attend(q, k, v)` callback and `WanDiT.run` takes the whole layer call as a
`layer(i, block, tokens, e0, rope)` callback, so one block implementation serves the full forward
(optionally with a block-causal mask) and the cached block step of mirage.model.dit_cache, which writes
the new keys/values into the cache and attends over it (and compiles the layer call once for all layers).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mirage.core.config import DiTConfig
from mirage.core.errors import MirageError

class PromptError(MirageError, ValueError):
    """Prompt embeddings of a shape the model does not take (another encoder's width, too many tokens)."""


Rope = tuple[torch.Tensor, torch.Tensor]


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding [cos, sin] of t·10000^(-i/half), computed in float64 as Wan does."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_frequencies(dims: int, theta: float, device=None) -> torch.Tensor:
    """Inverse frequencies of one RoPE axis of `dims` channels (float64, as Wan's rope_params)."""
    return 1.0 / torch.pow(theta, torch.arange(0, dims, 2, dtype=torch.float64, device=device) / dims)


class RotaryEmbedding(nn.Module):
    """3-D rotary embedding: the head channels split into (frame, height, width) parts as Wan splits them,
    each rotated pairwise (channels 2i, 2i+1) by its position times its frequencies.

    The height/width angles of a frame are fixed by the resolution and kept as buffers; the frame angles
    are computed from a position tensor, so a block's absolute frame positions can live on the device
    (a captured graph reads them) and a rolling cache can run past any table length."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dt, dh, dw = cfg.rope_dims
        gh, gw = cfg.token_grid
        self.register_buffer("inv_freq_t", rope_frequencies(dt, cfg.rope_theta), persistent=False)
        ah = torch.arange(gh, dtype=torch.float64)[:, None] * rope_frequencies(dh, cfg.rope_theta)
        aw = torch.arange(gw, dtype=torch.float64)[:, None] * rope_frequencies(dw, cfg.rope_theta)
        spatial = torch.cat([ah[:, None, :].expand(gh, gw, -1), aw[None, :, :].expand(gh, gw, -1)], dim=-1)
        self.register_buffer("spatial", spatial.reshape(gh * gw, -1), persistent=False)  # (T, (dh + dw) / 2) angles

    def _apply(self, fn, recurse=True):
        """Move the float64 angle tables with the module but never cast them (`model.to(bfloat16)` would
        round the angles; Wan keeps its table out of the buffers for the same reason)."""
        for name, buf in self._buffers.items():
            self._buffers[name] = buf.to(fn(buf[:0]).device)
        return self

    def forward(self, positions: torch.Tensor) -> Rope:
        """cos, sin of shape (F·T, head_dim / 2), float32, for frames at `positions` (F,) int."""
        frame = positions.to(torch.float64)[:, None] * self.inv_freq_t  # (F, dt / 2)
        tokens = self.spatial.shape[0]
        angles = torch.cat([frame[:, None, :].expand(-1, tokens, -1),
                            self.spatial[None].expand(frame.shape[0], -1, -1)], dim=-1).flatten(0, 1)
        return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, H, L, D) by the angles of `rope` (L, D / 2), in float32."""
    cos, sin = rope
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """WanRMSNorm: over the whole width (all heads), in float32, then scaled by `weight`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan's parameter-free LayerNorm (norm1, norm2, head.norm), in float32."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).type_as(x)


class Attention(nn.Module):
    """q, k, v, o projections with RMS-normed q and k; `heads` splits the width for SDPA."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, dim) -> (B, heads, L, head_dim)."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.norm_k(self.k(x))), self.split(self.v(x))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.split(self.norm_q(self.q(x)))

    def out(self, y: torch.Tensor) -> torch.Tensor:
        return self.o(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """One Wan attention block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = Attention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, rope: Rope, text_kv, attend: Callable) -> torch.Tensor:
        """x (B, F, T, dim) tokens per frame; e0 (B, F, 6, dim); text_kv: this layer's cross-attention
        keys/values; attend(q, k, v) -> (B, heads, F·T, head_dim) is the self-attention proper."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e0).unsqueeze(3).unbind(2)  # (B, F, 1, dim)
        h = (layer_norm(x, self.eps) * (1 + scale1) + shift1).flatten(1, 2)
        sa = self.self_attn
        k, v = sa.keys_values(h)
        y = attend(apply_rope(sa.query(h), rope), apply_rope(k, rope), v)
        x = x + sa.out(y).unflatten(1, x.shape[1:3]) * gate1
        ca = self.cross_attn
        q = ca.query(self.norm3(x).flatten(1, 2))
        x = x + ca.out(F.scaled_dot_product_attention(q, *text_kv)).unflatten(1, x.shape[1:3])
        y = self.ffn((layer_norm(x, self.eps) * (1 + scale2) + shift2).flatten(1, 2))
        return x + y.unflatten(1, x.shape[1:3]) * gate2


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x (B, F, T, dim), e (B, F, dim) -> (B, F, T, out_dim · patch)."""
        shift, scale = (self.modulation + e[:, :, None]).unsqueeze(3).unbind(2)
        return self.head(layer_norm(x, self.eps) * (1 + scale) + shift)


class WanDiT(nn.Module):
    """Wan 2.1 T2V transformer: velocity v = ε - x_0 for latent video x (B, in_dim, F, H, W) at per-frame
    timesteps t (B, F) given text embeddings (B, ≤ text_len, text_dim)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = RotaryEmbedding(cfg)

    # --- pieces the cached block step reuses ----------------------------------------------------
    def text_kv(self, text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cross-attention keys/values of a prompt (computed once per prompt). Text shorter
        than text_len is zero-padded, as Wan pads its UMT5 embeddings (the pads are attended to)."""
        cfg = self.cfg
        if text.ndim != 3 or text.shape[2] != cfg.text_dim or text.shape[1] > cfg.text_len:
            raise PromptError(f"prompt embeddings of shape {tuple(text.shape)}: {cfg.name} takes (batch, tokens <= "
                              f"{cfg.text_len}, {cfg.text_dim})")
        pad = cfg.text_len - text.shape[1]
        context = self.text_embedding(F.pad(text, (0, 0, 0, pad)).to(self.patch_embedding.weight.dtype))
        return [blk.cross_attn.keys_values(context) for blk in self.blocks]

    def time_embed(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B, F) -> e (B, F, dim) for the head, e0 (B, F, 6, dim) for the blocks."""
        return self.embed_time(sinusoidal_embedding(t, self.cfg.freq_dim))

    def embed_time(self, sinusoid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`time_embed` from the sinusoidal embedding (B, F, freq_dim) (the exported graphs take it as an input)."""
        e = self.time_embedding(sinusoid.to(self.patch_embedding.weight.dtype))
        return e, self.time_projection(e).unflatten(-1, (6, self.cfg.dim))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim, F, H, W) -> (B, F, T, dim) tokens."""
        y = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        return y.permute(0, 2, 3, 4, 1).flatten(2, 3)

    def unpatchify(self, y: torch.Tensor) -> torch.Tensor:
        """(B, F, T, out_dim · patch) -> (B, out_dim, F, H, W), Wan's 'fhwpqrc->cfphqwr'."""
        b, f = y.shape[:2]
        gh, gw = self.cfg.token_grid
        _, ph, pw = self.cfg.patch_size
        y = y.reshape(b, f, gh, gw, ph, pw, self.cfg.out_dim)
        return y.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, self.cfg.out_dim, f, gh * ph, gw * pw)

    def run(self, x: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, layer: Callable) -> torch.Tensor:
        """The transformer over latent frames x at frame `positions` (F,); each block runs as
        `layer(i, block, tokens, e0, rope)`. Returns the velocity (B, out_dim, F, H, W) in x's dtype."""
        return self.run_embedded(x, self.time_embed(t), self.rope(positions), layer)

    def run_embedded(self, x: torch.Tensor, time: tuple[torch.Tensor, torch.Tensor], rope: Rope,
                     layer: Callable) -> torch.Tensor:
        """`run` with the time embeddings (e, e0) and the RoPE angles given."""
        tokens = self.patchify(x)
        e, e0 = time
        for i, blk in enumerate(self.blocks):
            tokens = layer(i, blk, tokens, e0, rope)
        return self.unpatchify(self.head(tokens, e)).to(x.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """One forward over all frames of x at frame `positions` (default 0..F-1); `mask` (F·T, F·T) bool,
        True = may attend (e.g. `block_causal_mask`), None = full attention (Wan's bidirectional model)."""
        if positions is None:
            positions = torch.arange(x.shape[2], device=x.device)
        text_kv = self.text_kv(text)

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        return self.run(x, t, positions, lambda i, blk, h, e0, rope: blk(h, e0, rope, text_kv[i], attend))


def block_causal_mask(cfg: DiTConfig, positions: torch.Tensor) -> torch.Tensor:
    """(F·T, F·T) bool: the attention the cached rollout computes, for frames at absolute `positions`.
    A query frame q sees key frame k when k's block is not after q's block and k is either one of the
    `sink_frames` first frames or among the last window_frames - sink_frames frames up to the end of
    q's block (Self-Forcing's block-wise causal mask with local_attn_size; LongLive's sink plus its
    local budget of max_attention_size - sink tokens)."""
    n = cfg.block_frames
    end = (positions // n + 1) * n  # one past the last frame of each frame's block
    q_end, k_pos = end[:, None], positions[None, :]
    local = cfg.window_frames - cfg.sink_frames
    frames = (k_pos < q_end) & ((k_pos >= q_end - local) | (k_pos < cfg.sink_frames))
    return frames.repeat_interleave(cfg.tokens_per_frame, 0).repeat_interleave(cfg.tokens_per_frame, 1)
