"""Shared fixtures for the Mirage test suite (CPU only, small and fast)."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

# Tensors here are tiny: one intra-op thread is fastest, and far faster than 2 when the CPU is shared
# (thread hand-offs stall under load). Override with MIRAGE_TEST_THREADS=N.
torch.set_num_threads(int(os.environ.get("MIRAGE_TEST_THREADS", "1")))

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is no package), for a test of its functions or its main."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
CKPT_GEN = ROOT / "checkpoints" / "tiny"
CKPT_V2V = ROOT / "checkpoints" / "tiny-v2v"


@pytest.fixture(scope="session")
def gen_model():
    from mirage.train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(CKPT_GEN)
    return model


@pytest.fixture(scope="session")
def v2v_model():
    from mirage.train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(CKPT_V2V)
    return model


def randomized_tiny(task: str = "generate", seed: int = 0):
    """A tiny model whose zero-initialised output projections are randomised, so every branch
    (temporal attention included) affects the output."""
    from mirage.core.config import get_config
    from mirage.model.unet import MirageUNet

    torch.manual_seed(seed)
    model = MirageUNet(get_config("tiny", task)).eval()
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture
def make_random_tiny():
    return randomized_tiny


@pytest.fixture(scope="session")
def onnx_artifact(tmp_path_factory):
    """An fp32 ONNX-only artifact of the generation model, batch 1 of a dynamic batch up to 2
    (tests/trt_double.engine_artifact turns copies of it into TensorRT artifacts of the TensorRT
    test double, whose contexts then get their input shapes set)."""
    from mirage.bridge.artifact import ArtifactOptions, build_artifact

    out = tmp_path_factory.mktemp("onnx") / "tiny"
    build_artifact(CKPT_GEN, out, ArtifactOptions(precision="fp32", max_batch=2, calibration_frames=2,
                                                             parity_frames=2))
    return out


@pytest.fixture
def trt(monkeypatch):
    """The TensorRT test double (tests/trt_double.py) installed as tensorrt_rtx and tensorrt, on a
    machine with two GPUs (cuda:0, cuda:1; sm89) as the runtime's CUDA seam sees it."""
    import sys

    import trt_double
    from mirage.runtime import cuda, tensorrt

    trt_double.reset()
    for name in ("tensorrt_rtx", "tensorrt"):
        monkeypatch.setitem(sys.modules, name, trt_double)
    monkeypatch.setattr(cuda, "use_device", lambda index: trt_double.CUDA.update(device=index))
    monkeypatch.setattr(tensorrt, "missing_gpu",
                        lambda index: None if index < 2 else f"cuda:{index} asked for, but the driver sees 2 GPU(s)")
    monkeypatch.setattr(tensorrt, "sm_name", lambda index: "sm89")
    return trt_double
