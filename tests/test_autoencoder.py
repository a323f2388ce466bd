"""The latent autoencoder (AutoencoderTiny configured), TAESD folders, SSIM/MS-SSIM, the autoencoder stage."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mirage.core.config import AE_CONFIGS, AutoencoderConfig, ConfigError, TrainConfig, get_ae_config
from mirage.model.autoencoder import TAESD_WEIGHTS, AutoencoderError, build_autoencoder, file_sha256, \
    load_taesd_folder
from mirage.model.ssim import MS_WEIGHTS, ms_ssim, psnr, ssim
from mirage.train.autoencoder import load_autoencoder, reconstruction_loss, save_autoencoder, train_autoencoder
from mirage.train.checkpoint import CheckpointError

# Narrow and shallow: every test here runs in well under a second per forward.
SMALL = AutoencoderConfig(name="test", image_size=64, encoder_block_out_channels=(8,) * 4,
                          decoder_block_out_channels=(8,) * 4, num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4)


def frames(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.08)
    return model.eval()


# ---- config -------------------------------------------------------------------------------


def test_named_configs():
    taesd = get_ae_config("taesd")
    assert (taesd.downscale, taesd.latent_channels, taesd.latent_size) == (8, 4, 64)
    assert taesd.encoder_block_out_channels == (64,) * 4 and taesd.num_decoder_blocks == (3, 3, 3, 1)
    assert set(AE_CONFIGS) >= {"taesd", "taesd-tiny"}
    with pytest.raises(ConfigError, match="unknown autoencoder config 'nope'"):
        get_ae_config("nope")


@pytest.mark.parametrize("change, message", [
    (dict(encoder_block_out_channels=(8, 16, 16, 16)), "one width"),
    (dict(encoder_block_out_channels=(8,) * 3, num_encoder_blocks=(1,) * 3), "levels"),
    (dict(num_decoder_blocks=(1, 1)), "block counts"),
    (dict(image_size=60), "multiple of downscale=8"),
    (dict(scaling_factor=0.0), "scaling_factor"),
    (dict(weights="/x", sha256="abc"), "64 lowercase hex"),
    (dict(sha256="0" * 64), "weights is empty"),
])
def test_config_refuses_bad_values(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(SMALL, **change)


# ---- model --------------------------------------------------------------------------------


def test_shapes_8x_down_4_channels():
    ae = build_autoencoder(SMALL).eval()
    with torch.no_grad():
        z = ae.encode(frames(2, 64))
        assert z.shape == (2, 4, 8, 8)
        assert ae.decode(z).shape == (2, 3, 64, 64)
        assert ae.encode(frames(1, 48)).shape == (1, 4, 6, 6)  # fully convolutional
    three = dataclasses.replace(SMALL, encoder_block_out_channels=(8,) * 3, decoder_block_out_channels=(8,) * 3,
                                num_encoder_blocks=(1,) * 3, num_decoder_blocks=(1,) * 3)
    assert three.downscale == 4
    assert build_autoencoder(three).encode(frames(1, 64)).shape == (1, 4, 16, 16)


def test_scaling_and_shift_round_trip():
    raw = randomized(build_autoencoder(SMALL))
    scaled = build_autoencoder(dataclasses.replace(SMALL, scaling_factor=0.5, shift=0.3)).eval()
    scaled.load_state_dict(raw.state_dict())
    x = frames()
    with torch.no_grad():
        z_raw, z = raw.encode(x), scaled.encode(x)
        assert torch.allclose(z, (z_raw - 0.3) * 0.5, atol=1e-6)
        assert torch.allclose(scaled.decode(z), raw.decode(z_raw), rtol=1e-4, atol=1e-4)
        # encode is what the network computes on [-1, 1] frames: TAESD's own [0, 1] convention inside
        assert torch.allclose(z_raw, raw.taesd.encoder(x), atol=0)


# ---- TAESD folders -------------------------------------------------------------------------


def write_taesd_folder(path, **kwargs):
    """A diffusers AutoencoderTiny with random weights, saved the way published TAESD folders are."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    src = AutoencoderTiny(**kwargs)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(std=0.1)
    src.save_pretrained(path, safe_serialization=True)
    return src.eval()


@pytest.mark.parametrize("kwargs", [
    {},  # TAESD's published layout: 64 channels, (1, 3, 3, 3) / (3, 3, 3, 1) blocks
    dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4, num_encoder_blocks=(1, 1, 2, 1),
         num_decoder_blocks=(1, 2, 1, 1), scaling_factor=1.5, shift_factor=0.1),
])
def test_load_taesd_folder_matches_source(tmp_path, kwargs):
    src = write_taesd_folder(tmp_path, **kwargs)
    ae = load_taesd_folder(tmp_path)
    scale, shift = kwargs.get("scaling_factor", 1.0), kwargs.get("shift_factor", 0.0)
    assert (ae.cfg.scaling_factor, ae.cfg.shift, ae.cfg.weights) == (scale, shift, str(tmp_path))
    assert ae.cfg.sha256 == file_sha256(tmp_path / TAESD_WEIGHTS)
    x = frames(1, 64)
    with torch.no_grad():
        z_src = src.encode(x).latents
        z = ae.encode(x)
        assert torch.allclose(z, (z_src - shift) * scale, atol=1e-5)
        assert torch.allclose(ae.decode(z), src.decode(z_src).sample, atol=1e-5)
    if not kwargs:  # the named config points at the folder and loads the same weights
        named = build_autoencoder(get_ae_config("taesd").with_weights(str(tmp_path), ae.cfg.sha256)).eval()
        with torch.no_grad():
            assert torch.equal(named.encode(x), z)
        model, meta = load_autoencoder(tmp_path)  # the checkpoint loader takes TAESD folders too
        assert meta["step"] is None and model.cfg == ae.cfg


def test_taesd_folder_refusals(tmp_path):
    with pytest.raises(AutoencoderError, match="not a TAESD folder"):
        load_taesd_folder(tmp_path)
    write_taesd_folder(tmp_path, encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)
    with pytest.raises(AutoencoderError, match="sha256 is [0-9a-f]{64}, the config expects 0{64}"):
        load_taesd_folder(tmp_path, sha256="0" * 64)
    with pytest.raises(AutoencoderError, match=r"encoder_block_out_channels: folder has \(8, 8, 8, 8\), "
                                               r"config has \(64, 64, 64, 64\)"):
        build_autoencoder(get_ae_config("taesd").with_weights(str(tmp_path)))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "act_fn": "silu"}))
    with pytest.raises(AutoencoderError, match="unsupported AutoencoderTiny options {'act_fn': 'silu'}"):
        load_taesd_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    with pytest.raises(AutoencoderError, match="not an AutoencoderTiny"):
        load_taesd_folder(tmp_path)


# ---- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    ae = randomized(build_autoencoder(SMALL))
    save_autoencoder(tmp_path, ae, TrainConfig(steps=3), step=3, extra={"loss": 0.5})
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries
    loaded, meta = load_autoencoder(tmp_path, expect=SMALL)
    assert meta["step"] == 3 and loaded.cfg == SMALL
    x = frames()
    with torch.no_grad():
        assert torch.equal(loaded(x), ae(x))
    wider = dataclasses.replace(SMALL, encoder_block_out_channels=(16,) * 4)
    with pytest.raises(CheckpointError, match=r"encoder_block_out_channels: checkpoint has \(8, 8, 8, 8\), "
                                              r"asked for \(16, 16, 16, 16\)"):
        load_autoencoder(tmp_path, expect=wider)
    with pytest.raises(CheckpointError, match="not an autoencoder checkpoint"):
        load_autoencoder(tmp_path / "missing")


def test_checkpoint_with_foreign_weights_is_refused(tmp_path):
    save_autoencoder(tmp_path, build_autoencoder(SMALL), None, step=0)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["autoencoder"]["decoder_block_out_channels"] = [16] * 4
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights do not fit the autoencoder config"):
        load_autoencoder(tmp_path)


# ---- training ------------------------------------------------------------------------------


def test_training_reduces_the_loss_on_a_fixed_batch(tmp_path):
    from mirage.train.data import DetailedVideo

    batch = torch.from_numpy(np.concatenate([DetailedVideo(32, seed=99).clip(i, 1) for i in range(8)]))
    batch = batch.permute(0, 3, 1, 2).contiguous()  # (8, 3, 32, 32)
    torch.manual_seed(0)
    with torch.no_grad():
        before = reconstruction_loss(build_autoencoder(SMALL)(batch), batch).item()
    tcfg = TrainConfig(steps=40, batch_size=4, lr=1e-2, warmup=5, ema_decay=0.0, data="detailed", log_every=20,
                       save_every=1000)
    summary = train_autoencoder(SMALL, tcfg, tmp_path, crop=32, device="cpu", progress=False)
    assert summary["step"] == 40
    trained, meta = load_autoencoder(tmp_path, expect=SMALL)
    with torch.no_grad():
        after = reconstruction_loss(trained(batch), batch).item()
    assert after < 0.9 * before, (before, after)  # measured: 0.978 -> 0.826
    assert meta["crop"] == 32 and meta["train"]["steps"] == 40
    # a second run continues from the checkpoint's step to the total; --no-resume starts afresh
    more = dataclasses.replace(tcfg, steps=42)
    resumed = train_autoencoder(SMALL, more, tmp_path, crop=32, device="cpu", progress=False)
    assert (resumed["step"], resumed["trained_steps"]) == (42, 2)
    fresh = dataclasses.replace(tcfg, steps=2)
    assert train_autoencoder(SMALL, fresh, tmp_path, crop=32, device="cpu", resume=False, progress=False)["step"] == 2


def test_sigterm_to_the_process_group_saves_the_step_reached(tmp_path):
    """`timeout` and Ctrl-C signal the whole process group, data workers included: the workers
    ignore it, the loop saves the step it reached and the command exits 143 with a resume line."""
    out = tmp_path / "ae"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mirage.cli.train", "--stage", "autoencoder", "--steps", "100000",
                             "--batch-size", "1", "--crop", "32", "--workers", "1", "--device", "cpu",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, as under `timeout`
    seen = ""
    while "step 50:" not in seen:  # the first log line: 50 steps done
        line = proc.stdout.readline()
        assert line, f"mirage-train ended early: {proc.stderr.read()[-2000:]}"
        seen += line
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] >= 50
    _, meta = load_autoencoder(out)
    assert meta["step"] == summary["step"]
    resume = shlex.split(stderr.split("resume with: ")[1].splitlines()[0])
    assert resume[0] == "mirage-train"
    given = dict(zip(resume[1::2], resume[2::2]))  # every option given comes back, so a resume changes nothing
    assert given == {"--stage": "autoencoder", "--steps": "100000", "--batch-size": "1", "--crop": "32",
                     "--workers": "1", "--device": "cpu", "--out": str(out)}


def test_cli_autoencoder_stage(tmp_path):
    from mirage.cli.train import main

    out = tmp_path / "ae"
    args = ["--stage", "autoencoder", "--steps", "2", "--batch-size", "2", "--crop", "32", "--device", "cpu",
            "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["step"] == 2
    assert (out / "model.safetensors").is_file()
    result = CliRunner().invoke(main, args[:-2] + ["--ae-config", "taesd", "--out", str(out)])
    assert result.exit_code == 2
    assert "autoencoder config mismatch" in result.output and "'taesd-tiny'" in result.output
    result = CliRunner().invoke(main, args[:-2] + ["--crop", "36", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "multiple of the autoencoder's downscale 8" in result.output


# ---- SSIM, MS-SSIM, PSNR -----------------------------------------------------------------


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.3, 0.7
    c1 = (0.01 * 1.0) ** 2
    x, y = torch.full((1, 3, 32, 32), a, dtype=torch.float64), torch.full((1, 3, 32, 32), b, dtype=torch.float64)
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # zero variances: the contrast-structure term is 1
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-9)
    # two scales: cs = 1 at both, luminance at the last with weight w2 / (w1 + w2)
    w1, w2 = MS_WEIGHTS[:2]
    assert ms_ssim(x, y, scales=2).item() == pytest.approx(expected ** (w2 / (w1 + w2)), rel=1e-9)


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 40, 48, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ref = structural_similarity(x[0].permute(1, 2, 0).numpy(), y[0].permute(1, 2, 0).numpy(), channel_axis=2,
                                data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(x, y).item() == pytest.approx(ref, abs=1e-9)


def test_ms_ssim_sanity():
    x = (frames(2, 64) + 1) / 2
    assert torch.allclose(ms_ssim(x, x), torch.ones(2))
    noisy = [ms_ssim(x, (x + s * torch.randn_like(x)).clamp(0, 1)).mean().item() for s in (0.02, 0.1, 0.3)]
    assert 1 > noisy[0] > noisy[1] > noisy[2] > 0
    with pytest.raises(ValueError, match="too small for 4 scales"):
        ms_ssim(x, x, scales=4)


def test_psnr():
    x = torch.zeros(2, 3, 8, 8)
    assert torch.allclose(psnr(x, x + 0.1), torch.full((2,), 20.0))
    assert np.isclose(psnr(x, x + 0.2, data_range=2.0)[0].item(), 20.0)


def test_bundled_ae_tiny_loads_and_reconstructs():
    from conftest import ROOT

    from mirage.train.data import DetailedVideo

    model, meta = load_autoencoder(ROOT / "checkpoints" / "ae-tiny", expect=get_ae_config("taesd-tiny"))
    x = torch.from_numpy(DetailedVideo(64, seed=1000).clip(0, 2)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        quality = psnr((model(x).clamp(-1, 1) + 1) / 2, (x + 1) / 2)
    assert meta["step"] == 1500
    assert quality.min().item() > 14  # measured: 18.0 dB here; an untrained taesd-tiny gives 7.2 dB


def test_reconstruction_quality_report():
    from mirage.train.ae_eval import reconstruction_quality
    from mirage.train.data import DetailedVideo

    model = randomized(build_autoencoder(SMALL))
    row = reconstruction_quality(model, "detailed", 32, seed=7, clips=2, frames=2)
    assert (row["data"], row["size"], row["seed"], row["frames"]) == ("detailed", 32, 7, 4)
    source, recon = row["example"]
    assert source.shape == recon.shape == (32, 32, 3) and source.dtype == np.uint8
    video = np.concatenate([DetailedVideo(32, seed=7).clip(i, 2) for i in range(2)])
    x = torch.from_numpy(video).permute(0, 3, 1, 2)  # (4, 3, 32, 32)
    with torch.no_grad():
        manual = psnr((model(x).clamp(-1, 1) + 1) / 2, (x + 1) / 2)
    assert row["psnr"] == pytest.approx(manual.mean().item(), abs=1e-4)
    assert row["psnr_min"] == pytest.approx(manual.min().item(), abs=1e-4)
