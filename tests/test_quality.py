"""A short version of scripts/quality.py on the bundled models: bounds a collapse would break."""
import sys
from pathlib import Path

import pytest

from conftest import CKPT_GEN, CKPT_V2V

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import quality  # noqa: E402  (scripts/ is not a package)


def test_video_to_video_holds_up():
    report = quality.evaluate(CKPT_V2V, frames=60, window=20)
    psnr = [w["psnr"] for w in report["windows"]]
    assert len(psnr) == 3 and min(psnr) > 33, psnr  # 500-frame runs measure ~39 dB (docs/QUALITY.md)
    assert abs(report["drift_db"]) < 2
    assert all(w["collapsed"] == 0 for w in report["windows"])


def test_generation_stays_alive():
    report = quality.evaluate(CKPT_GEN, frames=60, window=20)
    data = report["data"]
    for w in report["windows"]:
        assert w["collapsed"] == 0
        assert w["sharpness"] > 0.4 * data["sharpness"]  # a blur-out or flat frames fall far below
        assert 0.3 * data["motion"] < w["motion"] < 3 * data["motion"]  # frozen or exploding video fails
        assert w["hist_distance"] < 2 * data["hist_distance"]


def test_psnr_and_ssim_are_right():
    import torch

    a = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(quality.ssim(a, a), torch.ones(2))
    assert quality.psnr(a, a + 0.02).mean().item() == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.0004)).item(),
                                                                    rel=1e-4)
