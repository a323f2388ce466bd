"""The one probe of the machine: a GPU's compute capability and free memory, from the CUDA driver
API through ctypes, so it answers on any machine with nothing installed (no torch, no cuda-python),
and the host memory a process may still take."""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from mirage.core.errors import MirageError


class InsufficientMemoryError(MirageError):
    """A model that would not fit in the memory left; refused before it is allocated."""


@functools.lru_cache(maxsize=None)
def _driver():
    """The CUDA driver library, or None without one."""
    try:
        return ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1")
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def _probe(index: int) -> tuple[tuple[int, int] | None, str | None]:
    """((major, minor), None) for CUDA device `index`, or (None, why it cannot be used)."""
    cuda = _driver()
    if cuda is None:
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


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_headroom() -> int | None:
    """What the container's memory limit (cgroup v2) leaves; None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def host_available_bytes() -> int:
    """What the kernel (and the container's limit) would still hand this process."""
    try:
        free = _meminfo_available()
    except (OSError, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    headroom = _cgroup_headroom()
    return min(free, headroom) if headroom is not None else free


def gpu_free_bytes(index: int) -> int | None:
    """Free memory of CUDA device `index` (cuMemGetInfo in its primary context, the one torch and
    the runtime's CUDA path use, so asking creates nothing); None without a driver or such a device."""
    cuda = _driver()
    if cuda is None or compute_capability(index) is None:
        return None
    device, ctx = ctypes.c_int(0), ctypes.c_void_p()
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    if cuda.cuDeviceGet(ctypes.byref(device), index) != 0 or \
            cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device) != 0:
        return None
    try:
        if cuda.cuCtxPushCurrent_v2(ctx) != 0:
            return None
        try:
            ok = cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
        finally:
            cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    finally:
        cuda.cuDevicePrimaryCtxRelease_v2(device)
    return free.value if ok else None


def free_bytes(device: str) -> int | None:
    """Memory free on `device` ("cpu", "cuda", "cuda:N"): host memory for the CPU, the GPU's own
    memory for CUDA; None where it cannot be asked."""
    if device.startswith("cuda"):
        return gpu_free_bytes(int(device.partition(":")[2] or 0))
    return host_available_bytes()


def require_memory(needed: int, device: str, what: str) -> None:
    """Refuse, in one line, `what` needing `needed` bytes on `device` when less is free there
    (before it is allocated: the OS would kill the process without a word)."""
    free = free_bytes(device)
    if free is not None and needed > free:
        gib = 2 ** 30
        raise InsufficientMemoryError(f"{what} needs about {needed / gib:.1f} GiB on {device}, but {free / gib:.1f} "
                                      f"GiB are free there; use a smaller model or batch")
