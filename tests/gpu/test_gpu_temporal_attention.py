"""The fused temporal-attention kernel (plugins_cpp) against the PyTorch reference
`mirage.model.unet.temporal_attention` in float64, on every path its launch can take: 16-byte,
8-byte (VEC=4 in 16 bits), 4-byte and scalar loads, heads spanning several warps, blocks that are
not whole warps (8 threads), warps holding pixels of two batch rows, a tail block, an all-empty
memory, NaN in masked slots, out-of-range ages, odd shapes, fp32/fp16/bf16. Each case asserts the
launch it expects (`kernels.launch_config`), so a change of the dispatch cannot silently skip one."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from mirage.model.unet import temporal_attention
from mirage.plugins_cpp import kernels

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
OUT_OF_RANGE = (-1, 1000, -2 ** 31, 2 ** 31 - 1)  # plus K + 1, added per case


@dataclass(frozen=True)
class Case:
    name: str
    b: int
    n: int
    d: int
    k: int
    heads: int
    total: int | None = None  # memory tokens (default n)
    offset: int = 0  # this layer's first token in the memory
    qkv: str = "separate"  # separate tensors | fused: chunks of (B, N, 3D) | padded: rows of 3D + pad elements
    pad: int = 0
    shift: int = 0  # elements by which memory, age table and out start past an aligned address
    ages: str = "some_empty"  # some_empty | all_empty | out_of_range (instead of the empty ones)
    vec: dict = field(default_factory=dict)  # element size -> expected elements per load
    threads: dict = field(default_factory=dict)  # element size -> expected threads per block


CASES = [
    Case("model_16x16_layer", 1, 256, 256, 8, 8, total=704, offset=320, qkv="fused", vec={4: 4, 2: 8}),
    Case("model_8x8_layer", 1, 64, 256, 8, 8, total=704, offset=640, qkv="fused", vec={4: 4, 2: 8}),
    Case("scalar_misaligned", 2, 33, 64, 4, 2, total=40, offset=7, shift=1, vec={4: 1, 2: 1}),
    Case("scalar_multi_warp", 1, 20, 128, 3, 1, shift=1, vec={4: 1, 2: 1}, threads={4: 128, 2: 128}),
    Case("scalar_odd_rows", 2, 17, 64, 4, 2, qkv="padded", pad=1, vec={4: 1, 2: 1}),
    Case("vec2_rows", 2, 17, 64, 4, 2, qkv="padded", pad=2, vec={4: 2, 2: 2}),
    Case("vec4_head_width_4", 1, 50, 32, 4, 8, vec={4: 4, 2: 4}, threads={4: 8, 2: 8}),
    Case("vec4_8_byte_aligned", 2, 40, 128, 4, 4, total=45, offset=5, shift=4, vec={4: 4, 2: 4}),
    Case("head_width_2", 1, 30, 64, 4, 32, vec={4: 2, 2: 2}),
    Case("multi_warp_1024", 1, 40, 1024, 4, 1, vec={4: 4, 2: 8}, threads={4: 256, 2: 128}),
    Case("multi_warp_two_heads", 2, 9, 512, 5, 2, vec={4: 4, 2: 8}, threads={4: 128, 2: 64}),
    Case("partial_warp_8_threads", 1, 64, 64, 4, 4, vec={4: 4, 2: 8}, threads={4: 16, 2: 8}),
    Case("partial_warp_two_batch_rows", 2, 301, 64, 4, 4, vec={4: 4, 2: 8}, threads={4: 32, 2: 16}),
    Case("tail_block", 1, 601, 64, 4, 4, vec={4: 4, 2: 8}, threads={4: 32, 2: 16}),
    Case("twelve_threads_per_pixel", 2, 21, 96, 4, 3, vec={4: 4, 2: 8}, threads={4: 24, 2: 12}),
    Case("one_slot", 2, 16, 64, 1, 4),
    Case("max_slots", 2, 16, 64, 32, 4, total=20, offset=3),
    Case("one_token", 3, 1, 32, 4, 1),
    Case("all_empty", 2, 64, 64, 4, 4, ages="all_empty"),
    Case("out_of_range_ages", 2, 64, 64, 6, 4, total=100, offset=11, ages="out_of_range"),
]


def _shifted(shape, shift: int, dtype, g) -> torch.Tensor:
    """A contiguous random tensor whose data starts `shift` elements past an aligned address."""
    numel = torch.Size(shape).numel()
    flat = torch.randn(numel + shift, generator=g, device="cuda").to(dtype)
    return flat[shift:].view(shape)


def _inputs(case: Case, dtype, seed: int):
    """q, k_self, v_self, memory (NaN in every masked slot), ages (int32), age table (row 0 NaN:
    never read), out (NaN: every element must be written), and the clean ages and memory that
    the reference sees (masked slots zero and age 0)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    b, n, d, k, total = case.b, case.n, case.d, case.k, case.total or case.n
    if case.qkv == "separate":
        q, ks, vs = (torch.randn(b, n, d, generator=g, device="cuda").to(dtype) for _ in range(3))
    else:
        rows = torch.randn(b, n, 3 * d + case.pad, generator=g, device="cuda").to(dtype)
        q, ks, vs = rows[..., :d], rows[..., d:2 * d], rows[..., 2 * d:3 * d]
    memory = _shifted((b, k, 2, total, d), case.shift, dtype, g)
    table = _shifted((k + 1, d), case.shift, dtype, g).mul_(0.1)
    table[0] = float("nan")
    out = _shifted((b, n, d), case.shift, dtype, g).fill_(float("nan"))
    ages = torch.stack([torch.randperm(k, generator=g, device="cuda") for _ in range(b)]) + 1  # a wrapped ring
    ages[torch.rand(b, k, generator=g, device="cuda") < 0.3] = 0
    if case.ages == "all_empty":
        ages.zero_()
    clean_ages = ages.clone()
    if case.ages == "out_of_range":
        bad = torch.tensor((k + 1,) + OUT_OF_RANGE, device="cuda")
        ages[0, 0] = 0  # at least one masked slot per row, whatever the draw
        ages[-1, -1] = 0
        clean_ages = torch.where(ages == 0, 0, clean_ages)
        ages = torch.where(ages == 0, bad[torch.arange(b * k, device="cuda").view(b, k) % len(bad)], ages)
    masked = (clean_ages == 0)[:, :, None, None, None].expand_as(memory)
    clean_memory = memory.masked_fill(masked, 0.0)
    memory.masked_fill_(masked, float("nan"))
    return q, ks, vs, memory, ages.int(), table, out, clean_ages, clean_memory


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_reference(kernels_lib, case: Case, dtype):
    q, ks, vs, memory, ages, table, out, clean_ages, clean_memory = _inputs(case, dtype, seed=len(case.name))
    size = torch.finfo(dtype).bits // 8
    vec, threads = kernels.launch_config(kernels_lib, q, ks, vs, memory, table, case.heads, case.offset, out)
    if size in case.vec:
        assert vec == case.vec[size], f"expected VEC={case.vec[size]} for {dtype}, the launch uses {vec}"
    if size in case.threads:
        assert threads == case.threads[size], f"expected {case.threads[size]}-thread blocks, the launch uses {threads}"
    kernels.temporal_attention(kernels_lib, q, ks, vs, memory, ages, table, case.heads, case.offset, out=out)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "NaN or inf in the output: a masked slot leaked, or an element was not written"
    f64 = lambda x: x.double()  # noqa: E731
    window = clean_memory[:, :, :, case.offset:case.offset + case.n]
    ref = temporal_attention(f64(q), f64(ks), f64(vs), f64(window), clean_ages.long(),
                             f64(table.nan_to_num(0.0)), case.heads)
    if case.ages == "all_empty":  # nothing to attend to but the pixel itself
        torch.testing.assert_close(out, vs.contiguous(), rtol=0, atol=0)
    torch.testing.assert_close(out.double(), ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("what, d, heads, k, total, offset", [
    ("K above MIRAGE_MAX_CONTEXT", 64, 2, 40, 8, 0),
    ("head width 48, not a power of two", 96, 2, 4, 8, 0),
    ("D not a multiple of 32", 48, 3, 4, 8, 0),
    ("tokens past the memory", 64, 2, 4, 8, 4),
])
def test_kernel_refuses_unsupported_shapes(kernels_lib, what, d, heads, k, total, offset):
    x = torch.zeros(1, 8, d, device="cuda")
    memory = torch.zeros(1, k, 2, total, d, device="cuda")
    ages = torch.ones(1, k, dtype=torch.int32, device="cuda")
    with pytest.raises(kernels.KernelError, match="cudaErrorInvalidValue"):
        kernels.temporal_attention(kernels_lib, x, x, x, memory, ages, torch.zeros(k + 1, d, device="cuda"), heads,
                                   offset)
