"""scripts/dit_drift.py's rollouts on the GPU (bridge/dit_quality.compare_drift with device cuda): float32 there
as on the CPU, so the autoencoder's round trip (no noise in it) scores as the CPU's does, and each clip is its
own seed. `python -m pytest tests/gpu/test_gpu_dit_drift.py -m gpu`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mirage.bridge.dit_quality import autoencoder_roundtrip, compare_drift

pytest.importorskip("diffusers")  # the bundled models' TAESD autoencoder (pip install -e '.[latent]')

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


@pytest.mark.gpu
def test_the_drift_comparison_runs_on_the_gpu_in_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # as dit_drift.py: float32 convolutions
    gpu = compare_drift(CHECKPOINTS / "tiny-128-v2v", CHECKPOINTS / "dit-tiny-taesd", clips=2, frames=6, window=3,
                        device="cuda")
    for run in gpu["clips"]:
        cpu = autoencoder_roundtrip(CHECKPOINTS / "dit-tiny-taesd", 6, 3, seed=run["seed"])
        ae = run["reports"]["ae"]
        assert [w["psnr"] for w in ae["windows"]] == pytest.approx([w["psnr"] for w in cpu["windows"]], abs=1e-3)
        assert run["reports"]["dit restyle"]["precision"] == "float32"
        assert run["reports"]["dit restyle"]["device"] == "cuda"
    drift = gpu["summary"]["drift_db"]
    assert drift["dit restyle"]["per_clip"][0] != drift["dit restyle"]["per_clip"][1]  # two seeds, two clips
