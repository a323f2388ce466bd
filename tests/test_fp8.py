"""FP8 E4M3 matmuls (mirage.model.fp8) on the CPU: torch's CPU `_scaled_mm` against an emulation in float32
(the E4M3 cast round trip), the scales' granularity, the swap on dit-tiny, and the rollout measure."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from mirage.core.config import get_dit_config
from mirage.model import fp8
from mirage.model.dit import WanDiT

CFG = get_dit_config("dit-tiny")


def emulated(linear: nn.Linear, x: torch.Tensor, input_amax: float | None) -> torch.Tensor:
    """What an E4M3 GEMM computes, in float32: operands rounded through E4M3 at their scales and back."""
    w = linear.weight.float()
    w_scale = w.abs().amax(1, keepdim=True) / 448
    rows = x.reshape(-1, x.shape[-1]).float()
    x_scale = rows.abs().amax(1, keepdim=True) / 448 if input_amax is None else torch.tensor(input_amax) / 448
    wq = (w / w_scale).to(torch.float8_e4m3fn).float() * w_scale
    xq = (rows / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * x_scale
    return (xq @ wq.t() + linear.bias).reshape(*x.shape[:-1], -1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("input_amax", [None, 3.0])
def test_linear_is_the_emulated_e4m3_gemm(input_amax):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(2, 10, 64)
    out = fp8.Fp8Linear(linear, input_amax)(x)
    assert out.shape == (2, 10, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, emulated(linear, x, input_amax), rtol=1e-5, atol=1e-5)
    assert 1e-3 < rel(out, linear(x)) < 0.05  # E4M3's rounding: there, and small


def test_scales_per_output_channel_and_calibrated_range():
    """Weight rows 1000x apart keep their accuracy (a per-tensor weight scale flushes the small rows), and
    the bound used fails a wrong activation range."""
    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-3, 0, 32)[:, None])
        linear.bias.zero_()
    x = torch.randn(50, 64)
    ref = linear(x)
    out = fp8.Fp8Linear(linear, float(x.abs().max()))(x)
    per_column = (out - ref).norm(dim=0) / ref.norm(dim=0)
    assert per_column.max() < 0.08  # the smallest rows too
    too_small = fp8.Fp8Linear(linear, float(x.abs().max()) / 16)(x)  # saturates most inputs
    assert rel(too_small, ref) > 0.3 > 0.08 > rel(out, ref)


def test_every_buffer_lives_on_the_linear_s_device():
    """_scaled_mm takes its scales on the operands' device: nothing may be left on the CPU for a GPU layer."""
    layer = fp8.Fp8Linear(nn.Linear(32, 16, device="meta"), 2.0)
    assert {b.device.type for b in layer.buffers()} == {"meta"}


def test_bf16_input_gives_bf16_with_the_fused_bias():
    torch.manual_seed(2)
    linear = nn.Linear(32, 16).to(torch.bfloat16)
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    out = fp8.Fp8Linear(linear, None)(x)
    assert out.dtype == torch.bfloat16
    assert rel(out, emulated(linear.float(), x.float(), None)) < 1e-2


def test_to_fp8_swaps_the_block_linears_and_survives_a_dtype_cast():
    torch.manual_seed(0)
    model = WanDiT(CFG).eval().requires_grad_(False)
    x = torch.randn(1, CFG.in_dim, CFG.block_frames, *CFG.latent_size)
    t, text = torch.full((1, CFG.block_frames), 500.0), torch.randn(1, CFG.text_len, CFG.text_dim)
    ref = model(x, t, text)
    amax = fp8.calibrate(model, text, blocks=1)
    assert set(amax) == set(fp8.fp8_layers(model)) and all(v > 0 for v in amax.values())
    recipe = fp8.to_fp8(model, "static", amax)
    assert recipe["layers"] == CFG.num_layers * 10 and recipe["kept_high_precision"] == []
    assert isinstance(model.blocks[0].self_attn.q, fp8.Fp8Linear)
    assert not isinstance(model.head.head, fp8.Fp8Linear)  # the head and embeddings stay as they were
    out = model(x, t, text)
    assert 1e-4 < rel(out, ref) < 0.05
    model.to(torch.bfloat16)  # the E4M3 weights and the float32 scales keep their dtypes
    layer = model.blocks[0].ffn[0]
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.input_scale.dtype == torch.float32
    assert rel(model(x, t, text), ref) < 0.06


def test_static_needs_calibration_and_unaligned_layers_stay():
    torch.manual_seed(0)
    model = WanDiT(dataclasses.replace(CFG, ffn_dim=200)).eval()  # 200 is no multiple of 16
    with pytest.raises(fp8.Fp8Error, match="calibration"):
        fp8.to_fp8(model, "static", {})
    with pytest.raises(fp8.Fp8Error, match="static or dynamic"):
        fp8.to_fp8(model, "per-block")
    recipe = fp8.to_fp8(model, "dynamic")
    assert recipe["kept_high_precision"] == [f"blocks.{i}.ffn.{j}" for i in range(CFG.num_layers) for j in (0, 2)]
    assert type(model.blocks[0].ffn[0]) is nn.Linear


def test_compiled_linear_equals_eager():
    torch.manual_seed(3)
    layer = fp8.Fp8Linear(nn.Linear(64, 32), None)
    x = torch.randn(3, 7, 64)
    torch.testing.assert_close(torch.compile(layer)(x), layer(x), rtol=1e-5, atol=1e-5)


def test_rollout_psnr_measures_the_fp8_copy():
    torch.manual_seed(0)
    model = WanDiT(CFG).eval().requires_grad_(False)
    first = model.blocks[0].ffn[0].weight.clone()
    report = fp8.fp8_rollout_psnr(model, frames=4)
    assert report["frames"] == 4 and len(report["psnr_db"]) == 4 and report["finite"]
    assert 40 < report["psnr_mean_db"] < 120  # E4M3's error, neither none nor a broken model's
    assert report["recipe"]["layers"] == CFG.num_layers * 10
    assert torch.equal(model.blocks[0].ffn[0].weight, first)  # the measured model is a copy
