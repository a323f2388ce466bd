"""GPU tests: every test here carries the `gpu` marker and is skipped on a machine without CUDA,
so the CPU run collects and skips them. On the GPU machine: `python -m pytest tests/gpu -m gpu`.

(tests/gpu is a package so that this conftest does not shadow tests/conftest.py, which test
modules import as `conftest`.)"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; on the GPU machine run `python -m pytest tests/gpu -m gpu`")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kernel_library(tmp_path_factory) -> Path:
    """libmirage_kernels.so built once per session for this device's architecture (e.g. 90 on an
    H100 or H200), so the tests run the code the device really executes (no PTX JIT)."""
    for tool in ("cmake", "nvcc"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} not found on PATH: the GPU tests build plugins_cpp with CMake and nvcc")
    major, minor = torch.cuda.get_device_capability()
    build = tmp_path_factory.mktemp("kernels")
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_ARCHITECTURES={major}{minor}"],
                ["cmake", "--build", str(build), "-j", "--target", "mirage_kernels"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return build / "libmirage_kernels.so"


@pytest.fixture(scope="session")
def kernels_lib(kernel_library):
    from mirage.plugins_cpp import kernels

    return kernels.load(kernel_library)
