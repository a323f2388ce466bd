"""Triton kernels of `mirage::conv3x3` (conv.py): a 3x3, stride-1, pad-1 convolution as an implicit
GEMM with split-K, for the weight-bound layers of a batch-1 denoiser (8x8 / 16x16 pixels, 384 to
3072 channels), where cuDNN's tiles leave most SMs idle while the weights stream.

    out[m, n] = sum_k A[m, k] W[k, n]     m = (b, y, x) pixel, n = output channel,
                                          k = (tap = 3 ky + kx, input channel ci)

A is never materialised: each K block is one tap and BLOCK_K input channels, read from x through
its strides (coalesced when x is channels-last). W is packed once as (9 CIN, COUT), output channel
innermost, in fp16/bf16 or FP8 E4M3 with a per-output-channel scale (dequantised in registers, the
scale applied once to the accumulator). The K blocks are split over SPLIT programs per output tile
so that every SM streams weights; with SPLIT > 1 each split stores its fp32 partial tile in a
workspace (SPLIT, M, COUT) and a second kernel sums the splits in a fixed order (deterministic, unlike
atomics: graph replay stays bit-identical to eager), adds bias and residual and casts. The
workspace is small and written just before it is read, so it lives in L2. The number of splits
is a run-time value (the grid), so tuning it compiles nothing new.
"""
from __future__ import annotations

import triton
import triton.language as tl


# Sizes that only enter index math are not specialised on (one compile serves every layer shape of a
# tile config); CIN, COUT and x's strides are, since their alignment decides the load width.
@triton.jit(do_not_specialize=["B", "H", "W", "blocks_per_split", "srb", "src", "srh", "srw"])
def conv3x3_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr, acc_ptr,
                   B, H, W, CIN, COUT, sxb, sxc, sxh, sxw, srb, src, srh, srw, blocks_per_split,
                   HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                   SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    M = B * H * W
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < COUT
    b, y, x = offs_m // (H * W), (offs_m // W) % H, offs_m % W
    c_blocks = tl.cdiv(CIN, BLOCK_K)
    first = pid_k * blocks_per_split
    last = tl.minimum(first + blocks_per_split, 9 * c_blocks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(first, last):
        tap = kb // c_blocks
        ci = (kb % c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        iy, ix = y + tap // 3 - 1, x + tap % 3 - 1
        pix_ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)  # zero padding
        c_ok = ci < CIN
        a = tl.load(x_ptr + b[:, None] * sxb + iy[:, None] * sxh + ix[:, None] * sxw + ci[None, :] * sxc,
                    mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(w_ptr + (tap * CIN + ci)[:, None] * COUT + offs_n[None, :],
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, w.to(a.dtype))
    if HAS_SCALE:  # per output channel: factors out of the sum over k
        acc *= tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if not SPLIT_K:
        _epilogue(acc, offs_m, offs_n, ok, b, y, x, bias_ptr, res_ptr, out_ptr, COUT, srb, src, srh, srw,
                  HAS_BIAS, HAS_RES)
    else:
        tl.store(acc_ptr + (pid_k * M + offs_m)[:, None] * COUT + offs_n[None, :], acc, mask=ok)


@triton.jit
def _epilogue(acc, offs_m, offs_n, ok, b, y, x, bias_ptr, res_ptr, out_ptr, COUT, srb, src, srh, srw,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 + bias[n] + residual[b, n, y, x] -> out (M, COUT) in out's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < COUT, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:  # any strides: a (B, COUT, 1, 1) shift broadcast over the pixels has srh = srw = 0
        res = tl.load(res_ptr + b[:, None] * srb + offs_n[None, :] * src + y[:, None] * srh + x[:, None] * srw,
                      mask=ok, other=0.0)
        acc += res.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * COUT + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["B", "H", "W", "splits", "srb", "src", "srh", "srw"])
def split_epilogue_kernel(acc_ptr, bias_ptr, res_ptr, out_ptr, B, H, W, COUT, splits, srb, src, srh, srw,
                          HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """The split-K partials (fp32, (splits, M, COUT)), summed in split order, + bias + residual -> out."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    M = B * H * W
    ok = (offs_m < M)[:, None] & (offs_n < COUT)[None, :]
    b, y, x = offs_m // (H * W), (offs_m // W) % H, offs_m % W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(acc_ptr + (s * M + offs_m)[:, None] * COUT + offs_n[None, :], mask=ok, other=0.0)
    _epilogue(acc, offs_m, offs_n, ok, b, y, x, bias_ptr, res_ptr, out_ptr, COUT, srb, src, srh, srw,
              HAS_BIAS, HAS_RES)
