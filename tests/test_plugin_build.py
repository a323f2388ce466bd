"""Compile the TensorRT plugin library (no GPU or TensorRT runtime needed: the plugin uses TensorRT's headers
only). CI has nvcc but no TensorRT headers, so this runs only when MIRAGE_TENSORRT_ROOT names a TensorRT tree
(a directory holding include/NvInfer.h, e.g. an unpacked TensorRT release or a checkout of NVIDIA/TensorRT)."""
import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

TRT_ROOT = os.environ.get("MIRAGE_TENSORRT_ROOT")


@pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("cmake")), reason="needs nvcc and cmake")
@pytest.mark.skipif(not TRT_ROOT, reason="set MIRAGE_TENSORRT_ROOT to a TensorRT tree with include/NvInfer.h")
def test_plugin_library_compiles(tmp_path):
    assert (Path(TRT_ROOT) / "include" / "NvInfer.h").is_file(), f"MIRAGE_TENSORRT_ROOT={TRT_ROOT} has no include/NvInfer.h"
    configure = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DTensorRT_ROOT={TRT_ROOT}"],
                               capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    assert "building the plugin" in configure.stdout and "SKIPPED" not in configure.stdout
    build = subprocess.run(["cmake", "--build", str(tmp_path), "-j2", "--target", "mirage_plugin"],
                           capture_output=True, text=True)
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-3000:]
    assert not [line for line in log.splitlines() if "plugin.cpp" in line and "warning" in line], log[-3000:]

    lib = tmp_path / "libmirage_plugin.so"
    exported = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout.split()
    assert "getCreators" in exported and "setLoggerFinder" in exported  # what IPluginRegistry::loadLibrary looks up
    assert "mirage_temporal_attention" not in exported  # the kernel stays local (mirage_plugin.map)
    # Self-contained, so it can be embedded in an engine: no libnvinfer, CUDA runtime linked statically.
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    assert "nvinfer" not in needed and "libcudart" not in needed, needed
    # It loads without TensorRT or a GPU and offers one creator (getCreators(int32_t&): a pointer at the ABI level).
    plugin = ctypes.CDLL(str(lib))
    plugin.getCreators.restype = ctypes.POINTER(ctypes.c_void_p)
    count = ctypes.c_int32(0)
    creators = plugin.getCreators(ctypes.byref(count))
    assert count.value == 1 and creators[0]
    for arch in ("sm_80", "sm_86", "sm_89", "sm_90", "sm_120"):  # the kernel for every default target is embedded
        assert arch.encode() in lib.read_bytes(), arch
