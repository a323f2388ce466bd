"""A short version of `mirage-quality` on the bundled models: bounds a collapse would break; the metrics on
frames whose answer is known."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CKPT_GEN, CKPT_V2V
from mirage.cli.quality import main as quality_cli
from mirage.core import metrics as M
from mirage.bridge.quality import evaluate


def test_video_to_video_holds_up():
    report = evaluate(CKPT_V2V, frames=60, window=20)
    psnr = [w["psnr"] for w in report["windows"]]
    assert len(psnr) == 3 and min(psnr) > 33, psnr  # 500-frame runs measure ~39 dB (docs/QUALITY.md)
    assert abs(report["drift_db"]) < 2
    assert report["collapsed_frames"] == 0 and report["steps"] == 4


def test_generation_stays_alive():
    report = evaluate(CKPT_GEN, frames=60, window=20)
    data = report["data"]
    for w in report["windows"]:
        assert w["collapsed"] == 0
        assert w["sharpness_ratio"] > 0.4  # a blur-out or flat frames fall far below
        assert 0.3 < w["motion_ratio"] < 3  # frozen or exploding video fails
        assert w["hist_distance"] < 2 * data["hist_distance"]
        assert w["feature_distance"] < 3 * data["feature_distance"]
        assert w["sharpness_ratio"] == pytest.approx(w["sharpness"] / data["sharpness"])


def test_psnr_and_ssim_are_right():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (2, 16, 16, 3))
    assert np.allclose(M.ssim(a, a), 1)
    assert M.ssim(a, -a).max() < 0.1
    assert M.psnr(a, a + 0.02).mean() == pytest.approx(10 * np.log10(4 / 0.0004), rel=1e-6)


def test_ssim_is_one_definition_in_numpy_and_torch():
    """The report's numpy SSIM and the autoencoder's torch SSIM agree to rounding, borders included."""
    import torch

    from mirage.model.ssim import ssim as torch_ssim

    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, (2, 24, 20, 3))
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1)
    to_torch = lambda x: torch.from_numpy((x + 1) / 2).permute(0, 3, 1, 2)  # noqa: E731  (T, H, W, C) [-1, 1] -> [0, 1]
    assert np.allclose(M.ssim(a, b), torch_ssim(to_torch(a), to_torch(b)).numpy(), atol=1e-12)
    edge = a.copy()
    edge[:, 0] = -a[:, 0]  # a change only in the first row: zero padding and valid windows weigh it differently
    assert np.allclose(M.ssim(a, edge), torch_ssim(to_torch(a), to_torch(edge)).numpy(), atol=1e-12)


def test_frame_statistics_on_known_videos():
    flat = np.zeros((5, 8, 8, 3))
    assert M.sharpness(flat) == 0 and M.motion(flat) == 0 and M.collapsed(flat).all()
    step = np.zeros((1, 8, 8, 3))
    step[:, :, 4:] = 1  # one vertical edge: the Laplacian is +-1 on the two columns beside it
    assert M.sharpness(step) == pytest.approx(2 / 6)
    ramp = np.arange(6, dtype=float)[:, None, None, None] * 0.1 * np.ones((6, 4, 4, 3))  # constant change
    assert M.motion(ramp) == pytest.approx(0.1) and M.flicker(ramp) == pytest.approx(0)
    blink = np.where(np.arange(6) % 2, 0.5, -0.5)[:, None, None, None] * np.ones((6, 4, 4, 3))
    assert M.motion(blink) == pytest.approx(1) and M.flicker(blink) == pytest.approx(2)
    assert not M.collapsed(np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 3))).any()


def test_histogram_and_feature_distances():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(-1, 1, (40, 16, 16, 3)), rng.uniform(-1, 1, (40, 16, 16, 3))
    assert M.histogram_distance(M.colour_histogram(a), M.colour_histogram(a)) == 0
    assert M.histogram_distance(M.colour_histogram(np.full((1, 4, 4, 3), -0.9)),
                                M.colour_histogram(np.full((1, 4, 4, 3), 0.9))) == 1
    feats = M.RandomConvFeatures()
    fa, fb = M.feature_stats(feats(a)), M.feature_stats(feats(b))
    assert M.frechet_distance(fa, fa) == pytest.approx(0, abs=1e-6)
    blurred = (a + np.roll(a, 1, axis=1) + np.roll(a, 1, axis=2) + np.roll(a, (1, 1), axis=(1, 2))) / 4
    same_kind, blur = M.frechet_distance(fa, fb), M.frechet_distance(fa, M.feature_stats(feats(blurred)))
    assert blur > 10 * same_kind  # two noise videos look alike to the bank; blur does not
    # Gaussians with known parameters: |mu1-mu2|^2 + tr(c1 + c2 - 2 sqrt(c1 c2)) for commuting c1, c2
    c1, c2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert M.frechet_distance((np.zeros(2), c1), (np.ones(2), c2)) == pytest.approx(2 + (1 + 9 - 6) + (4 + 1 - 4))


def test_cli_writes_the_report_and_refuses_bad_sizes(tmp_path):
    out = tmp_path / "q.json"
    result = CliRunner().invoke(quality_cli, [str(CKPT_GEN), "--frames", "6", "--window", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [w["start"] for w in report["windows"]] == [0, 3] and "flicker_ratio" in report["windows"][0]
    assert "flicker_ratio" in result.output
    bad = CliRunner().invoke(quality_cli, [str(CKPT_GEN), "--frames", "4", "--window", "5"])
    assert bad.exit_code == 2 and "window" in bad.output and "Traceback" not in bad.output
    empty = CliRunner().invoke(quality_cli, [str(tmp_path)])
    assert empty.exit_code == 2 and "neither an artifact" in empty.output


def test_streams_are_independent_seeds_averaged():
    both = evaluate(CKPT_GEN, frames=6, window=3, seed=5, streams=2)
    one = [evaluate(CKPT_GEN, frames=6, window=3, seed=s) for s in (5, 6)]
    for w, a, b in zip(both["windows"], one[0]["windows"], one[1]["windows"]):
        for key in ("sharpness", "motion", "hist_distance", "feature_distance"):
            assert w[key] == pytest.approx((a[key] + b[key]) / 2, rel=1e-3), key
            assert w["std"][key] == pytest.approx(abs(a[key] - b[key]) / 2, rel=1e-2, abs=1e-6), key
    assert a["sharpness"] != b["sharpness"]  # two seeds, two videos


def test_detailed_data_and_example_frames(tmp_path):
    """--data picks the clips the rollout is scored on; --examples writes input | output | truth strips."""
    from PIL import Image

    from mirage.bridge.quality import reference_clip

    folder = tmp_path / "examples"
    args = [str(CKPT_V2V), "--frames", "6", "--window", "3", "--data", "detailed", "--examples", str(folder),
            "--json", str(tmp_path / "q.json")]
    result = CliRunner().invoke(quality_cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["source"] == "detailed"
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 3  # frames 0, 3 and 5
    strip = np.asarray(Image.open(pngs[-1]))
    size = 32  # the bundled tiny-v2v
    assert strip.shape == (size, 3 * size, 3)
    truth = reference_clip(size, 6, 10_000, "detailed")[5]
    assert np.abs(strip[:, 2 * size:].astype(int) - (truth + 1) * 127.5).max() <= 1  # the right is the truth
    gray = strip[:, :size].astype(int)  # the input, in RGB: luma of the truth, colour in 4x4 blocks
    luma = (truth + 1) * 127.5 @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray @ np.array([0.299, 0.587, 0.114]) - luma).max() <= 2
    assert not np.array_equal(reference_clip(size, 6, 10_000, "synthetic"), reference_clip(size, 6, 10_000, "detailed"))
    bad = CliRunner().invoke(quality_cli, [str(CKPT_V2V), "--data", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_the_bundled_one_step_student_matches_its_teacher():
    """checkpoints/tiny-v2v-1step, distilled from tiny-v2v (4 steps) through a 2-step student on an
    H100: it samples in one step by default and keeps the teacher's quality (500 frames x 8 streams
    on the GPU: 39.24 dB against the teacher's 39.20)."""
    from conftest import ROOT

    student = evaluate(ROOT / "checkpoints" / "tiny-v2v-1step", frames=40, window=20)
    teacher = evaluate(CKPT_V2V, frames=40, window=20)
    assert student["steps"] == 1 and teacher["steps"] == 4
    s, t = (np.mean([w["psnr"] for w in r["windows"]]) for r in (student, teacher))
    assert s > t - 0.5, (s, t)  # the teacher with 1 step loses ~6 dB (33.4 dB measured)
    assert student["collapsed_frames"] == 0
