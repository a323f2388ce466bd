"""The Triton split-K 3x3 convolution (mirage::conv3x3) against its stock-PyTorch meaning (the same
packed, dequantised weights through F.conv2d in fp32): odd and seed880m shapes, fp16 / bf16
activations, native and FP8 weights, NCHW / channels-last / misaligned inputs, with and without
bias and residual, split-K and not, and inside a CUDA graph."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mirage.plugins_cpp.conv import ConvConfig, ConvError, PackedConv3x3, conv3x3_reference

pytestmark = pytest.mark.gpu

BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative L2 error of the output's rounding


@pytest.fixture(scope="module", autouse=True)
def triton():
    return pytest.importorskip("triton", reason="the conv kernel is written in Triton")


def _case(b, cin, cout, h, w, dtype, weights, layout="nchw", seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1).cuda()
    with torch.no_grad():
        conv.weight.normal_(0, (9 * cin) ** -0.5, generator=g)
        conv.bias.normal_(0, 0.1, generator=g)
    packed = PackedConv3x3.from_conv(conv.to(dtype), weights)
    x = torch.randn(b, cin + 1, h, w, generator=g, device="cuda").to(dtype)
    if layout == "misaligned":  # channels 1.. of a channels-last tensor: odd address, odd pixel stride
        x = x.contiguous(memory_format=torch.channels_last)[:, 1:]
    else:  # NCHW is read through a channels-last copy
        x = x[:, :cin].contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                  torch.contiguous_format)
    return packed, x, g


def _check(out, packed, x, residual):
    ref = conv3x3_reference(x, packed.typed_weight, packed.scale, packed.bias, residual)
    assert out.shape == ref.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel < BOUND[x.dtype], f"relative error {rel:.2e}"


SHAPES = [(1, 960, 1536, 8, 8), (1, 1536, 1536, 8, 8), (1, 384, 960, 16, 16), (1, 1920, 960, 16, 16),
          (2, 40, 48, 5, 7), (1, 3, 24, 9, 9), (3, 64, 16, 1, 1)]


@pytest.mark.parametrize("weights", ["native", "fp8"])
@pytest.mark.parametrize("dtype", list(BOUND), ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_{}to{}_{}x{}".format(*s))
def test_conv_matches_reference(shape, dtype, weights):
    packed, x, g = _case(*shape, dtype, weights, layout="channels_last")
    with torch.no_grad():
        _check(packed(x), packed, x, None)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "misaligned"])
@pytest.mark.parametrize("residual", ["none", "full", "shift"])
@pytest.mark.parametrize("config", [None, ConvConfig(split=1), ConvConfig(64, 128, 128, split=7, num_stages=3),
                                    ConvConfig(32, 64, 32, split=100, num_stages=3)],
                         ids=["default", "no_split", "wide_split7", "small_split_max"])
def test_conv_layouts_epilogues_and_configs(layout, residual, config):
    from mirage.plugins_cpp.conv import conv3x3_triton

    b, cin, cout, h, w = 2, 200, 136, 6, 10  # CIN, COUT and the pixels all leave partial tiles
    packed, x, g = _case(b, cin, cout, h, w, torch.float16, "native", layout, seed=1)
    res = {"none": None, "full": torch.randn(b, cout, h, w, generator=g, device="cuda").half(),
           "shift": torch.randn(b, cout, 1, 1, generator=g, device="cuda").half().expand(b, cout, h, w)}[residual]
    with torch.no_grad():
        out = conv3x3_triton(x, packed.typed_weight, packed.scale, packed.bias, res, config)
        _check(out, packed, x, res)
        again = conv3x3_triton(x, packed.typed_weight, packed.scale, packed.bias, res, config)
    assert torch.equal(out, again)  # split-K sums in a fixed order: deterministic


def test_conv_in_a_cuda_graph():
    packed, x, _ = _case(1, 1536, 1536, 8, 8, torch.float16, "fp8", layout="channels_last", seed=2)
    static_x = x.clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            packed(static_x)  # warm-up: compile and autotune outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = packed(static_x)
        for seed in range(3):  # fresh inputs each replay: nothing of the previous call may remain
            static_x.copy_(torch.randn(x.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
            graph.replay()
            _check(out, packed, static_x, None)


def test_conv_refuses_fp32_activations():
    packed, x, _ = _case(1, 64, 64, 8, 8, torch.float32, "native")
    with pytest.raises(ConvError, match="float16 or bfloat16"):
        packed(x)


@pytest.mark.parametrize("weights, bound", [("native", 1e-2), ("fp8", 2e-2)])  # CPU reference path: fp8 1.8e-3
def test_packed_denoiser_matches_stock(make_random_tiny, weights, bound):
    """The tiny denoiser in fp16 with its 16x16 and 8x8 convolutions packed: the output stays
    within fp16 (native) or E4M3 (fp8) rounding of the stock model's."""
    from mirage.plugins_cpp.conv import pack_convolutions

    model = make_random_tiny("generate", seed=0).cuda().half()
    cfg, g = model.cfg, torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, cfg.channels, cfg.image_size, cfg.image_size, generator=g, device="cuda").half()
    memory = torch.randn(1, cfg.context_frames, 2, cfg.memory_tokens, cfg.temporal_dim, generator=g,
                         device="cuda").half()
    args = (x, torch.tensor([500.0], device="cuda"), None, memory, torch.tensor([[1, 0, 2, 3]], device="cuda"))
    with torch.no_grad():
        ref = model.denoise(*args).double()
        assert pack_convolutions(model, lambda: model.denoise(*args), max_pixels=256, weights=weights)
        out = model.denoise(*args).double()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < bound, f"relative difference {rel:.2e}"
