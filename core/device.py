"""The one probe of the GPU: its compute capability, from the CUDA driver API through ctypes, so
it answers on any machine with nothing installed (no torch, no cuda-python)."""
from __future__ import annotations

import ctypes
import functools
import os


@functools.lru_cache(maxsize=None)
def _probe(index: int) -> tuple[tuple[int, int] | None, str | None]:
    """((major, minor), None) for CUDA device `index`, or (None, why it cannot be used)."""
    try:
        cuda = ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1")
    except OSError:
        return None, "no NVIDIA GPU driver on this machine (libcuda.so.1 cannot be loaded)"
    device, count, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    status = cuda.cuInit(0)
    if status != 0:
        return None, f"the NVIDIA GPU driver did not start (cuInit error {status}; is a GPU visible to this process?)"
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
        return None, f"cuda:{index} asked for, but the driver sees {count.value} GPU(s)"
    if cuda.cuDeviceGet(ctypes.byref(device), index) != 0:
        return None, f"the driver cannot open cuda:{index}"
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h)
    if (cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device) != 0):
        return None, f"the driver cannot read the compute capability of cuda:{index}"
    return (major.value, minor.value), None


def compute_capability(index: int = 0) -> tuple[int, int] | None:
    """(major, minor) of CUDA device `index`; None without a driver or such a device."""
    return _probe(index)[0]


def missing_gpu(index: int = 0) -> str | None:
    """Why CUDA device `index` cannot be used here (no driver, driver not started, no such
    device), or None when it can."""
    return _probe(index)[1]


def sm_name(index: int = 0) -> str | None:
    """'sm89' for CUDA device `index` (the spelling of `mirage-export --gpu`), or None."""
    cc = compute_capability(index)
    return f"sm{cc[0]}{cc[1]}" if cc else None


def cuda_available() -> bool:
    return compute_capability(0) is not None
