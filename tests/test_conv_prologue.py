"""mirage::conv3x3's GroupNorm + SiLU prologue off the GPU: the statistics helper, the reference
path and PackedConv3x3 against stock F.group_norm / F.silu / F.conv2d (border included: the
padding comes after the activation), and the Triton kernel itself through Triton's CPU
interpreter on tiny shapes (tests/gpu/test_gpu_conv.py runs it compiled)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mirage.plugins_cpp.conv import (ConvConfig, ConvError, PackedConv3x3, conv3x3_reference, group_norm_stats,
                                     pack_weight, quantize_fp8)


def _input(b, c, h, w, seed=0):
    """Rows with their own mean and spread, so that per-row statistics matter."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.linspace(-2, 3, b).view(b, 1, 1, 1)
    spread = torch.linspace(0.5, 4, b).view(b, 1, 1, 1)
    return torch.randn(b, c, h, w, generator=g) * spread + shift + 0.3 * torch.randn(1, c, 1, 1, generator=g)


def _stock(x, groups, gamma, beta, eps, weight, bias, residual):
    return F.conv2d(F.silu(F.group_norm(x, groups, gamma, beta, eps)), weight, bias, padding=1) + residual


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("eps", [1e-5, 0.5])  # 0.5: only eps inside the square root matches
def test_stats_are_group_norms(layout, eps):
    x = _input(3, 12, 5, 4)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mean, rstd = group_norm_stats(x, 4, eps)
    assert mean.shape == rstd.shape == (3, 4) and mean.dtype == rstd.dtype == torch.float32
    grouped = x.reshape(3, 4, -1)  # (B, G, C/G x HW)
    normed = ((grouped - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    torch.testing.assert_close(normed, F.group_norm(x, 4, eps=eps), rtol=1e-5, atol=1e-5)
    assert (mean[0] - mean[-1]).abs().min() > 1  # the rows really differ


CASES = [(2, 15, 5, 7, 6, 5), (2, 21, 3, 4, 9, 3), (1, 7, 7, 1, 8, 7), (3, 9, 1, 6, 5, 1)]  # b, cin, h, w, cout, G


@pytest.mark.parametrize("b, cin, h, w, cout, groups", CASES, ids=lambda v: str(v))
def test_reference_is_conv_of_silu_of_group_norm(b, cin, h, w, cout, groups):
    g = torch.Generator().manual_seed(1)
    x = _input(b, cin, h, w, seed=2)
    weight, bias = torch.randn(cout, cin, 3, 3, generator=g), torch.randn(cout, generator=g)
    gamma, beta = 1 + 0.5 * torch.randn(cin, generator=g), torch.randn(cin, generator=g)
    residual = torch.randn(b, cout, h, w, generator=g)
    eps = 1e-3
    mean, rstd = group_norm_stats(x, groups, eps)
    out = conv3x3_reference(x, pack_weight(weight), None, bias, residual, mean, rstd, gamma, beta)
    ref = _stock(x, groups, gamma, beta, eps, weight, bias, residual)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # Padding before the activation would add silu(group_norm(0)) at the border: the data must tell.
    wrong = F.conv2d(F.silu(_normalise_padded(x, mean, rstd, gamma, beta)), weight, bias) + residual
    border = torch.ones(h, w, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert (wrong - ref)[..., border].abs().max() > 0.1
    torch.testing.assert_close(wrong[..., ~border], ref[..., ~border], rtol=1e-4, atol=1e-4)


def _normalise_padded(x, mean, rstd, gamma, beta):
    """The wrong order: zero-pad x first, then normalise (with x's statistics), (B, C, H + 2, W + 2)."""
    b, c = x.shape[:2]
    padded = F.pad(x, (1, 1, 1, 1)).reshape(b, mean.shape[1], c // mean.shape[1], -1)  # (B, G, C/G, pixels)
    normed = ((padded - mean[..., None, None]) * rstd[..., None, None]).reshape(b, c, x.shape[2] + 2, -1)
    return normed * gamma[:, None, None] + beta[:, None, None]


@pytest.mark.parametrize("weights", ["native", "fp8"])
@pytest.mark.parametrize("affine", [True, False])
def test_packed_conv_fuses_its_group_norm(weights, affine):
    torch.manual_seed(3)
    norm, conv = nn.GroupNorm(5, 35, eps=1e-4, affine=affine), nn.Conv2d(35, 12, 3, padding=1)
    if affine:
        nn.init.normal_(norm.weight, 1, 0.5)
        nn.init.normal_(norm.bias, 0, 1)
    x = _input(2, 35, 6, 5, seed=4).contiguous(memory_format=torch.channels_last)
    skip = torch.randn(2, 12, 1, 1)
    packed = PackedConv3x3.from_conv(conv, weights, norm=norm)
    with torch.no_grad():
        ref = conv(F.silu(norm(x))) + skip
        out = packed(x, residual=skip)
        plain = PackedConv3x3.from_conv(conv, weights)(F.silu(norm(x)), residual=skip)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)  # same weights, same rounding
    bound = 1e-5 if weights == "native" else 0.05
    assert ((out - ref).norm() / ref.norm()).item() < bound
    assert set(packed.state_dict()) == {"weight", "bias", "norm_weight", "norm_bias"} | ({"scale"} if weights == "fp8"
                                                                                         else set())


def test_op_registration_with_and_without_prologue():
    """Schema, fake (meta) kernel and the CPU path agree, with the old five-argument call too."""
    x = _input(2, 8, 4, 3)
    weight, bias = pack_weight(torch.randn(6, 8, 3, 3)), torch.randn(6)
    mean, rstd = group_norm_stats(x, 2)
    gamma, beta = torch.randn(8), torch.randn(8)
    torch.library.opcheck(torch.ops.mirage.conv3x3.default, (x, weight, None, bias, None))
    torch.library.opcheck(torch.ops.mirage.conv3x3.default, (x, weight, None, bias, None, mean, rstd, gamma, beta))
    torch.library.opcheck(torch.ops.mirage.group_norm_stats.default, (x, 2, 1e-5))


def test_prologue_refuses_what_cannot_work():
    x = _input(1, 12, 4, 4)
    weight = pack_weight(torch.randn(4, 12, 3, 3))
    mean, rstd = group_norm_stats(x, 3)
    gamma, beta = torch.ones(12), torch.zeros(12)
    with pytest.raises(ConvError, match="all four or none"):
        conv3x3_reference(x, weight, None, None, None, mean, rstd, None, None)
    with pytest.raises(ConvError, match="float32"):
        conv3x3_reference(x, weight, None, None, None, mean.half(), rstd.half(), gamma, beta)
    for bad in (torch.zeros(2, 3), torch.zeros(1, 5)):  # another batch; groups that do not divide 12 channels
        with pytest.raises(ConvError, match="do not fit x"):
            conv3x3_reference(x, weight, None, None, None, bad, bad, gamma, beta)
    with pytest.raises(ConvError, match="do not fit 12 channels"):
        conv3x3_reference(x, weight, None, None, None, mean, rstd, gamma[:8], beta)
    with pytest.raises(ConvError, match="5 groups do not divide 12"):
        group_norm_stats(x, 5)
    with pytest.raises(ConvError, match="normalises 8 channels"):
        PackedConv3x3.from_conv(nn.Conv2d(12, 4, 3, padding=1), norm=nn.GroupNorm(2, 8))


INTERPRETED = {  # name -> (weights, tile config, with the prologue); 70 pixels and 30 channels leave tails in M and K
    "native_nosplit": ("native", ConvConfig(32, 16, 16, split=1), True),
    "fp8_split3": ("fp8", ConvConfig(16, 16, 16, split=3), True),  # the second kernel sums and adds the residual
    "no_prologue": ("native", ConvConfig(16, 16, 16, split=3), False),  # the path without it still works
}


def interpreted_errors() -> dict[str, tuple[float, float]]:
    """(relative error, bound) of conv3x3_triton against the reference for each INTERPRETED case and of
    the Triton GroupNorm statistics against stock PyTorch's (CPU tensors; run with TRITON_INTERPRET=1
    set before triton is imported)."""
    from mirage.plugins_cpp.conv import conv3x3_triton, group_norm_stats_triton

    b, cin, cout, h, w, groups = 2, 30, 24, 5, 7, 5  # 6 channels per group: K blocks of 16 cross groups
    g = torch.Generator().manual_seed(5)
    x = _input(b, cin, h, w, seed=6).half()
    native = pack_weight(torch.randn(cout, cin, 3, 3, generator=g) * (9 * cin) ** -0.5).half()
    bias, residual = torch.randn(cout, generator=g).half(), torch.randn(b, cout, h, w, generator=g).half()
    mean, rstd = group_norm_stats(x, groups)
    gamma, beta = 1 + 0.5 * torch.randn(cin, generator=g), torch.randn(cin, generator=g)
    errors = {}
    for layout in ("nchw", "channels_last"):  # a mean far from 0 against the spread: no cancellation allowed
        far = (_input(b, cin, h, w, seed=7) + 50).half()
        far = far.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else far
        got, want = group_norm_stats_triton(far, groups, 1e-3), group_norm_stats(far, groups, 1e-3)
        errors[f"stats_{layout}"] = (max(((s - t).abs() / t.abs()).max().item() for s, t in zip(got, want)), 1e-5)
    for name, (weights, config, prologue) in INTERPRETED.items():
        packed, scale = quantize_fp8(native) if weights == "fp8" else (native, None)
        norm = (mean, rstd, gamma, beta) if prologue else (None,) * 4
        out = conv3x3_triton(x, packed, scale, bias, residual, config, **dict(zip(("mean", "rstd", "gamma", "beta"),
                                                                                  norm)))
        ref = conv3x3_reference(x, packed, scale, bias, residual, *norm)
        assert out.shape == ref.shape == (b, cout, h, w)
        # fp16 rounding of the activations and of the output
        errors[name] = (((out.double() - ref.double()).norm() / ref.double().norm()).item(), 2e-3)
    return errors


def test_triton_kernel_in_the_interpreter():
    """The kernels, run by Triton's CPU interpreter in a fresh process (the interpreter is chosen when
    triton and the kernels are first imported), match the reference within fp16 rounding."""
    pytest.importorskip("triton", reason="the conv kernel is written in Triton")
    tests = os.path.dirname(__file__)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    code = ("import json, torch, test_conv_prologue as t; torch.set_num_threads(1); "
            "print(json.dumps(t.interpreted_errors()))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.splitlines()[-1])
    assert set(errors) == set(INTERPRETED) | {"stats_nchw", "stats_channels_last"}
    for name, (rel, bound) in errors.items():
        assert rel < bound, f"{name}: relative error {rel:.2e}"
