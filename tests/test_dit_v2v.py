"""Video-to-video with the DiT on a per-frame autoencoder (dit-tiny-taesd) or on TAEHV (dit-tiny, Wan's
layout), and its trainer.

Golden behaviour: strength 1 is generation from the same noise, strength 0 is the autoencoder's round trip,
a prompt switch mid-stream is a fresh stream whose cache was rebuilt from the held frames under the new
prompt; the trainer's teacher-forcing forward is exactly what the cached rollout computes."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import mirage.cli.run as run

from mirage.core.config import ConfigError, get_dit_config
from mirage.core.errors import CheckpointError
from mirage.core.flow_schedule import block_schedule, strength_schedule
from mirage.model.dit import WanDiT
from mirage.model.dit_cache import BlockStepper
from mirage.model.dit_pipeline import DiTPipeline, DiTRunError, DiTSpec
from mirage.model.latent import load_frame_codec
from mirage.model.taehv import Taehv
from mirage.train.dit import PROMPT_FILE, DiTTrainOptions, teacher_forcing_mask, flow_matching_loss, train_dit

CFG = get_dit_config("dit-tiny-taesd")
SMALL = dataclasses.replace(CFG, width=64, height=64)  # 8x8 latents: the same model, a quarter of the work


def test_strength_schedule_golden():
    rows = block_schedule(CFG.denoising_steps, CFG.timestep_shift, CFG.warp_denoising_step)
    assert rows == [(1000.0, 1.0, 0.75), (750.0, 0.75, 0.5), (500.0, 0.5, 0.25), (250.0, 0.25, 0.0)]
    assert strength_schedule(rows, 1.0) == rows
    assert strength_schedule(rows, 0.6) == [(600.0, 0.6, 0.5), (500.0, 0.5, 0.25), (250.0, 0.25, 0.0)]
    assert strength_schedule(rows, 0.5) == [(500.0, 0.5, 0.25), (250.0, 0.25, 0.0)]
    assert strength_schedule(rows, 0.1) == [(100.0, 0.1, 0.0)]
    assert strength_schedule(rows, 0.0) == []


@pytest.fixture(scope="module")
def codec():
    return load_frame_codec(CFG)


def pipeline(codec, text: torch.Tensor, seed: int = 0) -> DiTPipeline:
    torch.manual_seed(seed)
    model = WanDiT(SMALL).eval().requires_grad_(False)
    return DiTPipeline(SMALL, model, None, codec, text, torch.device("cpu"))


def clip(blocks: int, seed: int = 3, size: int = SMALL.width) -> np.ndarray:
    """Smooth frames (blocks · block_frames, size, size, 3) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-0.8, 0.8, (blocks * CFG.block_frames, 8, 8, 3)).astype(np.float32)
    return coarse.repeat(size // 8, axis=1).repeat(size // 8, axis=2)


def restyled(pipe: DiTPipeline, frames: np.ndarray) -> np.ndarray:
    n = CFG.block_frames
    return np.concatenate([pipe.restyle(frames[i:i + n]) for i in range(0, len(frames), n)])


def test_strength_one_is_generation_and_zero_is_the_round_trip(codec):
    text = torch.randn(1, CFG.text_len, CFG.text_dim)
    frames = clip(2)
    pipe = pipeline(codec, text)
    pipe.reset(7)
    generated = np.concatenate(list(pipe.blocks(2)))
    pipe.reset(7)
    pipe.set_strength(1.0)
    np.testing.assert_allclose(restyled(pipe, frames), generated, atol=1e-5)  # float rounding of the kernels
    pipe.reset(7)
    pipe.set_strength(0.0)
    round_trip = codec.decode(codec.encode(torch.from_numpy(frames).permute(0, 3, 1, 2)[None]))[0]
    np.testing.assert_allclose(restyled(pipe, frames), round_trip.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pipe.reset(7)
    pipe.set_strength(0.5)  # in between: neither the input's round trip nor a generated video
    half = restyled(pipe, frames)
    assert np.abs(half - round_trip.permute(0, 2, 3, 1).numpy()).mean() > 1e-3
    assert np.abs(half - generated).mean() > 1e-3


def test_strength_changes_between_blocks_without_a_restart(codec):
    """Block 0 at strength 0.5, block 1 at 0: the second is exactly its input's round trip, and the stream
    went on (its frame position and cache advanced by both blocks)."""
    pipe = pipeline(codec, torch.zeros(1, CFG.text_len, CFG.text_dim))
    frames = clip(2)
    pipe.reset(0)
    pipe.set_strength(0.5)
    pipe.restyle(frames[:2])
    pipe.set_strength(0.0)
    second = pipe.restyle(frames[2:])
    round_trip = codec.decode(codec.encode(torch.from_numpy(frames[2:]).permute(0, 3, 1, 2)[None]))[0]
    np.testing.assert_allclose(second, round_trip.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert pipe.stepper.cache.frames_written == 4 and int(pipe.stepper.cache.frame) == 4


def test_a_cache_from_the_input_holds_the_input_s_latents_and_restyles_as_appending_them(codec):
    """set_cache_from("input"): each block's cache-write pass takes the input block's latents, not the restyle.
    So the cache holds the encoded input, and block 1 is what a stream gets when the input's block 0 is appended
    (Self-Forcing's initial-latent path) and block 1 restyled with the same noise; with the default (output)
    cache, block 1 differs."""
    frames = clip(2)
    source = codec.encode(torch.from_numpy(frames).permute(0, 3, 1, 2)[None])  # (1, C, 4, h, w)
    pipe = pipeline(codec, torch.zeros(1, CFG.text_len, CFG.text_dim))
    pipe.reset(2)
    pipe.set_strength(0.5)
    pipe.set_cache_from("input")
    first = pipe.restyle(frames[:2])
    state = pipe.generator.get_state()
    second = pipe.restyle(frames[2:])
    torch.testing.assert_close(pipe.stepper.cache.latents[:, :, :4], source, atol=1e-6, rtol=0)

    appended = pipeline(codec, torch.zeros(1, CFG.text_len, CFG.text_dim))
    appended.reset(2)
    appended.set_strength(0.5)
    appended.stepper.append(source[:, :, :2])
    appended.generator.set_state(state)
    np.testing.assert_allclose(appended.restyle(frames[2:]), second, atol=1e-5)

    pipe.reset(2)
    pipe.set_cache_from("output")
    np.testing.assert_allclose(pipe.restyle(frames[:2]), first, atol=1e-6)  # block 0 sees no cache either way
    assert np.abs(pipe.restyle(frames[2:]) - second).mean() > 1e-3
    with pytest.raises(ConfigError, match="cache_from='both': choose one of output, input"):
        pipe.set_cache_from("both")


def test_prompt_switch_mid_stream_is_a_fresh_stream_on_the_rebuilt_cache(codec):
    """Blocks 0-1 under prompt A, then B: block 2 equals a stream that starts under B, caches the same held
    latents (append) and draws the same noise: LongLive's re-cache, in the video-to-video path."""
    a, b = torch.randn(2, 1, CFG.text_len, CFG.text_dim)
    frames = clip(3)
    pipe = pipeline(codec, a)
    pipe.reset(1)
    pipe.set_strength(0.6)
    restyled(pipe, frames[:4])
    held = pipe.stepper.cache.latents[:, :, :4].clone()
    state = pipe.generator.get_state()
    pipe.set_prompt(b)
    switched = pipe.restyle(frames[4:])

    fresh = pipeline(codec, b)
    fresh.reset(1)
    fresh.set_strength(0.6)
    for i in (0, 2):
        fresh.stepper.append(held[:, :, i:i + 2])
    fresh.generator.set_state(state)
    np.testing.assert_allclose(fresh.restyle(frames[4:]), switched, atol=1e-4)
    fresh.reset(1)
    fresh.set_strength(0.6)
    restyled(fresh, frames[:4])  # the same stream without a switch differs: the prompt is used
    assert np.abs(fresh.restyle(frames[4:]) - switched).mean() > 1e-3


def test_bad_input_is_one_clear_error(codec):
    pipe = pipeline(codec, torch.zeros(1, CFG.text_len, CFG.text_dim))
    pipe.reset(0)
    for strength in (-0.1, 1.5):
        with pytest.raises(DiTRunError, match=r"strength .*\[0, 1\]"):
            pipe.set_strength(strength)
    with pytest.raises(DiTRunError, match=r"input block of shape \(2, 32, 64, 3\); dit-tiny-taesd takes \(2, 64, 64, 3\)"):
        pipe.restyle(np.zeros((2, 32, 64, 3), np.float32))
    assert pipe.stepper.cache.frames_written == 0  # refused before anything ran


def test_taehv_restyle_is_generation_at_one_and_the_round_trip_at_zero():
    """dit-tiny (Wan's latent layout) on a random TAEHV with its encoder: the first block takes and gives
    4N - 3 frames, the next 4N; strength 1 is generation from the same noise, 0 TAEHV's round trip of the clip."""
    cfg = dataclasses.replace(get_dit_config("dit-tiny"), width=32, height=32)
    torch.manual_seed(0)
    pipe = DiTPipeline(cfg, WanDiT(cfg).eval().requires_grad_(False), None, Taehv().eval(),
                       torch.randn(1, cfg.text_len, cfg.text_dim), torch.device("cpu"))
    frames = clip(7, size=32)[:13]  # 5 + 8: two blocks of 2 latent frames
    pipe.reset(7)
    generated = np.concatenate(list(pipe.blocks(2)))

    def restyle_at(strength: float) -> np.ndarray:
        pipe.reset(7)
        pipe.set_strength(strength)
        sizes = [pipe.frames_in]
        first = pipe.restyle(frames[:5])
        sizes.append(pipe.frames_in)
        assert sizes == [5, 8] and first.shape == (5, 32, 32, 3)
        return np.concatenate([first, pipe.restyle(frames[5:])])

    np.testing.assert_allclose(restyle_at(1.0), generated, atol=1e-5)
    pipe.decoder.reset()
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]
    round_trip = pipe.decoder.decode(pipe.decoder.encode(video))[0].permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(restyle_at(0.0), round_trip, atol=1e-6)
    half = restyle_at(0.5)
    # in between: neither (a random TAEHV's frames vary little, ~0.03 std; the equalities above hold to 1e-5)
    assert np.abs(half - round_trip).mean() > 1e-4 and np.abs(half - generated).mean() > 1e-4
    pipe.reset(7)
    with pytest.raises(DiTRunError, match=r"input block of shape \(8, 32, 32, 3\); dit-tiny takes \(5, 32, 32, 3\)"):
        pipe.restyle(frames[:8])  # the first block is 3 frames short of the others


def test_teacher_forcing_forward_is_the_cached_rollout():
    """The trainer's one forward over [context | noisy] gives each noisy block the velocity the block step
    computes after the cache-write passes of the blocks before it: with the window (4 frames: it rolls
    over the 8-frame clip) and a sink (1 frame)."""
    cfg = dataclasses.replace(SMALL, window_frames=5, sink_frames=1)
    torch.manual_seed(0)
    model = WanDiT(cfg).eval().requires_grad_(False)
    frames, n = 8, cfg.block_frames
    x0, noise = torch.randn(2, 1, cfg.in_dim, frames, *cfg.latent_size)
    sigma = torch.tensor([0.9, 0.3, 0.6, 1.0]).repeat_interleave(n)
    noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    text = torch.randn(1, cfg.text_len, cfg.text_dim)
    t = torch.cat([torch.zeros(frames), 1000 * sigma])[None]
    with torch.no_grad():
        v = model(torch.cat([x0, noisy], 2), t, text, mask=teacher_forcing_mask(cfg, frames),
                  positions=torch.arange(frames).repeat(2))[:, :, frames:]
    stepper = BlockStepper(model)
    stepper.set_prompt(text)
    for b in range(frames // n):
        positions, slots = stepper._block_frames()
        with torch.no_grad():
            step_v = stepper._pass(noisy[:, :, b * n:(b + 1) * n], 1000 * sigma[b * n:(b + 1) * n][None], slots,
                                   positions, stepper.cache.span)
        torch.testing.assert_close(step_v, v[:, :, b * n:(b + 1) * n], atol=1e-4, rtol=1e-4)
        stepper.append(x0[:, :, b * n:(b + 1) * n])


def test_a_run_encodes_only_the_clips_it_can_use(tmp_path, monkeypatch, capsys):
    """512 clips were encoded before every run's first step (about 7 minutes of a shared CPU core): now no more
    than the steps draw (max_steps x batch_size), nor than ENCODE_SHARE of the time budget encodes (whole batches
    of 16, one at least); a --latents file holding enough clips is read instead, one holding fewer is replaced.
    The codec here encodes a clip in 1 s of a fake clock and gives its index, so the test takes no encoding time."""
    import types

    import mirage.train.dit as dit_train
    import mirage.train.latent_cache as latent_cache

    now = [0.0]

    class Codec:  # clip k (k-th of the stream) -> latents all k, (B, C, h, w) per frame
        made = 0

        def encode(self, frames):
            now[0] += 1.0 * len(frames) / CFG.window_frames
            first, Codec.made = Codec.made, Codec.made + len(frames) // CFG.window_frames
            index = torch.arange(first, Codec.made).repeat_interleave(CFG.window_frames)
            return index[:, None, None, None].float().expand(len(frames), CFG.in_dim, *CFG.latent_size)

    monkeypatch.setattr(latent_cache, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(dit_train, "load_frame_codec", lambda cfg, device: types.SimpleNamespace(codec=Codec()))

    def clips(**options) -> torch.Tensor:  # of 48 at most (the default 512 would only take longer)
        Codec.made = 0
        return dit_train.encoded_clips(DiTTrainOptions(out=str(tmp_path / "dit"), clips=48, progress=False, **options),
                                       CFG)

    latents = clips(max_steps=3, batch_size=7)
    assert latents.shape == (21, CFG.in_dim, CFG.window_frames, *CFG.latent_size)
    assert torch.equal(latents[:, 0, 0, 0, 0], torch.arange(21.0))  # the stream's first 21 clips, in order
    assert clips(minutes=2)[:, 0, 0, 0, 0].tolist() == list(range(48))  # 48 s of encoding: within half of 2 minutes
    assert "clips encoded" not in capsys.readouterr().err
    assert len(clips(minutes=1)) == 32  # 30 s: 2 batches of 16 s, the second one crossing 30 s
    assert "note: 32 of 48 clips encoded, as many as 50% of the 1-minute budget allowed" in capsys.readouterr().err
    assert len(clips(minutes=0)) == 16  # one batch at least
    file = str(tmp_path / "latents.safetensors")
    assert len(clips(minutes=1, latents=file)) == 32 and Codec.made == 32
    assert len(clips(max_steps=2, batch_size=8, latents=file)) == 16 and Codec.made == 0  # read from the file
    assert len(clips(latents=file)) == 48 and Codec.made == 48  # more than the file holds: encoded and saved
    assert len(clips(max_steps=5, latents=file)) == 40 and Codec.made == 0


def test_a_two_step_training_run_saves_a_checkpoint_mirage_run_reads(tmp_path):
    out = tmp_path / "dit"
    meta = train_dit(DiTTrainOptions(out=str(out), max_steps=2, batch_size=1, clips=1, progress=False, threads=1))
    assert meta["step"] == 2 and np.isfinite(meta["loss"])
    with DiTPipeline.open(DiTSpec("dit-tiny-taesd", checkpoint=out), out / PROMPT_FILE, device="cpu") as pipe:
        pipe.reset(0)
        pipe.set_strength(0.5)
        assert pipe.restyle(clip(1, size=128)).shape == (2, 128, 128, 3)
        saved = dict(pipe.model.state_dict())
    from safetensors.torch import load_file
    trained = load_file(out / "model.safetensors")
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
    report = tmp_path / "r.json"
    result = CliRunner().invoke(run.main, [str(a) for a in (
        out, "--dit", "dit-tiny-taesd", "--input", "synthetic", "--frames", 2, "--strength", 0.25, "--prompt-embeds",
        out / PROMPT_FILE, "--cache-from", "input", "--output", tmp_path / "v2v", "--json", report)],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = json.loads(report.read_text())
    assert written["written"] == 2 and written["strength"] == 0.25 and written["psnr_vs_input_db"] > 5
    assert written["cache_from"] == "input" and "the input blocks" in result.output
    with pytest.raises(CheckpointError, match="window_frames: checkpoint has 8, asked for 6"):
        DiTPipeline.open(DiTSpec("dit-tiny-taesd", checkpoint=out, window=6), out / PROMPT_FILE, device="cpu")


def test_loss_falls_on_one_batch():
    """The loss is learnable: ten AdamW steps on one batch of two clips lower it (a sign error or a mask
    that hid the context would not)."""
    torch.manual_seed(0)
    model = WanDiT(SMALL)
    latents = torch.randn(2, SMALL.in_dim, SMALL.window_frames, *SMALL.latent_size).cumsum(2) / 3  # correlated frames
    text, mask = torch.zeros(2, SMALL.text_len, SMALL.text_dim), teacher_forcing_mask(SMALL, SMALL.window_frames)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(10):
        loss = flow_matching_loss(model, latents, text, mask, 0.1, torch.Generator().manual_seed(5))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_the_bundled_dit_says_when_it_enlarges_a_small_input(tmp_path):
    """A 16x16 clip restyled by the 128x128 bundled DiT: the same warning as the U-Net's path gives."""
    from mirage.cli.run import PACKAGE_ROOT
    from mirage.core.video_io import write_video

    source = tmp_path / "small.mp4"
    write_video(source, (np.full((16, 16, 3), c, np.uint8) for c in range(0, 80, 10)), fps=16, scale=1)
    bundled = PACKAGE_ROOT / "checkpoints" / "dit-tiny-taesd"
    result = CliRunner().invoke(run.main, [str(a) for a in (
        bundled, "--dit", "dit-tiny-taesd", "--input", source, "--frames", 2, "--prompt-embeds", bundled / PROMPT_FILE,
        "--output", tmp_path / "o.gif")])
    assert result.exit_code == 0, result.output
    assert f"warning: {source} is 16x16; its center square is enlarged to the model's 128x128" in result.output
