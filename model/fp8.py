"""FP8 E4M3 matmuls for the DiT's block step (Hopper, Ada, Blackwell; and torch's CPU kernel).

`to_fp8(model, ...)` swaps the transformer blocks' nn.Linear layers (self- and cross-attention q, k, v, o;
the FFN's two) for `Fp8Linear`, which runs `torch._scaled_mm` on E4M3 operands:

* weights: quantized once, per output channel (scale = the row's amax / 448), kept in E4M3 (half of
  bf16's bytes);
* activations: per tensor with a static scale calibrated from a recorded rollout (`calibrate`: the amax
  of each layer's input over a few blocks of a clip, what export's "max" calibration does), or per token
  (row) with a dynamic scale computed on the device at every call.

`torch._scaled_mm` (torch 2.11 and 2.13) takes a (M, K) row-major and a (K, N) column-major E4M3 operand
(a row-major (N, K) weight transposed), K and N multiples of 16 on CUDA, and float32 scales that are
either both scalars (per tensor) or (M, 1) and (1, N) (row-wise), contiguous; a per-tensor activation
scale with per-channel weight scales is therefore passed row-wise, the scalar expanded to (M, 1). Row-wise
scaling on CUDA writes bf16 only, and takes a bias only in bf16/fp16 output (the bias is then fused into
the GEMM's epilogue); a float32 output (the CPU's float32 model) gets its bias added after. A layer whose
K or N is not a multiple of 16 stays as it was (the report names it).

Nothing here reads a device value on the host, so the step stays capturable as a CUDA graph, and
torch.compile traces `_scaled_mm` like any aten op.

`fp8_rollout_psnr` measures what it costs: the same clip (prompt, noise) from the model as it is and from
an FP8 copy, per latent frame.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from mirage.core.errors import MirageError
from mirage.core.metrics import latent_psnr
from mirage.model.dit import WanDiT
from mirage.model.dit_cache import BlockStepper

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
ACTIVATIONS = ("static", "dynamic")  # per-tensor calibrated scales, or per-token scales at run time
ALIGN = 16  # _scaled_mm on CUDA: K and N multiples of 16
TINY = 1e-12  # an all-zero tensor gets this amax, not a division by zero


class Fp8Error(MirageError, ValueError):
    """An FP8 option the model cannot take (an unknown activation mode, calibration missing)."""


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The dequantization scale that maps `amax` onto E4M3's largest value (float32)."""
    return amax.float().clamp(min=TINY) / E4M3_MAX


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to E4M3 (values past the calibrated range saturate instead of overflowing)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


class Fp8Linear(nn.Module):
    """nn.Linear as an E4M3 GEMM: weights per output channel, activations per tensor (`input_amax`, a
    calibrated static range) or per token (`input_amax` None: scales computed per call). Output in the
    input's dtype."""

    def __init__(self, linear: nn.Linear, input_amax: float | None, fast_accum: bool = True):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = fp8_scale(weight.abs().amax(dim=1, keepdim=True))  # (N, 1)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", fp8_quantize(weight, scale))  # (N, K) row-major: .t() is column-major
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, N)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("input_scale", None if input_amax is None else
                             fp8_scale(torch.tensor(input_amax, device=weight.device)))  # on the GEMM's device
        self.fast_accum = fast_accum

    def _apply(self, fn, recurse=True):
        """Move with the module but keep every dtype: `model.to(bfloat16)` must not turn the E4M3 weights or
        the float32 scales (which _scaled_mm requires) into bf16."""
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(fn(buf.new_empty(0, dtype=torch.float32)).device)
        return self

    def extra_repr(self) -> str:
        mode = "dynamic per-token" if self.input_scale is None else f"static amax {self.input_scale * E4M3_MAX:.3g}"
        return f"{self.in_features} -> {self.out_features}, E4M3, weights per channel, activations {mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.input_scale is None:
            scale = fp8_scale(rows.abs().amax(dim=1, keepdim=True))
        else:
            scale = self.input_scale.expand(rows.shape[0], 1).contiguous()
        fused = x.dtype != torch.float32  # _scaled_mm takes a bias only for a 16-bit output
        y = torch._scaled_mm(fp8_quantize(rows, scale), self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                             bias=self.bias.to(x.dtype) if fused and self.bias is not None else None,
                             out_dtype=x.dtype, use_fast_accum=self.fast_accum)
        if not fused and self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def fp8_layers(model: WanDiT) -> dict[str, nn.Linear]:
    """The transformer blocks' linear layers FP8 applies to (attention projections, FFN), by name; the
    embeddings and the head stay in the model's dtype (little work, most sensitive)."""
    names = [f"{attn}.{p}" for attn in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]
    return {f"blocks.{i}.{n}": blk.get_submodule(n) for i, blk in enumerate(model.blocks) for n in names}


def aligned(linear: nn.Linear) -> bool:
    return linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0


def rollout_inputs(model: WanDiT, blocks: int, batch: int = 1, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompt embeddings (B, text_len, text_dim) and per-block noise (blocks, steps, B, in_dim, N, h, w)
    on the model's device, from `seed`."""
    cfg, device = model.cfg, model.patch_embedding.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, device=device, generator=gen)
    noise = torch.randn(blocks, cfg.steps, batch, cfg.in_dim, cfg.block_frames, *cfg.latent_size, device=device,
                        generator=gen)
    return text, noise


@torch.no_grad()
def rollout(model: WanDiT, text: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The clean latents (B, in_dim, blocks·N, h, w) float32 of a clip from an empty cache (eager steps)."""
    stepper = BlockStepper(model, noise.shape[2], model.patch_embedding.weight.device,
                           model.patch_embedding.weight.dtype)
    stepper.set_prompt(text)
    return torch.cat([stepper.step(n).float() for n in noise], dim=2)


@torch.no_grad()
def calibrate(model: WanDiT, text: torch.Tensor | None = None, blocks: int | None = None, seed: int = 0
              ) -> dict[str, float]:
    """Each FP8 layer's input amax over a recorded clip of `blocks` blocks (default: until the window has
    rolled once) with prompt `text` (default: random embeddings), in the model's dtype and device."""
    cfg = model.cfg
    blocks = blocks or cfg.window_frames // cfg.block_frames + 1
    random_text, noise = rollout_inputs(model, blocks, seed=seed)
    amax: dict[str, float] = {}

    def hook(name):
        def record(_module, inputs, _output):
            amax[name] = max(amax.get(name, 0.0), float(inputs[0].detach().abs().max()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in fp8_layers(model).items()]
    try:
        rollout(model, random_text if text is None else text, noise)
    finally:
        for h in handles:
            h.remove()
    return amax


def to_fp8(model: WanDiT, activations: str = "static", amax: dict[str, float] | None = None,
           fast_accum: bool = True) -> dict:
    """Swap the model's FP8 layers (`fp8_layers`) for Fp8Linear in place; `amax` (static activations): each
    layer's calibrated input range (`calibrate`). Returns the recipe, as reports record it."""
    if activations not in ACTIVATIONS:
        raise Fp8Error(f"FP8 activations {activations!r}: choose {' or '.join(ACTIVATIONS)}")
    layers = fp8_layers(model)
    if activations == "static":
        missing = [n for n, m in layers.items() if aligned(m) and n not in (amax or {})]
        if missing:
            raise Fp8Error(f"static FP8 scales need a calibration of every layer; none for {', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''}")
    kept = []
    for name, linear in layers.items():
        if not aligned(linear):
            kept.append(name)
            continue
        parent, child = name.rsplit(".", 1)
        fp8 = Fp8Linear(linear, amax[name] if activations == "static" else None, fast_accum)
        model.get_submodule(parent).register_module(child, fp8)
    return {"matmuls": "fp8-e4m3", "weights": "per output channel", "activations":
            "per tensor, static (calibrated amax)" if activations == "static" else "per token, dynamic",
            "fast_accum": fast_accum, "layers": len(layers) - len(kept), "kept_high_precision": kept}


def fp8_copy(model: WanDiT, activations: str = "static", calibration_text: torch.Tensor | None = None,
             fast_accum: bool = True) -> tuple[WanDiT, dict]:
    """An FP8 copy of `model` (the original is untouched), calibrated on a clip with `calibration_text`
    when its activations are static; returns it and its recipe."""
    amax = calibrate(model, calibration_text) if activations == "static" else None
    fp8 = copy.deepcopy(model)
    return fp8, to_fp8(fp8, activations, amax, fast_accum)


def fp8_rollout_psnr(model: WanDiT, frames: int = 50, activations: str = "static", seed: int = 0,
                     fast_accum: bool = True) -> dict:
    """PSNR per latent frame of a `frames`-latent-frame clip from an FP8 copy of `model` against `model`
    itself (its dtype: bf16 on a GPU), same prompt and noise; calibrated (static activations) on another
    clip and prompt (`seed` + 1), so the measure does not see its own calibration. Any checkpoint: load it
    (mirage.model.wan_checkpoint.load_dit), pass the model."""
    cfg = model.cfg
    blocks = -(-frames // cfg.block_frames)
    calibration_text, _ = rollout_inputs(model, 1, seed=seed + 1)
    fp8, recipe = fp8_copy(model, activations, calibration_text, fast_accum)
    text, noise = rollout_inputs(model, blocks, seed=seed)
    ref, out = rollout(model, text, noise)[0], rollout(fp8, text, noise)[0]
    frame_psnr = latent_psnr(out.transpose(0, 1).cpu().numpy(), ref.transpose(0, 1).cpu().numpy())
    return {"config": cfg.name, "reference": str(model.patch_embedding.weight.dtype).removeprefix("torch."),
            "frames": int(ref.shape[1]), "unit": "latent frames", "blocks": blocks, "recipe": recipe,
            "psnr_mean_db": float(frame_psnr.mean()), "psnr_min_db": float(frame_psnr.min()),
            "psnr_last10_db": float(frame_psnr[-10:].mean()), "finite": bool(torch.isfinite(out).all()),
            "psnr_db": [float(p) for p in np.round(frame_psnr, 3)]}
