"""The Mirage U-Net: a per-frame denoiser whose temporal attention reads a context memory.

Two entry points become the exported graphs:

* ``context_encode(frame, t_ctx) -> kv``: one finished frame (optionally noised to level
  ``t_ctx``, history augmentation) becomes its keys/values for every temporal layer,
  ``kv`` of shape (B, 2, N, D): N tokens = the H*W positions of all temporal layers.
* ``denoise(x_t, t, cond, memory, ages) -> v``: the v-prediction for the current frame.
  ``memory`` (B, K, 2, N, D) is the ring buffer of the last K frames' kv; ``ages`` (B, K)
  int64 says how many frames ago each slot was written, 0 marking an empty slot.

Temporal attention is per pixel: each position of the current frame attends over the
same position in the K memory slots (plus itself), so its cost is linear in H*W.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mirage.core.config import ConfigError, ModelConfig
from mirage.plugins_cpp.conv import PackedConv3x3


SPATIAL_IMPLS = ("sdpa", "decomposed")
TEMPORAL_IMPLS = ("torch", "op")


@dataclass(frozen=True)
class AttentionImpl:
    """How a MirageUNet computes attention, fixed at construction (`MirageUNet(cfg, attention=...)`,
    or `model.with_attention(...)` for a twin sharing the weights).

    spatial:  "sdpa": one `F.scaled_dot_product_attention` call (exports as the opset-23 `Attention`
              op); "decomposed": MatMul/Softmax, because TensorRT-RTX has no fp32 kernel for
              `Attention`, so fp32 engines are exported this way.
    temporal: "torch": the stock-op `temporal_attention`; "op": the single op
              `mirage::temporal_attention` (one custom ONNX node for the TensorRT plugin on export;
              the fused CUDA kernel once `mirage.plugins_cpp.kernels.use_in_torch(lib)` registered it).
    """

    spatial: str = "sdpa"
    temporal: str = "torch"

    def __post_init__(self) -> None:
        if self.spatial not in SPATIAL_IMPLS:
            raise ConfigError(f"spatial attention {self.spatial!r}: choose one of {', '.join(SPATIAL_IMPLS)}")
        if self.temporal not in TEMPORAL_IMPLS:
            raise ConfigError(f"temporal attention {self.temporal!r}: choose one of {', '.join(TEMPORAL_IMPLS)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decomposed: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dims (see AttentionImpl.spatial)."""
    if not decomposed:
        return F.scaled_dot_product_attention(q, k, v)
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(dim=-1) @ v


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps in [0, 1000) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def zero_init(module: nn.Module) -> nn.Module:
    """Residual branches start as identity so deep stacks train from step one."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def time_shift(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, emb_dim) time embedding -> (B, cout, 1, 1), the per-channel shift forward adds. It
        depends on the timestep only, so a fixed sampler can precompute it (MirageUNet.time_table)."""
        return self.emb(emb)[:, :, None, None]

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        h = conv_add(self.conv1, F.silu(self.norm1(x)), shift)
        h = F.silu(self.norm2(h))
        if isinstance(self.conv2, PackedConv3x3):
            return self.conv2(h, residual=self.skip(x))
        # Stock path in the original order (conv2, then skip): the exported graph's node order, which
        # ModelOpt's INT8 calibration is sensitive to, stays as it was.
        h = self.conv2(h)
        return self.skip(x) + h


def conv_add(conv: nn.Module, x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """conv(x) + add (add broadcastable to the output). A PackedConv3x3 (`plugins_cpp.conv.
    pack_convolutions`) adds it in its epilogue instead of a separate kernel."""
    if isinstance(conv, PackedConv3x3):
        return conv(x, residual=add)
    return conv(x) + add


class SpatialAttention(nn.Module):
    def __init__(self, ch: int, head_dim: int, groups: int, decomposed: bool = False):
        super().__init__()
        self.decomposed = decomposed
        self.heads = max(1, ch // head_dim)
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = zero_init(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Token-major projections so that q, k, v have a unit-stride head dim: flash/cuDNN SDPA
        # need it, and without it CUDA takes the math path, which runs fp16 attention as fp32 GEMMs.
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).unflatten(2, (3, self.heads, c // self.heads)).permute(2, 0, 3, 1, 4)  # (B, heads, HW, dh)
        out = self.proj(attention(q, k, v, self.decomposed).transpose(1, 2).flatten(2))  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the projections were Linear hold them as 1x1 convs.
        for name in ("qkv.weight", "proj.weight"):
            w = state_dict.get(prefix + name)
            if w is not None and w.dim() == 4:
                state_dict[prefix + name] = w.flatten(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TemporalAttention(nn.Module):
    """Current frame's features attend, per pixel, to the K memory slots and to themselves.
    `tokens` is this layer's slice of the memory's token axis (MirageUNet.memory_slices)."""

    def __init__(self, ch: int, dim: int, heads: int, context_frames: int, groups: int, tokens: slice,
                 use_op: bool = False):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.start, self.stop = tokens.start, tokens.stop
        self.use_op = use_op  # AttentionImpl.temporal == "op"
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Linear(ch, 3 * dim)
        # Slot order in a ring buffer is arbitrary; the age embedding tells the layer which
        # frame is the most recent (index 0 is never used: empty slots are masked out).
        self.age = nn.Embedding(context_frames + 1, dim)
        self.out = zero_init(nn.Linear(dim, ch))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), memory (B, K, 2, N_total, D) of every temporal layer, ages (B, K)."""
        b, c, h, w = x.shape
        mem = memory[:, :, :, self.start:self.stop]  # (B, K, 2, HW, D): this layer's tokens
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, N, C)
        q, k_self, v_self = self.qkv(tokens).chunk(3, dim=-1)  # each (B, N, D)
        core = torch.ops.mirage.temporal_attention if self.use_op else temporal_attention
        out = self.out(core(q, k_self, v_self, mem, ages, self.age.weight, self.heads))  # (B, N, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


def temporal_attention(q: torch.Tensor, k_self: torch.Tensor, v_self: torch.Tensor, mem: torch.Tensor,
                       ages: torch.Tensor, age_table: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-pixel attention of q (B, N, D) over the K memory slots mem (B, K, 2, N, D), whose keys
    get the age embedding age_table[ages], plus the pixel's own key/value; empty slots
    (age 0) are masked. Returns (B, N, D). This is the unit the TensorRT plugin fuses.

    One query against K+1 keys per pixel is too small for a GEMM: written as broadcast products
    and sums it stays in the model's precision and fuses into a few element-wise kernels (SDPA
    would take its math path, in fp32 GEMMs)."""
    dh = q.shape[-1] // heads
    mem_k = mem[:, :, 0] + F.embedding(ages, age_table)[:, :, None, :]  # (B, K, N, D)
    keys = torch.cat([mem_k, k_self[:, None]], dim=1).unflatten(3, (heads, dh))  # (B, K+1, N, heads, dh)
    vals = torch.cat([mem[:, :, 1], v_self[:, None]], dim=1).unflatten(3, (heads, dh))
    scores = (keys * q.unflatten(2, (heads, dh))[:, None]).sum(-1) * dh ** -0.5  # (B, K+1, N, heads)
    valid = torch.cat([ages > 0, torch.ones_like(ages[:, :1], dtype=torch.bool)], dim=1)  # (B, K+1)
    scores = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
    weights = scores.softmax(dim=1)[..., None]  # (B, K+1, N, heads, 1)
    return (weights * vals).sum(1).flatten(2)  # (B, N, D)


# The same computation as one opaque op: exported as a single custom ONNX node that the
# TensorRT parser maps to the plugins_cpp plugin (op_type = plugin name).
@torch.library.custom_op("mirage::temporal_attention", mutates_args=())
def _temporal_attention_op(q: torch.Tensor, k_self: torch.Tensor, v_self: torch.Tensor, mem: torch.Tensor,
                           ages: torch.Tensor, age_table: torch.Tensor, heads: int) -> torch.Tensor:
    return temporal_attention(q, k_self, v_self, mem, ages, age_table, heads)


@_temporal_attention_op.register_fake
def _(q, k_self, v_self, mem, ages, age_table, heads):
    return torch.empty_like(q)


class ContextEncoder(nn.Module):
    """A light conv pyramid: one frame -> keys/values for every temporal layer of the U-Net."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mults]
        emb_dim = 4 * cfg.base_channels
        self.emb = nn.Sequential(nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(cfg.channels, chans[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, ch in enumerate(chans):
            self.blocks.append(ResBlock(chans[i - 1] if i else chans[0], ch, emb_dim, cfg.norm_groups))
            if i < len(chans) - 1:
                self.downs.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        down = [lvl for lvl in range(len(chans)) if lvl in cfg.temporal_levels]
        self.layer_levels = down + [len(chans) - 1] + down[::-1]  # same order as cfg.memory_layers
        self.proj = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(cfg.norm_groups, chans[lvl]), nn.Conv2d(chans[lvl], 2 * cfg.temporal_dim, 1))
            for lvl in self.layer_levels)
        self.base_channels, self.dim = cfg.base_channels, cfg.temporal_dim

    def forward(self, frame: torch.Tensor, t_ctx: torch.Tensor) -> torch.Tensor:
        emb = self.emb(timestep_embedding(t_ctx, self.base_channels).to(frame.dtype))
        h, feats = self.stem(frame), []
        for i, block in enumerate(self.blocks):
            h = block(h, block.time_shift(emb))
            feats.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        kv = []
        for lvl, proj in zip(self.layer_levels, self.proj):
            b, _, hh, ww = feats[lvl].shape
            kv.append(proj(feats[lvl]).reshape(b, 2, self.dim, hh * ww).transpose(2, 3))  # (B, 2, HW, D)
        return torch.cat(kv, dim=2)  # (B, 2, N, D)


@dataclass(frozen=True, eq=False)  # eq would compare tensors
class TimeTable:
    """The time shifts of every denoiser ResBlock for fixed timesteps (`MirageUNet.time_table`):
    with a fixed DDIM schedule they are constants per step, so a sampler computes them once."""

    timesteps: tuple[float, ...]  # the S timesteps the table was made for, in step order
    shifts: tuple[torch.Tensor, ...]  # one per ResBlock (MirageUNet.time_blocks order), each (S, cout, 1, 1)

    def step(self, i: int) -> tuple[torch.Tensor, ...]:
        """The shifts of step i, each (1, cout, 1, 1) (broadcast over the batch): for `denoise_shifted`."""
        return tuple(s[i:i + 1] for s in self.shifts)


class MirageUNet(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: AttentionImpl = AttentionImpl()):
        super().__init__()
        self.cfg, self.attention = cfg, attention
        self.grad_checkpoint = False
        chans = [cfg.base_channels * m for m in cfg.channel_mults]
        emb_dim = 4 * cfg.base_channels
        g = cfg.norm_groups
        self.time_emb = nn.Sequential(nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.in_conv = nn.Conv2d(cfg.channels + cfg.cond_channels, chans[0], 3, padding=1)
        # Token slice of each temporal layer in the memory, in cfg.memory_layers order (down path, middle, up).
        ends = [sum(cfg.memory_layers[:j + 1]) for j in range(len(cfg.memory_layers))]
        self.memory_slices = tuple(slice(end - n, end) for end, n in zip(ends, cfg.memory_layers))
        down_levels = [lvl for lvl in range(len(chans)) if lvl in cfg.temporal_levels]
        layer_index = {("down", lvl): i for i, lvl in enumerate(down_levels)}
        layer_index |= {("up", lvl): 2 * len(down_levels) - i for i, lvl in enumerate(down_levels)}
        layer_index[("mid", len(chans) - 1)] = len(down_levels)
        time_blocks: list[ResBlock] = []

        def res(cin: int, cout: int) -> ResBlock:
            block = ResBlock(cin, cout, emb_dim, g)
            block.time_index = len(time_blocks)  # its entry in time_shifts(t)
            time_blocks.append(block)
            return block

        def temporal(ch: int, path: str, level: int) -> TemporalAttention:
            return TemporalAttention(ch, cfg.temporal_dim, cfg.temporal_heads, cfg.context_frames, g,
                                     self.memory_slices[layer_index[path, level]], attention.temporal == "op")

        def spatial(ch: int, level: int) -> nn.Module:
            if level not in cfg.attn_levels:
                return nn.Identity()
            return SpatialAttention(ch, cfg.head_dim, g, attention.spatial == "decomposed")

        # Down path: per level, (ResBlock, spatial attn) x num_res_blocks, temporal attn, downsample.
        self.down, skip_chans, ch = nn.ModuleList(), [chans[0]], chans[0]
        for lvl, cout in enumerate(chans):
            level = nn.ModuleDict()
            level["res"] = nn.ModuleList()
            level["attn"] = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level["res"].append(res(ch, cout))
                level["attn"].append(spatial(cout, lvl))
                ch = cout
                skip_chans.append(ch)
            if lvl in cfg.temporal_levels:
                level["temporal"] = temporal(ch, "down", lvl)
            if lvl < len(chans) - 1:
                level["downsample"] = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
                skip_chans.append(ch)
            self.down.append(level)
        self.mid1 = res(ch, ch)
        self.mid_attn = SpatialAttention(ch, cfg.head_dim, g, attention.spatial == "decomposed")
        self.mid_temporal = temporal(ch, "mid", len(chans) - 1)
        self.mid2 = res(ch, ch)
        # Up path mirrors it, with one extra ResBlock per level to consume the downsample skip.
        self.up = nn.ModuleList()
        for lvl in reversed(range(len(chans))):
            level = nn.ModuleDict()
            level["res"] = nn.ModuleList()
            level["attn"] = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level["res"].append(res(ch + skip_chans.pop(), chans[lvl]))
                level["attn"].append(spatial(chans[lvl], lvl))
                ch = chans[lvl]
            if lvl in cfg.temporal_levels:
                level["temporal"] = temporal(ch, "up", lvl)
            if lvl > 0:
                level["upsample"] = nn.Conv2d(ch, ch, 3, padding=1)
            self.up.append(level)
        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), zero_init(nn.Conv2d(ch, cfg.channels, 3, padding=1)))
        self.context = ContextEncoder(cfg)
        self.time_blocks = tuple(time_blocks)  # a plain tuple: the blocks are registered above

    def with_attention(self, attention: AttentionImpl) -> "MirageUNet":
        """This model computing attention with `attention`: a new module tree that shares this one's
        weights (no copy; a later `.to(dtype)` or `.to(device)` of either converts only that one),
        in the same train/eval mode. For export (decomposed / op attention) and the fused kernel."""
        with torch.device("meta"):
            twin = MirageUNet(self.cfg, attention)
        twin.load_state_dict(self.state_dict(), assign=True)
        twin.grad_checkpoint = self.grad_checkpoint
        return twin.train(self.training)

    def _res(self, block: ResBlock, h: torch.Tensor, shifts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        shift = shifts[block.time_index]
        if self.grad_checkpoint and self.training:
            return checkpoint(block, h, shift, use_reentrant=False)
        return block(h, shift)

    def time_shifts(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Timesteps t (B,) -> the time shift of every denoiser ResBlock (time_blocks order), each
        (B, cout, 1, 1) in `dtype`: everything of the denoiser that depends on t alone."""
        emb = self.time_emb(timestep_embedding(t, self.cfg.base_channels).to(dtype))
        return tuple(block.time_shift(emb) for block in self.time_blocks)

    def time_table(self, timesteps: torch.Tensor, dtype: torch.dtype | None = None) -> TimeTable:
        """The time shifts of the S fixed timesteps (S,) of a sampler, computed once, in `dtype`
        (default: the weights' dtype), on the weights' device. Use `denoise_shifted(x_t,
        table.step(i), ...)` for step i; it equals `denoise(x_t, timesteps[i], ...)` up to rounding."""
        weight = self.in_conv.weight
        timesteps = torch.as_tensor(timesteps, device=weight.device)
        with torch.no_grad():
            shifts = self.time_shifts(timesteps, dtype or weight.dtype)
        return TimeTable(tuple(float(t) for t in timesteps.tolist()), shifts)

    def context_encode(self, frame: torch.Tensor, t_ctx: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) frame at noise level t_ctx (B,) -> kv (B, 2, N, D) for one ring-buffer slot."""
        return self.context(frame, t_ctx)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                memory: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """v-prediction for x_t (B, C, H, W) at timestep t (B,), given memory (B, K, 2, N, D), ages (B, K)."""
        return self.denoise_shifted(x_t, self.time_shifts(t, x_t.dtype), cond, memory, ages)

    def denoise_shifted(self, x_t: torch.Tensor, shifts: tuple[torch.Tensor, ...], cond: torch.Tensor | None,
                        memory: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """`denoise` with the timestep given as its precomputed time shifts (`time_shifts(t)` or
        `time_table(timesteps).step(i)`)."""
        if self.cfg.cond_channels:
            if cond is None:
                raise ValueError("this is a video-to-video model: pass a conditioning frame")
            x_t = torch.cat([x_t, cond], dim=1)
        h = self.in_conv(x_t)
        skips = [h]
        for level in self.down:
            for res, attn in zip(level["res"], level["attn"]):
                h = attn(self._res(res, h, shifts))
                skips.append(h)
            if "temporal" in level:
                h = level["temporal"](h, memory, ages)
                skips[-1] = h
            if "downsample" in level:
                h = level["downsample"](h)
                skips.append(h)
        h = self.mid_temporal(self.mid_attn(self._res(self.mid1, h, shifts)), memory, ages)
        h = self._res(self.mid2, h, shifts)
        for level in self.up:
            for res, attn in zip(level["res"], level["attn"]):
                h = attn(self._res(res, torch.cat([h, skips.pop()], dim=1), shifts))
            if "temporal" in level:
                h = level["temporal"](h, memory, ages)
            if "upsample" in level:
                h = level["upsample"](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)

    forward = denoise


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
