"""mirage::conv3x3 off the GPU: weight packing, FP8 quantisation, and the op's stock-PyTorch
path, against nn.Conv2d (the Triton kernel itself is tests/gpu/test_gpu_conv.py)."""
import json

import pytest
import torch
from torch import nn

from mirage.plugins_cpp.conv import PackedConv3x3, conv3x3_reference, pack_weight, quantize_fp8, unpack_weight


def _conv(cin=24, cout=40, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, 3, padding=1)


def test_pack_is_a_lossless_relayout():
    conv = _conv()
    packed = pack_weight(conv.weight.detach())
    assert packed.shape == (9 * 24, 40) and packed.is_contiguous()
    assert torch.equal(packed[4 * 24 + 5, 7], conv.weight[7, 5, 1, 1])  # row = tap (ky=1, kx=1) * CIN + ci
    assert torch.equal(unpack_weight(packed, None), conv.weight.detach())


def test_native_packed_conv_equals_nn_conv():
    conv = _conv()
    x = torch.randn(2, 24, 7, 5)
    with torch.no_grad():
        ref = conv(x)
        packed = PackedConv3x3.from_conv(conv)
        torch.testing.assert_close(packed(x), ref, rtol=1e-5, atol=1e-5)
        shift = torch.randn(2, 40, 1, 1)  # a per-channel residual broadcast over the pixels
        torch.testing.assert_close(packed(x, residual=shift), ref + shift, rtol=1e-5, atol=1e-5)


def test_fp8_weights_per_output_channel():
    conv = _conv()
    with torch.no_grad():
        conv.weight[3] *= 100  # one loud channel must not cost the others their precision
        conv.weight[5] = 0  # an all-zero channel stays exactly zero
    w8, scale = quantize_fp8(pack_weight(conv.weight.detach()))
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (40,)
    deq = unpack_weight(w8, scale)
    assert torch.equal(deq[5], torch.zeros_like(deq[5]))
    norm = lambda w: w.detach().flatten(1).norm(dim=1)  # noqa: E731  (per output channel)
    rel = norm(deq - conv.weight) / norm(conv.weight).clamp_min(1e-12)
    assert rel.max() < 0.05 and rel[torch.arange(40) != 5].min() > 0  # E4M3: 3 mantissa bits, really rounded
    x = torch.randn(1, 24, 8, 8)
    packed = PackedConv3x3.from_conv(conv, "fp8")
    with torch.no_grad():
        out = packed(x)
        ref = conv(x)
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    packed.half()  # the runtime converts models after packing: FP8 weights must stay FP8
    assert packed.typed_weight.dtype == torch.float8_e4m3fn and torch.equal(packed.typed_weight.view(torch.uint8),
                                                                             w8.view(torch.uint8))


def test_reference_keeps_the_activation_dtype():
    conv = _conv().half()
    x = torch.randn(1, 24, 4, 4).half()
    out = conv3x3_reference(x, pack_weight(conv.weight.detach()), None, conv.bias.detach(), None)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), nn.functional.conv2d(x.float(), conv.weight.float(), conv.bias.float(),
                                                                 padding=1), rtol=2e-3, atol=2e-3)


def test_packed_conv_refuses_other_convolutions():
    with pytest.raises(ValueError, match="3x3, stride 1, padding 1"):
        PackedConv3x3.from_conv(nn.Conv2d(8, 8, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="choose native or fp8"):
        PackedConv3x3.from_conv(_conv(), "int4")


def test_pack_convolutions_swaps_the_small_levels(make_random_tiny):
    """The tiny denoiser with its 8x8 3x3 convolutions packed gives the same output (off CUDA the
    op is F.conv2d of the same weights); other convolutions stay nn.Conv2d."""
    from mirage.plugins_cpp.conv import pack_convolutions

    model = make_random_tiny("generate", seed=0)
    cfg = model.cfg
    x = torch.randn(1, cfg.channels, cfg.image_size, cfg.image_size)
    memory = torch.randn(1, cfg.context_frames, 2, cfg.memory_tokens, cfg.temporal_dim)
    args = (x, torch.tensor([500.0]), None, memory, torch.tensor([[1, 0, 2, 0]]))
    with torch.no_grad():
        ref = model.denoise(*args)
    names = pack_convolutions(model, lambda: model.denoise(*args), max_pixels=64)
    assert names and all(isinstance(model.get_submodule(n), PackedConv3x3) for n in names)
    assert isinstance(model.in_conv, nn.Conv2d) and "in_conv" not in names  # 32x32: not weight-bound
    with torch.no_grad():
        torch.testing.assert_close(model.denoise(*args), ref, rtol=1e-5, atol=1e-5)


def test_tuned_table_keeps_cudnn_where_it_is_faster(make_random_tiny, tmp_path, monkeypatch):
    """pack_convolutions with a device name skips the shapes the tuned table measured cuDNN to win."""

    from mirage.plugins_cpp import conv

    model = make_random_tiny("generate", seed=0)
    cfg = model.cfg
    args = (torch.randn(1, cfg.channels, cfg.image_size, cfg.image_size), torch.tensor([500.0]), None,
            torch.randn(1, cfg.context_frames, 2, cfg.memory_tokens, cfg.temporal_dim), torch.tensor([[1, 0, 2, 0]]))
    tiny_64 = cfg.base_channels * cfg.channel_mults[-1]  # the 8x8 level's width
    table = {"GPU X": {conv.shape_key(64, tiny_64, tiny_64, False): {"config": {}, "triton_us": 9.0, "cudnn_us": 5.0}}}
    monkeypatch.setattr(conv, "TUNED", tmp_path / "conv_tuned.json")
    (tmp_path / "conv_tuned.json").write_text(json.dumps(table))
    conv.tuned.cache_clear()
    try:
        assert conv.pack_convolutions(make_random_tiny("generate", seed=0), lambda: None, 64) == []  # no call seen
        packed = conv.pack_convolutions(model, lambda: model.denoise(*args), 64, device_name="GPU X")
        kept = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                and m.in_channels == m.out_channels == tiny_64 and n.startswith(("mid", "down.2", "up.0"))]
        assert packed and kept and not set(kept) & set(packed)
    finally:
        conv.tuned.cache_clear()


def test_conv_tune_finds_the_shapes_and_merges_the_table_the_kernel_reads(tmp_path, monkeypatch):
    """The package's conv tuning (mirage.plugins_cpp.conv_tune; timing itself needs a GPU): the
    weight-bound shapes of a model, and a merge into the table that keeps other GPUs' entries."""
    from mirage.core.config import get_config
    from mirage.model.unet import MirageUNet
    from mirage.plugins_cpp import conv, conv_tune

    cfg = get_config("tiny")
    with torch.device("meta"):
        model = MirageUNet(cfg)
        s = cfg.image_size
        run = lambda: model.denoise(torch.empty(1, cfg.channels, s, s), torch.empty(1), None,  # noqa: E731
                                    torch.empty(1, cfg.context_frames, 2, cfg.memory_tokens, cfg.temporal_dim),
                                    torch.empty(1, cfg.context_frames, dtype=torch.long))
        shapes = conv_tune.conv_shapes(model, run, 64)
    widest = cfg.base_channels * cfg.channel_mults[-1]
    assert shapes and all(h * w <= 64 for h, w, _, _ in shapes) and (8, 8, widest, widest) in shapes
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())  # hooks removed

    table = tmp_path / "conv_tuned.json"
    table.write_text(json.dumps({"GPU A": {"k": {"config": {}, "triton_us": 1.0, "cudnn_us": 2.0}}}))
    config = {"block_m": 64, "block_n": 64, "block_k": 64, "split": 2, "num_warps": 4, "num_stages": 3}
    row = {"pixels": 64, "cin": widest, "cout": widest, "cudnn_us": 5.0, "triton_fp16_us": 3.0,
           "triton_fp8_us": 2.5, "triton_fp16_config": config, "triton_fp8_config": config}
    conv_tune.write_tuned("GPU B", [row], table)
    monkeypatch.setattr(conv, "TUNED", table)
    conv.tuned.cache_clear()
    try:
        assert conv.tuned("GPU A") == {"k": {"config": {}, "triton_us": 1.0, "cudnn_us": 2.0}}
        entry = conv.tuned("GPU B")[conv.shape_key(64, widest, widest, True)]
        assert entry == {"config": config, "triton_us": 2.5, "cudnn_us": 5.0}
    finally:
        conv.tuned.cache_clear()
