"""Shared fixtures for the Mirage test suite (CPU only, small and fast)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tensors here are tiny: one intra-op thread is fastest, and far faster than 2 when the CPU is shared
# (thread hand-offs stall under load). Override with MIRAGE_TEST_THREADS=N.
torch.set_num_threads(int(os.environ.get("MIRAGE_TEST_THREADS", "1")))

ROOT = Path(__file__).resolve().parent.parent
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
