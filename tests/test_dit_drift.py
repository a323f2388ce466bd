"""The DiT's drift beside the U-Net over several truth clips (bridge/dit_quality.compare_drift,
scripts/dit_drift.py): each clip is exactly the run of that clip alone, and the summary is over the clips."""
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CKPT_V2V
from mirage.bridge.dit_quality import compare_drift, format_drift_table
from mirage.model.dit_pipeline import DiTPipeline, DiTSpec
from mirage.train.dit import PROMPT_FILE

DIT = Path(__file__).resolve().parent.parent / "checkpoints" / "dit-tiny-taesd"


def test_each_clip_is_its_own_run_and_the_summary_is_over_the_clips():
    both = compare_drift(CKPT_V2V, DIT, clips=2, frames=7, window=3)  # 7 frames: 6, whole 2-frame blocks
    alone = compare_drift(CKPT_V2V, DIT, clips=1, seed=1, frames=7, window=3)
    assert [c["seed"] for c in both["clips"]] == [0, 1] and alone["clips"][0]["seed"] == 1
    for name, report in alone["clips"][0]["reports"].items():
        assert report["frames"] == 6 and report["seed"] == 1, name
        assert both["clips"][1]["reports"][name]["windows"] == report["windows"], name
        assert both["clips"][1]["reports"][name]["drift_db"] == report["drift_db"], name
    assert alone["summary"]["drift_db"]["dit restyle"]["per_clip"] == [alone["clips"][0]["reports"]["dit restyle"]
                                                                        ["drift_db"]]
    reports = [c["reports"] for c in both["clips"]]
    drift = both["summary"]["drift_db"]
    for name in ("ae", "unet", "dit restyle", "dit degraded"):
        values = [r[name]["drift_db"] for r in reports]
        assert values[0] != values[1], name  # two seeds, two clips
        assert drift[name]["per_clip"] == values
        assert drift[name]["mean"] == pytest.approx(np.mean(values))
        assert drift[name]["std"] == pytest.approx(abs(values[0] - values[1]) / 2)
        assert (drift[name]["min"], drift[name]["max"]) == (min(values), max(values))
        if name != "ae":
            assert drift[f"{name} - ae"]["per_clip"] == [r[name]["drift_db"] - r["ae"]["drift_db"] for r in reports]
    for i, w in enumerate(both["summary"]["windows"]):
        assert w["unet"] == pytest.approx(np.mean([r["unet"]["windows"][i]["psnr"] for r in reports]))
        assert w["dit restyle - ae"] == pytest.approx(w["dit restyle"] - w["ae"])
        assert w["dit restyle ssim"] == pytest.approx(np.mean([r["dit restyle"]["windows"][i]["ssim"] for r in reports]))
    table = format_drift_table(both["summary"])
    assert f"| 3-6 | {both['summary']['windows'][1]['ae']:.2f} |" in table
    assert f"{drift['dit restyle']['mean']:+.2f} +- {drift['dit restyle']['std']:.2f}" in table


def test_the_dit_runs_in_the_dtype_asked_for():
    """dit_drift asks for float32 on every device (a GPU's default is bfloat16): the weights and the codec
    take the dtype given, on the CPU as on a GPU."""
    with DiTPipeline.open(DiTSpec("dit-tiny-taesd", checkpoint=DIT), DIT / PROMPT_FILE, "cpu", dtype="bfloat16") as pipe:
        assert next(pipe.model.parameters()).dtype == torch.bfloat16
        assert next(pipe.decoder.codec.parameters()).dtype == torch.bfloat16


def test_each_model_is_opened_once_whatever_the_clips(monkeypatch):
    """compare_drift opened the DiT twice a clip (restyle, degraded), its autoencoder and the U-Net once a clip:
    now each once per call, and its clips are still each their own run (the test above)."""
    import mirage.bridge.dit_quality as dq
    import mirage.bridge.quality as q

    opened = []

    def counted(name, module, attribute):
        real = getattr(module, attribute)
        monkeypatch.setattr(module, attribute, lambda *a, **k: opened.append(name) or real(*a, **k))

    counted("dit", dq.DiTPipeline, "open")
    counted("autoencoder", dq, "load_frame_codec")
    counted("unet", q, "load_pipeline")
    report = compare_drift(CKPT_V2V, DIT, clips=3, frames=4, window=3)
    assert [c["seed"] for c in report["clips"]] == [0, 1, 2]
    assert sorted(opened) == ["autoencoder", "dit", "unet"], opened
