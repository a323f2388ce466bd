"""GPU time by kernel kind: a profiled frame's (or block's) kernels, classed by name.

The benchmarks (scripts/bench_runtime.py for the U-Net's frame, mirage.model.dit_bench for the DiT's
block) profile one unit of work with torch.profiler and hand the kernels here as (name, device µs)
pairs, so both report the same kinds the same way.

Inductor's kernels are named after the ops they fused ("triton_poi_fused_add_convolution_3" is a bias
add after a convolution), so they are classed by their prefix, and as a norm when the fused ops
include one: a GroupNorm / LayerNorm by name, an RMSNorm by its rsqrt (Wan's RMSNorm is written out as
x * rsqrt(mean(x²) + eps), so its kernel is "..._mean_mul_pow_rsqrt..."). Library kernels are classed
by name, first match wins (cuDNN's attention is called "..._sdpa_..._flash_fprop_...", its
convolutions "...fprop_implicit_gemm...", cuBLAS's Hopper GEMMs "nvjet_...", PyTorch's own flash
attention "flash_fwd_kernel", its memory-efficient one "fmha_cutlassF...").
"""
from __future__ import annotations

LIBRARY_KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "softmax")),
    ("convolution", ("fprop", "conv")),
    ("gemm", ("gemm", "nvjet", "cutlass", "cublas")),
    ("layout/copy", ("copy", "memcpy", "memset", "fill", "nchwtonhwc", "nhwctonchw", "transpose", "cat")),
    ("normalization", ("norm",)),
    ("eager pointwise", ("elementwise",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_"):
        return ("triton norm" if "norm" in low or "rsqrt" in low else
                "triton pointwise" if low.startswith("triton_poi") else "triton reduction")
    return next((kind for kind, keys in LIBRARY_KINDS if any(k in low for k in keys)), "other")


def summarize(kernels: list[tuple[str, float]], unit: str, top: int = 12) -> dict:
    """Kernel count and time per `unit` ("frame", "block"), by kind and the `top` slowest kernel names;
    `kernels` are (name, device time in µs) of one unit."""
    total = sum(t for _, t in kernels)
    by_name: dict[str, list[float]] = {}
    by_kind: dict[str, list[float]] = {}
    for name, t in kernels:
        by_name.setdefault(name, []).append(t)
        by_kind.setdefault(kernel_kind(name), []).append(t)
    rows = sorted(((sum(v), len(v), k) for k, v in by_name.items()), reverse=True)[:top]
    share = (lambda t: t / total) if total else (lambda t: 0.0)
    return {f"kernels_per_{unit}": len(kernels), f"kernel_ms_per_{unit}": total / 1e3,
            "mean_kernel_us": total / max(1, len(kernels)),
            "by_kind": [{"kind": k, "calls": len(v), "ms": sum(v) / 1e3, "share": share(sum(v))}
                        for k, v in sorted(by_kind.items(), key=lambda kv: -sum(kv[1]))],
            "top": [{"name": k[:90], "calls": n, "ms": t / 1e3, "share": share(t)} for t, n, k in rows]}


def lines(summary: dict, unit: str) -> list[str]:
    """The summary as printed: the kinds (share, time, calls per unit), then the slowest kernels."""
    out = [f"{summary[f'kernels_per_{unit}']} kernels/{unit}, {summary[f'kernel_ms_per_{unit}']:.3f} ms "
           f"of kernel time (mean {summary['mean_kernel_us']:.1f} us)"]
    out += [f"  {r['kind']:>18}: {r['share'] * 100:5.1f}%  {r['ms']:7.3f} ms  x{r['calls']}" for r in summary["by_kind"]]
    out += [f"    {r['share'] * 100:5.1f}%  {r['ms']:7.3f} ms  x{r['calls']:<4} {r['name']}" for r in summary["top"]]
    return out
