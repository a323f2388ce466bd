"""ctypes access to libmirage_kernels.so, for tests and the PyTorch backend (torch tensors in, torch out)."""
from __future__ import annotations

import ctypes
from pathlib import Path

_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


class KernelError(RuntimeError):
    pass


def load(path: str | Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    fn = lib.mirage_temporal_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 7 + [ctypes.c_int] * 7 + [ctypes.c_void_p]
    return lib


def temporal_attention(lib, q, k_self, v_self, memory, ages, age_table, heads: int, token_offset: int, out=None):
    """q/k_self/v_self (B, N, D), memory (B, K, 2, N_total, D), ages (B, K) int32, age_table (K+1, D)."""
    import torch

    b, n, d = q.shape
    out = torch.empty_like(q) if out is None else out
    err = lib.mirage_temporal_attention(_DTYPES[str(q.dtype).split(".")[-1]], q.data_ptr(), k_self.data_ptr(),
                                        v_self.data_ptr(), memory.data_ptr(), ages.data_ptr(), age_table.data_ptr(),
                                        out.data_ptr(), b, n, d, memory.shape[1], heads, memory.shape[3],
                                        token_offset, torch.cuda.current_stream().cuda_stream)
    if err != 0:
        raise KernelError(f"mirage_temporal_attention returned CUDA error {err}")
    return out
