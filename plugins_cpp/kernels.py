"""ctypes access to libmirage_kernels.so: for tests, and as the CUDA kernel of the PyTorch op
`mirage::temporal_attention`, so the PyTorch backend (eager, compiled or graph-captured) runs the
fused kernel (`use_in_torch`).

The library is built with CMake: `cmake -S . -B build && cmake --build build` -> build/libmirage_kernels.so
"""
from __future__ import annotations

import ctypes
from pathlib import Path

from mirage.core.errors import MirageError

_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
_CUDA_ERRORS = {1: "cudaErrorInvalidValue (a shape or dtype the kernel does not support)"}


class KernelError(MirageError, RuntimeError):
    pass


def load(path: str | Path) -> ctypes.CDLL:
    path = Path(path)
    if not path.is_file():
        raise KernelError(f"{path}: no kernel library; build it with `cmake -S . -B build && cmake --build build`")
    lib = ctypes.CDLL(str(path.resolve()))
    args = [ctypes.c_int] + [ctypes.c_void_p] * 7 + [ctypes.c_int] * 7
    lib.mirage_temporal_attention.argtypes = args + [ctypes.c_void_p]
    lib.mirage_temporal_attention_strided.argtypes = args + [ctypes.c_int, ctypes.c_void_p]
    lib.mirage_temporal_attention_config.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 6 + [ctypes.c_int] * 8
                                                     + [ctypes.POINTER(ctypes.c_int)] * 2)
    for fn in (lib.mirage_temporal_attention, lib.mirage_temporal_attention_strided,
               lib.mirage_temporal_attention_config):
        fn.restype = ctypes.c_int
    return lib


def _call_args(q, k_self, v_self, memory, age_table, heads: int, token_offset: int, out):
    """The C ABI's arguments from tensors: q/k/v keep evenly spaced rows (else contiguous copies),
    memory keeps a token slice in place (else a contiguous copy); the ages pointer goes between
    memory and age_table, and the stream last."""
    import torch

    b, n, d = q.shape
    rows = q.stride(1)
    if not all(t.stride() == (n * rows, rows, 1) for t in (q, k_self, v_self)):
        q, k_self, v_self, rows = q.contiguous(), k_self.contiguous(), v_self.contiguous(), d
    ctx = memory.shape[1]
    total = memory.stride(2) // d  # a token slice of the ring buffer is read in place, at its own start
    if memory.stride() != (ctx * 2 * total * d, 2 * total * d, total * d, d, 1):
        memory, total = memory.contiguous(), memory.shape[3]
    out = torch.empty(b, n, d, dtype=q.dtype, device=q.device) if out is None else out
    pointers = [t.data_ptr() for t in (q, k_self, v_self, memory, age_table.contiguous(), out)]
    return _DTYPES[str(q.dtype).split(".")[-1]], pointers, [b, n, d, ctx, heads, total, token_offset, rows], out


def _check(err: int) -> None:
    if err != 0:
        raise KernelError(f"mirage_temporal_attention: CUDA error {err} {_CUDA_ERRORS.get(err, '')}".rstrip())


def temporal_attention(lib, q, k_self, v_self, memory, ages, age_table, heads: int, token_offset: int = 0,
                       out=None):
    """q/k_self/v_self (B, N, D) with unit channel stride and evenly spaced rows (e.g. chunks of
    one (B, N, 3D) projection), memory (B, K, 2, N_total, D) or a token slice of it, ages (B, K)
    int32, age_table (K+1, D). Launches on the current stream; returns out (B, N, D)."""
    import torch

    dtype, (pq, pk, pv, pm, pt, po), ints, out = _call_args(q, k_self, v_self, memory, age_table, heads,
                                                            token_offset, out)
    _check(lib.mirage_temporal_attention_strided(dtype, pq, pk, pv, pm, ages.data_ptr(), pt, po, *ints,
                                                 torch.cuda.current_stream(q.device).cuda_stream))
    return out


def launch_config(lib, q, k_self, v_self, memory, age_table, heads: int, token_offset: int = 0,
                  out=None) -> tuple[int, int]:
    """(elements per thread and load, threads per block) of the launch `temporal_attention` would
    make with these arguments: which code path a call exercises."""
    dtype, pointers, ints, _ = _call_args(q, k_self, v_self, memory, age_table, heads, token_offset, out)
    vec, threads = ctypes.c_int(), ctypes.c_int()
    _check(lib.mirage_temporal_attention_config(dtype, *pointers, *ints, ctypes.byref(vec), ctypes.byref(threads)))
    return vec.value, threads.value


_registered: dict[str, ctypes.CDLL] = {}


def use_in_torch(path: str | Path) -> None:
    """Give `mirage::temporal_attention` this library's kernel on CUDA tensors (once per process).
    Models opt in at construction (`AttentionImpl(temporal="op")`); on other devices the op
    keeps the stock-op implementation."""
    if _registered:
        return
    import torch

    lib = _registered.setdefault("lib", load(path))

    @torch.library.register_kernel("mirage::temporal_attention", "cuda")
    def _fused(q, k_self, v_self, mem, ages, age_table, heads):
        if ages.dtype != torch.int32:
            ages = ages.to(torch.int32)
        return temporal_attention(lib, q, k_self, v_self, mem, ages.contiguous(), age_table, heads)
