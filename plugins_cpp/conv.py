"""`mirage::conv3x3`: a 3x3 / stride 1 / pad 1 convolution with packed, optionally FP8 weights, for
the weight-bound layers of a batch-1 denoiser. On CUDA it runs the Triton split-K implicit GEMM
of conv_triton.py; elsewhere (and as the reference) the same numbers through `F.conv2d`.

    conv = PackedConv3x3.from_conv(model_conv, weights="fp8")   # packs once ("native": conv's dtype)
    y = conv(x)                        # == model_conv(x) up to the weights' rounding
    y = conv(x, residual=skip)         # the residual add fused into the epilogue

Packed weight: (9 CIN, COUT), row = 3x3 tap * CIN + input channel, output channel innermost (the
layout the kernel streams). FP8: E4M3 with one fp32 scale per output channel (amax / 448).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mirage.core.errors import MirageError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
# Measured per GPU model and layer shape by `python -m mirage.cli.conv_tune --tuned` (plugins_cpp/conv_tune.py): the
# fastest launch, and whether it beats cuDNN at all ({device name: {shape_key: {"config", "triton_us", "cudnn_us"}}}).
TUNED = Path(__file__).with_name("conv_tuned.json")


class ConvError(MirageError, ValueError):
    """A packed-convolution setting a user chose that cannot work (weight format, activation dtype)."""


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(COUT, CIN, 3, 3) -> (9 CIN, COUT), contiguous."""
    cout, cin = weight.shape[:2]
    return weight.permute(2, 3, 1, 0).reshape(9 * cin, cout).contiguous()  # (ky, kx, ci) x co


def quantize_fp8(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed weight -> (E4M3 weight, fp32 scale per output channel (COUT,)); an all-zero channel
    gets scale 1 (so that dequantising is exact)."""
    amax = packed.float().abs().amax(dim=0)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (packed.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def unpack_weight(packed: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Packed (and dequantised, fp32 if scaled) -> (COUT, CIN, 3, 3)."""
    w = packed.float() * scale if scale is not None else packed
    cin = w.shape[0] // 9
    return w.reshape(3, 3, cin, -1).permute(3, 2, 0, 1)


def conv3x3_reference(x, weight, scale, bias, residual) -> torch.Tensor:
    """The op's meaning in stock PyTorch, fp32 accumulation, cast to x's dtype."""
    w = unpack_weight(weight, scale).float()
    out = F.conv2d(x.float(), w, None if bias is None else bias.float(), padding=1)
    if residual is not None:
        out = out + residual.float()
    return out.to(x.dtype)


@dataclass(frozen=True)
class ConvConfig:
    """One launch of the Triton kernel: output tile, K block, split of the K blocks, warps, stages."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    split: int = 1
    num_warps: int = 4
    num_stages: int = 4


def default_config(pixels: int, cin: int, cout: int, sms: int) -> ConvConfig:
    """Enough programs for about two per SM: the output tiles times a split of the 9 CIN / 64 K
    blocks, each split keeping at least 4 of them (plugins_cpp/conv_tune.py sweeps the alternatives)."""
    block_m, block_n, block_k = 64, 64, 64
    tiles = -(-pixels // block_m) * -(-cout // block_n)
    k_blocks = 9 * -(-cin // block_k)
    split = max(1, min(-(-2 * sms // tiles), k_blocks // 4))
    return ConvConfig(block_m, block_n, block_k, split)


def shape_key(pixels: int, cin: int, cout: int, fp8: bool) -> str:
    """A layer shape as the tuned table names it (pixels = batch x H x W)."""
    return f"{pixels}px {cin}->{cout} {'fp8' if fp8 else 'native'}"


@functools.cache
def tuned(device_name: str) -> dict[str, dict]:
    """The tuned table's entries for one GPU model; empty where it was never measured."""
    if not TUNED.is_file():
        return {}
    return json.loads(TUNED.read_text()).get(device_name, {})


def conv3x3_triton(x, weight, scale, bias, residual, config: ConvConfig | None = None) -> torch.Tensor:
    """The Triton kernel; returns (B, COUT, H, W) in channels-last memory (the kernel's (M, COUT) rows)."""
    import triton

    from mirage.plugins_cpp import conv_triton

    b, cin, h, w = x.shape
    cout = weight.shape[1]
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ConvError(f"packed convolutions on CUDA take float16 or bfloat16 activations, not {x.dtype}: "
                        "run the model in half precision or do not pack it")
    if weight.shape[0] != 9 * cin:
        raise ValueError(f"packed weight {tuple(weight.shape)} does not fit {cin} input channels (9 x CIN rows)")
    if x.stride(1) != 1:  # the kernel reads channel rows: a small copy of the activations, not the weights
        x = x.contiguous(memory_format=torch.channels_last)
    if config is None:
        props = torch.cuda.get_device_properties(x.device) if x.is_cuda else None
        entry = tuned(props.name).get(shape_key(b * h * w, cin, cout, weight.dtype == FP8)) if props else None
        config = ConvConfig(**entry["config"]) if entry else \
            default_config(b * h * w, cin, cout, props.multi_processor_count if props else 132)
    m = b * h * w
    out = torch.empty(b, h, w, cout, dtype=x.dtype, device=x.device)  # (M, COUT) rows
    k_blocks = 9 * triton.cdiv(cin, config.block_k)
    per_split = triton.cdiv(k_blocks, config.split)
    split = triton.cdiv(k_blocks, per_split)  # no empty programs
    partials = torch.empty(split, m, cout, dtype=torch.float32, device=x.device) if split > 1 else out
    rs = residual.stride() if residual is not None else (0, 0, 0, 0)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(cout, config.block_n), split)
    flags = dict(HAS_BIAS=bias is not None, HAS_RES=residual is not None)
    conv_triton.conv3x3_kernel[grid](
        x, weight, scale, bias, residual, out, partials, b, h, w, cin, cout, *x.stride(), *rs, per_split,
        HAS_SCALE=scale is not None, SPLIT_K=split > 1, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages, **flags)
    if split > 1:
        grid = (triton.cdiv(m, 32), triton.cdiv(cout, 128))
        conv_triton.split_epilogue_kernel[grid](partials, bias, residual, out, b, h, w, cout, split, *rs, BLOCK_M=32,
                                                BLOCK_N=128, **flags)
    return out.permute(0, 3, 1, 2)  # (B, COUT, H, W), channels-last


@torch.library.custom_op("mirage::conv3x3", mutates_args=())
def conv3x3(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
            residual: torch.Tensor | None) -> torch.Tensor:
    """x (B, CIN, H, W), packed weight (9 CIN, COUT) fp16/bf16 or E4M3 with scale (COUT,) fp32,
    bias (COUT,), residual broadcastable to (B, COUT, H, W) -> (B, COUT, H, W) in x's dtype."""
    if residual is not None:
        residual = residual.expand(x.shape[0], weight.shape[1], *x.shape[2:])
    if x.is_cuda:
        return conv3x3_triton(x, weight, scale, bias, residual)
    return conv3x3_reference(x, weight, scale, bias, residual).contiguous(memory_format=torch.channels_last)


@conv3x3.register_fake
def _(x, weight, scale, bias, residual):
    b, _, h, w = x.shape
    return x.new_empty(b, h, w, weight.shape[1]).permute(0, 3, 1, 2)


class PackedConv3x3(nn.Module):
    """An nn.Conv2d(CIN, COUT, 3, padding=1) with packed weights, run by `mirage::conv3x3`. Native
    weights follow the model's `.to(dtype)` like any buffer; FP8 weights are kept as their bytes
    (uint8), which no dtype conversion touches, so a model can be packed before the runtime moves
    it to its device and precision."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.fp8 = weight.dtype == FP8
        self.register_buffer("weight", weight.view(torch.uint8) if self.fp8 else weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weights: str = "native") -> "PackedConv3x3":
        """weights: "native" (conv's own dtype) or "fp8" (E4M3 + per-output-channel scales)."""
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1 \
                or conv.dilation != (1, 1):
            raise ValueError(f"{conv}: PackedConv3x3 takes 3x3, stride 1, padding 1, ungrouped convolutions")
        if weights not in ("native", "fp8"):
            raise ConvError(f"weights {weights!r}: choose native or fp8")
        with torch.no_grad():
            packed = pack_weight(conv.weight.detach())
            scale = None
            if weights == "fp8":
                packed, scale = quantize_fp8(packed)
            bias = None if conv.bias is None else conv.bias.detach().clone()
        return cls(packed, scale, bias)

    @property
    def typed_weight(self) -> torch.Tensor:
        """The packed weight as the op takes it: native, or E4M3 (a view of the stored bytes)."""
        return self.weight.view(FP8) if self.fp8 else self.weight

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.mirage.conv3x3(x, self.typed_weight, self.scale, self.bias, residual)


def pack_convolutions(model: nn.Module, run: Callable[[], object], max_pixels: int = 256,
                      weights: str = "native", device_name: str | None = None) -> list[str]:
    """Replace, in place, every 3x3 / stride 1 / padding 1 nn.Conv2d of `model` whose input has at
    most `max_pixels` pixels per image during `run()` (one forward pass) by a PackedConv3x3 of its
    weights; returns the replaced modules' names. With `device_name` (torch.cuda.get_device_name()),
    a layer whose shape the tuned table measured cuDNN to be faster on that GPU stays nn.Conv2d.
    The model can then go to another device and dtype (the runtime's TorchBackend does that), FP8
    weights stay FP8."""
    seen: dict[str, tuple[int, int]] = {}  # name -> (batch, pixels per image)

    def record(name: str):
        def hook(module, args):  # a pre-hook returning None leaves the call alone
            seen.setdefault(name, (args[0].shape[0], args[0].shape[2] * args[0].shape[3]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    measured = tuned(device_name) if device_name else {}
    replaced = []
    for name, (batch, n) in seen.items():
        conv = model.get_submodule(name)
        entry = measured.get(shape_key(batch * n, conv.in_channels, conv.out_channels, weights == "fp8"))
        if entry and entry["cudnn_us"] <= entry["triton_us"]:
            continue
        if n <= max_pixels and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1) \
                and conv.groups == 1 and conv.dilation == (1, 1):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, PackedConv3x3.from_conv(conv, weights))
            replaced.append(name)
    return replaced
