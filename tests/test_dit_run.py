"""`mirage-run --dit`: a Wan DiT run on the CPU (dit-tiny at 64x64), blocks streamed to the writer, the
report, and every bad input refused in one line with exit status 2 before the model is allocated."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import mirage.cli.run as run
import mirage.model.dit_pipeline as dit_pipeline
import mirage.model.wan_checkpoint as wan_checkpoint
from mirage.core.config import get_dit_config
from mirage.model.dit import WanDiT
from mirage.model.dit_cache import BlockStepper
from mirage.model.dit_pipeline import DiTPipeline, DiTRunError, DiTSpec, blocks_for
from mirage.model.taehv import TaehvDecoder
from mirage.model.text_encoder import read_prompt_embeds
from test_dit_conditioning import umt5_folder  # noqa: F401  (a tiny random UMT5 folder as wide as dit-tiny's text)

CFG = get_dit_config("dit-tiny")
ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--dit", "dit-tiny", "--resolution", "64x64"]  # 8x8 latents: a block in well under a second


@pytest.fixture
def embeds(tmp_path):
    path = tmp_path / "prompt.safetensors"
    save_file({"prompt_embeds": torch.randn(5, CFG.text_dim)}, path)
    return path


def mirage_run(*args):
    return CliRunner().invoke(run.main, [str(a) for a in args], catch_exceptions=False)


def test_random_weights_smoke_run_writes_whole_blocks_and_reports(tmp_path, embeds):
    out, report = tmp_path / "dit.gif", tmp_path / "report.json"
    result = mirage_run(*SMALL, "--random-weights", "--prompt-embeds", embeds, "--frames", 6, "--output", out,
                        "--json", report)
    assert result.exit_code == 0 and run.FP8_ON_CPU not in result.output, result.output
    # 6 frames round up to 2 blocks of 2 latent frames: 1 + 4·3 = 13 video frames (the first latent frame gives one)
    assert blocks_for(CFG, 6) == 2 and blocks_for(CFG, 5) == 1 and blocks_for(CFG, 14) == 3
    with Image.open(out) as gif:
        assert gif.n_frames == 13 and gif.size == (128, 128)  # 64x64 upscaled by the writer to >= 128 wide
    data = json.loads(report.read_text())
    assert data["written"] == data["frames"] == 13 and data["blocks"] == 2 and data["device"] == "cpu"
    assert data["peak_gpu_mb"] is None and data["cuda_graph"] is False and data["weights"] is None
    assert data["first_frame_ms"] > 0 and 0 < data["median_ms"] <= data["p99_ms"]
    assert 0 < data["block_median_ms"] <= data["block_p99_ms"]
    # a block's frames share its time: per-frame latency is the block's over its 8 frames
    assert data["median_ms"] == pytest.approx(data["block_median_ms"] / 8)
    assert (data["dit"]["width"], data["dit"]["height"]) == (64, 64)
    for row in ("time to first frame", "per-frame median / p99", "per-block median / p99", "GPU memory"):
        assert row in result.output


def test_blocks_reach_the_writer_as_they_finish(tmp_path, embeds, monkeypatch):
    events = []
    step = BlockStepper.step

    def recorded_step(self, noise):
        events.append("block")
        return step(self, noise)

    class FakeWriter:
        def __init__(self, path, fps):
            self.path, self.count = path, 0

        def write(self, frame):
            events.append("frame")
            self.count += 1

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(BlockStepper, "step", recorded_step)
    monkeypatch.setattr(run, "VideoWriter", FakeWriter)
    result = mirage_run(*SMALL, "--random-weights", "--prompt-embeds", embeds, "--blocks", 3,
                        "--output", tmp_path / "x.gif")
    assert result.exit_code == 0, result.output
    assert events == ["block"] + ["frame"] * 5 + (["block"] + ["frame"] * 8) * 2


def test_self_forcing_checkpoint_and_taehv_decoder(tmp_path, embeds):
    torch.manual_seed(0)
    model = WanDiT(CFG)
    ckpt = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    decoder = tmp_path / "taew2_1.pth"
    torch.save(TaehvDecoder().state_dict(), decoder)
    out, report = tmp_path / "frames", tmp_path / "r.json"
    result = mirage_run(ckpt, *SMALL, "--prompt-embeds", embeds, "--decoder", decoder, "--blocks", 1,
                        "--window", 4, "--sink", 2, "--output", out, "--json", report)
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) == 5  # one block: 1 + 4 video frames, as PNGs
    data = json.loads(report.read_text())
    assert data["weights"]["layout"] == "self-forcing/causvid/longlive" and data["weights"]["entry"] == "generator_ema"
    assert list(data["weights"]["files"]) == [ckpt.name]
    assert (data["dit"]["window_frames"], data["dit"]["sink_frames"]) == (4, 2)


def test_text_prompt_through_a_local_encoder(tmp_path, umt5_folder):  # noqa: F811
    result = mirage_run(*SMALL, "--random-weights", "--prompt", "a cat sits on the mat", "--text-encoder", umt5_folder,
                        "--blocks", 1, "--output", tmp_path / "cat.gif")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "cat.gif") as gif:
        assert gif.n_frames == 5


def test_lifecycle_and_a_prompt_switch_mid_video(embeds):
    """open -> reset -> blocks() -> set_prompt mid-video (LongLive's re-cache) -> close. Switching to the same
    prompt rebuilds the cache as it was, so the video goes on unchanged; another prompt changes what follows."""
    with DiTPipeline.open(DiTSpec("dit-tiny", resolution=(64, 64)), embeds, device="cpu") as pipe:
        pipe.reset(seed=3)
        straight = list(pipe.blocks(2))
        text = read_prompt_embeds(embeds, CFG.text_dim, CFG.text_len)
        pipe.reset(seed=3)
        blocks = pipe.blocks(2)
        first = next(blocks)
        pipe.set_prompt(text)
        same = [first, next(blocks)]
        pipe.reset(seed=3)
        blocks = pipe.blocks(2)
        next(blocks)
        pipe.set_prompt(torch.randn(1, CFG.text_len, CFG.text_dim))
        other = next(blocks)
    assert [b.shape for b in straight] == [(5, 64, 64, 3), (8, 64, 64, 3)]
    for a, b in zip(straight, same):
        assert torch.allclose(torch.from_numpy(a), torch.from_numpy(b), atol=1e-5)
    assert not torch.allclose(torch.from_numpy(straight[1]), torch.from_numpy(other), atol=1e-3)
    assert pipe.stepper is None


@pytest.fixture
def never_allocated(monkeypatch):
    """A bad input must be refused before the DiT is built on the device: building it fails this test."""
    def allocated(*args, **kwargs):
        raise AssertionError("the model was allocated before the bad input was refused")

    monkeypatch.setattr(dit_pipeline, "WanDiT", allocated)
    monkeypatch.setattr(wan_checkpoint, "copy_into", allocated)


@pytest.mark.parametrize("case, message", [
    ("other-layout", "not a Wan 2.1 transformer checkpoint"),
    ("no-decoder", "no --decoder"),
    ("missing-encoder", "text encoder folder not found"),
    ("prompt-without-encoder", "needs --text-encoder"),
    ("embeds-width", "the model needs (L, 64)"),
    ("resolution", "width=100 is not divisible by 16"),
    ("window", "window_frames=3 is smaller than the sink (2) plus a block (2)"),
    ("graph-on-cpu", "--fast is the GPU path"),
    ("no-prompt", "needs one of --prompt"),
    ("no-weights", "needs a checkpoint"),
    ("lora-without-base", "give the base checkpoint"),
    ("dit-option-without-dit", "--window: options of a DiT run; add --dit"),
    ("prompt-for-a-unet", f"--prompt-embeds: {run.DEFAULT_MODEL} takes no prompt"),  # a DiT artifact takes it
    ("dit-checkpoint-without-dit", "for a Wan 2.1 DiT checkpoint add --dit CONFIG"),
    ("unet-option-with-dit", "--steps: options of a U-Net model"),
    ("v2v-decoder-only", "dit-tiny's decoder only decodes: video-to-video needs one that also encodes"),
    ("strength-without-input", "--strength: video-to-video needs an --input"),
    ("cache-from-without-input", "--cache-from: video-to-video needs an --input"),
    ("cache-from-for-a-unet", f"--cache-from: a DiT's video-to-video option; {run.DEFAULT_MODEL} is not a DiT"),
])
def test_bad_input_is_one_line_and_status_2_with_nothing_written(tmp_path, embeds, never_allocated, case, message):
    unet = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(8, 4, 3, 3)}, unet)
    wide = tmp_path / "wide.safetensors"
    save_file({"prompt_embeds": torch.zeros(5, 32)}, wide)
    rand = ["--random-weights", "--prompt-embeds", embeds]
    taehv = tmp_path / "taew2_1.pth"
    torch.save(TaehvDecoder().state_dict(), taehv)
    args = {
        "other-layout": [unet, *SMALL, "--prompt-embeds", embeds, "--decoder", taehv],
        "no-decoder": [unet, *SMALL, "--prompt-embeds", embeds],
        "missing-encoder": [*SMALL, "--random-weights", "--prompt", "a cat", "--text-encoder", tmp_path / "umt5"],
        "prompt-without-encoder": [*SMALL, "--random-weights", "--prompt", "a cat"],
        "embeds-width": [*SMALL, "--random-weights", "--prompt-embeds", wide],
        "resolution": ["--dit", "dit-tiny", "--resolution", "100x64", *rand],
        "window": [*SMALL, *rand, "--sink", 2, "--window", 3],
        "graph-on-cpu": [*SMALL, *rand, "--fast", "--device", "cpu"],
        "no-prompt": [*SMALL, "--random-weights"],
        "no-weights": [*SMALL, "--prompt-embeds", embeds],
        "lora-without-base": [*SMALL, *rand, "--lora", unet],
        "dit-option-without-dit": ["--window", 6],
        "prompt-for-a-unet": ["--prompt-embeds", embeds],
        "dit-checkpoint-without-dit": [unet],
        "unet-option-with-dit": [*SMALL, *rand, "--steps", 2],
        "v2v-decoder-only": [*SMALL, *rand, "--decoder", taehv, "--input", "synthetic"],  # a file without encoder.*
        "strength-without-input": [*SMALL, *rand, "--strength", 0.5],
        "cache-from-without-input": [*SMALL, *rand, "--cache-from", "input"],
        "cache-from-for-a-unet": ["--input", "synthetic", "--cache-from", "input"],
    }[case]
    out = tmp_path / "out.gif"
    result = mirage_run(*args, "--output", out, "--json", tmp_path / "r.json")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_random_weights_video_to_video_runs_end_to_end(tmp_path, embeds):
    """--input with a random TAEHV (encoder and decoder): 12 frames round up to 2 blocks of 2 latent frames,
    5 + 8 input frames (the first block takes 4N - 3) restyled into as many, with the report's PSNR."""
    out, report = tmp_path / "v2v.gif", tmp_path / "report.json"
    result = mirage_run("--dit", "dit-tiny", "--resolution", "32x32", "--random-weights", "--prompt-embeds", embeds,
                        "--input", "synthetic", "--strength", 0.5, "--frames", 12, "--output", out, "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert (data["written"], data["blocks"], data["strength"]) == (13, 2, 0.5) and data["psnr_vs_input_db"] > 0
    with Image.open(out) as gif:
        assert gif.n_frames == 13


def test_non_square_video_to_video_from_a_clip_of_another_aspect(tmp_path, embeds):
    """dit-tiny at 192x128 (wan-1.3b's 832x480 in miniature) restyling a 160x90 clip: its frames scaled to cover
    192x128 and center-cropped (a 135x90 window, enlarged: the warning says so), written at 192x128."""
    from mirage.core.video_io import write_video

    source, out, report = tmp_path / "wide.mp4", tmp_path / "out", tmp_path / "report.json"
    write_video(source, (np.full((90, 160, 3), c, np.uint8) for c in range(0, 130, 10)), fps=16, scale=1)
    result = mirage_run("--dit", "dit-tiny", "--resolution", "192x128", "--random-weights", "--prompt-embeds", embeds,
                        "--input", source, "--strength", 0.5, "--frames", 5, "--output", out, "--json", report)
    assert result.exit_code == 0, result.output
    assert f"warning: {source} is 160x90; its center 135x90 is enlarged to the model's 192x128" in result.output
    data = json.loads(report.read_text())
    assert (data["written"], data["blocks"]) == (5, 1) and data["psnr_vs_input_db"] > 0
    with Image.open(out / "00004.png") as frame:
        assert frame.size == (192, 128)


def test_a_dit_trained_here_runs_at_another_resolution(tmp_path):
    """The bundled dit-tiny-taesd (its config.json: 128x128) at --resolution 96x64: the video size is the run's
    choice, not the weights' (it was refused as a config mismatch); its other fields must still agree. Without
    --prompt it runs on its training prompt (it was refused: newcomer finding)."""
    dit = ROOT / "checkpoints" / "dit-tiny-taesd"
    out = tmp_path / "o"
    result = mirage_run(dit, "--dit", "dit-tiny-taesd", "--resolution", "96x64", "--frames", 2, "--output", out)
    assert result.exit_code == 0, result.output
    # without --prompt: the prompt it was trained with, saved beside it, and a note that says so
    assert f"note: no --prompt: {dit / 'prompt.safetensors'}, the prompt it was trained with" in result.output
    with Image.open(out / "00001.png") as frame:
        assert frame.size == (96, 64)
    with pytest.raises(wan_checkpoint.CheckpointError, match="name: checkpoint has 'dit-tiny-taesd'"):
        wan_checkpoint.check_saved_config(dit, get_dit_config("dit-tiny"))


def test_graph_on_the_cpu_is_refused_by_the_pipeline(embeds):
    with pytest.raises(DiTRunError, match="CUDA graphs need a GPU"):
        DiTPipeline.open(DiTSpec("dit-tiny"), embeds, device="cpu", graph=True)


def test_fp8_matmuls_are_an_option_recorded_in_the_report(tmp_path, embeds):
    """--fp8 swaps the blocks' linears (static scales calibrated on the run's prompt) and the report says so;
    the video stays close to the model's own. On the CPU it ran without a word, as if FP8 were as fast here as on
    a Hopper GPU: a note on stderr says what it is."""
    report = tmp_path / "report.json"
    result = mirage_run(*SMALL, "--random-weights", "--prompt-embeds", embeds, "--blocks", 1, "--fp8", "static",
                        "--output", tmp_path / "dit.gif", "--json", report, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert run.FP8_ON_CPU in result.stderr and "slower than float32" in run.FP8_ON_CPU
    recipe = json.loads(report.read_text())["fp8"]
    assert recipe["layers"] == CFG.num_layers * 10 and recipe["activations"].endswith("static (calibrated amax)")
    videos = {}
    for fp8 in (None, "dynamic"):
        torch.manual_seed(0)  # the same random weights for both
        with DiTPipeline.open(DiTSpec("dit-tiny", resolution=(64, 64)), embeds, device="cpu", fp8=fp8) as pipe:
            assert (pipe.fp8 is None) == (fp8 is None)
            pipe.reset(seed=3)
            videos[fp8] = torch.from_numpy(next(pipe.blocks(1)))
    diff = (videos["dynamic"] - videos[None]).abs()
    assert 0 < diff.mean() < 0.02
