"""Fault suite for a run's inputs, tried as a new user would: a seed out of range, an output that is
the input, an input too small to enlarge, a model too large for memory, a device that does not
exist, options a build would not use. Each case: exit status 2 with one `Error:` line, before any
work (no model loaded), and nothing overwritten."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CKPT_GEN, CKPT_V2V, ROOT
from mirage.cli.export import main as export_main
from mirage.cli.quality import main as quality_main
from mirage.cli.run import main as run_main
from mirage.cli.serve import main as serve_main
from mirage.core import device as D
from mirage.core import graphs as G
from mirage.core.config import PipelineOptions, get_config
from mirage.core.loop import MAX_SEED, buffer_bytes
from mirage.core.video_io import VideoWriter, write_video
from mirage.bridge.pipeline import load_pipeline
from mirage.runtime import Pipeline


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded: the refusal must come before any work."""
    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("a model was loaded"))


def _refused(command, args: list[str], message: str) -> None:
    r = CliRunner().invoke(command, args)
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 2 and len(errors) == 1 and message in errors[0], r.output
    assert "Traceback" not in r.output


def _clip(path: Path, side: int, frames: int = 3) -> Path:
    write_video(path, [np.full((side, side, 3), v, np.float32) for v in np.linspace(-0.5, 0.5, frames)], scale=1)
    return path


def test_a_seed_beyond_the_generator_is_refused(tmp_path, no_model):
    """Seeds were kept modulo 2^64: 2^64 + 5 gave seed 5's video without a word."""
    out = tmp_path / "o.gif"
    out.write_bytes(b"previous")
    for seed in (str(2 ** 64 + 5), "99999999999999999999999", "-1"):
        _refused(run_main, ["--seed", seed, "--output", str(out)], "Invalid value for '--seed'")
        _refused(quality_main, [str(CKPT_GEN), "--seed", seed], "Invalid value for '--seed'")
    assert out.read_bytes() == b"previous"
    r = CliRunner().invoke(run_main, ["--seed", str(MAX_SEED + 1)])
    assert r.exit_code == 2 and str(MAX_SEED) in r.output


def test_the_largest_seed_runs(tmp_path):
    r = CliRunner().invoke(run_main, [str(CKPT_GEN), "--seed", str(MAX_SEED), "--frames", "1",
                                      "--output", str(tmp_path / "o.gif")])
    assert r.exit_code == 0, r.output


def test_an_output_that_is_the_input_is_refused(tmp_path, no_model, monkeypatch):
    """The input video was overwritten by a shorter output: every spelling of the same file is refused."""
    clip = _clip(tmp_path / "clip.mp4", 32)
    before = clip.read_bytes()
    (tmp_path / "link.mp4").symlink_to(clip)
    os.link(clip, tmp_path / "hard.mp4")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    spellings = ["clip.mp4", str(clip), "./sub/../clip.mp4", "link.mp4", "hard.mp4"]
    for output in spellings:
        _refused(run_main, [str(CKPT_V2V), "--input", "clip.mp4", "--output", output], "is the input")
        _refused(run_main, [str(CKPT_V2V), "--input", output, "--output", "clip.mp4"], "is the input")
    _refused(run_main, [str(CKPT_V2V), "--input", "clip.mp4", "--json", "link.mp4"], "is the input")
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "00000.png").write_bytes(b"")
    _refused(run_main, [str(CKPT_V2V), "--input", "frames", "--output", "sub/../frames"], "is the input")
    assert clip.read_bytes() == before and not list(tmp_path.glob(".*partial*"))


def test_a_report_that_is_the_output_is_refused(tmp_path, no_model, monkeypatch):
    """--json equal to --output replaced the video with the report: refused in every spelling, as an input is."""
    old = _clip(tmp_path / "out.gif", 32)
    before = old.read_bytes()
    (tmp_path / "link.gif").symlink_to(old)
    monkeypatch.chdir(tmp_path)
    for report in ("out.gif", str(old), "./out.gif", "link.gif"):
        _refused(run_main, [str(CKPT_GEN), "--output", "out.gif", "--json", report], "is the --output")
    _refused(run_main, [str(CKPT_GEN), "--output", "new.gif", "--json", "new.gif"], "is the --output")  # neither made
    assert old.read_bytes() == before and not (tmp_path / "new.gif").exists()


def test_an_existing_video_is_replaced_whole_or_not_at_all(tmp_path):
    """Frames go to a hidden sibling that replaces the file on close: a process killed mid-run (here:
    a writer never closed) leaves the old file as it was, and so does a run that made no frame."""
    old = _clip(tmp_path / "out.mp4", 32, frames=5)
    before = old.read_bytes()
    killed = VideoWriter(old, scale=1)
    for v in (-0.9, 0.9):
        killed.write(np.full((32, 32, 3), v, np.float32))
    assert old.read_bytes() == before  # what a kill at this point leaves
    killed.close()
    assert old.read_bytes() != before and not list(tmp_path.glob(".*partial*"))
    after = old.read_bytes()
    with VideoWriter(old, scale=1):
        pass  # a run that failed before its first frame
    assert old.read_bytes() == after


def test_a_run_that_fails_before_its_first_frame_keeps_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "o.gif"
    CliRunner().invoke(run_main, [str(CKPT_GEN), "--frames", "2", "--output", str(out)])
    before = out.read_bytes()

    def broken(self, cond=None):
        from mirage.core.errors import BackendError

        raise BackendError("the backend failed")

    monkeypatch.setattr(Pipeline, "submit", broken)
    _refused(run_main, [str(CKPT_GEN), "--frames", "2", "--output", str(out)], "the backend failed")
    assert out.read_bytes() == before and not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("kind", ["video", "images"])
def test_an_input_too_small_to_enlarge_is_refused(tmp_path, no_model, kind):
    """A 2x2 input was enlarged to the model's size without a word."""
    if kind == "video":
        source = _clip(tmp_path / "tiny.mp4", 2)
    else:
        from PIL import Image

        source = tmp_path / "seq"
        source.mkdir()
        Image.new("RGB", (2, 2)).save(source / "0.png")
    out = tmp_path / "o.gif"
    out.write_bytes(b"previous")
    _refused(run_main, [str(CKPT_V2V), "--input", str(source), "--output", str(out)], "frames are 2x2")
    assert out.read_bytes() == b"previous"


def test_a_small_input_is_enlarged_with_a_warning(tmp_path):
    source = _clip(tmp_path / "small.mp4", 16)
    r = CliRunner().invoke(run_main, [str(CKPT_V2V), "--input", str(source), "--frames", "1",
                                      "--output", str(tmp_path / "o.gif")])
    assert r.exit_code == 0 and "warning: " in r.output and "enlarged to the model's 32x32" in r.output, r.output


def test_the_memory_estimate_is_what_the_runtime_allocates():
    with load_pipeline(CKPT_V2V, device="cpu", options=PipelineOptions(batch=3, steps=2)) as pipe:
        pipe.allocate()
        made = sum(np.asarray(b).nbytes for b in vars(pipe.buf).values()
                   if b is not None and not isinstance(b, (list, dict)))
        made += sum(np.asarray(b).nbytes for b in pipe.buf.t)
        assert buffer_bytes(pipe.specs, pipe.schedule) == pipe.unit.buffer_bytes() == made
    specs = G.model_graphs(get_config("tiny", "v2v"), batch=6)
    assert buffer_bytes(specs, pipe.schedule) == 2 * made  # linear in the batch


def test_a_model_too_large_for_memory_is_refused_before_it_allocates(tmp_path, monkeypatch):
    """config.json edited to image_size 4096 (28 GiB of buffers, most of it context memory): the process grew until the
    kernel killed it. Now one line names the need and what is free, and nothing is allocated."""
    ckpt = tmp_path / "huge"
    shutil.copytree(CKPT_GEN, ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["image_size"] = 4096
    (ckpt / "config.json").write_text(json.dumps(meta))
    monkeypatch.setattr(D, "host_available_bytes", lambda: 16 * 2 ** 30)  # the same on every machine
    monkeypatch.setattr(Pipeline, "allocate", lambda self: pytest.fail("buffers were allocated"))
    out = tmp_path / "o.gif"
    out.write_bytes(b"previous")
    _refused(run_main, [str(ckpt), "--frames", "1", "--output", str(out)],
             "tiny (4096x4096 frames) at batch 1 needs about 28.4 GiB on cpu, but 16.0 GiB are free")
    assert out.read_bytes() == b"previous"


def test_a_device_that_does_not_exist_is_refused(tmp_path, no_model):
    """--device foo ended in torch's RuntimeError traceback after the model had loaded."""
    for name in ("foo", "cuda:x", "gpu", "cuda:0,cuda:1"):
        _refused(run_main, ["--device", name, "--output", str(tmp_path / "o.gif")], "give auto, cpu, cuda or cuda:N")
        _refused(quality_main, [str(CKPT_GEN), "--device", name], "give auto, cpu, cuda or cuda:N")
    _refused(serve_main, ["--device", "cuda:0,foo"], "--device foo: give auto, cpu, cuda or cuda:N")


@pytest.mark.parametrize("args, message", [
    (["--gpu", "sm89"], "--gpu chooses TensorRT-RTX targets"),
    (["--backend", "tensorrt", "--gpu", "sm89"], "--gpu chooses TensorRT-RTX targets"),
    (["--opt-level", "5"], "--opt-level tunes the engine build"),
    (["--workspace-mb", "64"], "--workspace-mb limits the engine build"),
    (["--plugin-library", __file__], "--plugin-library is loaded to build engines"),
    (["--precision", "fp32", "--calib-frames", "2"], "--calib-frames calibrates int8/fp8"),
])
def test_an_export_option_the_build_would_not_use_is_refused(tmp_path, args, message):
    out = tmp_path / "art"
    _refused(export_main, ["--checkpoint", str(CKPT_GEN), "--out", str(out), *args], message)
    assert not out.exists()


def test_fast_on_the_cpu_is_refused(no_model, monkeypatch):
    """--fast is float16 Inductor kernels in a CUDA graph; on the CPU it would be something else."""
    _refused(run_main, ["--fast", "--device", "cpu"], "--fast is the GPU path")
    _refused(serve_main, ["--fast", "--device", "cpu"], "--fast is the GPU path")
    monkeypatch.setattr("mirage.cli.options.cuda_available", lambda: False)
    _refused(run_main, ["--fast"], "no CUDA GPU is visible")


def test_quality_outputs_are_checked_before_the_rollout(tmp_path, no_model, monkeypatch):
    """--plot without matplotlib, or into a missing folder, failed after the whole rollout."""
    import sys

    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(quality_main, [str(CKPT_GEN), "--plot", str(tmp_path / "missing" / "p.png")], "does not exist")
    _refused(quality_main, [str(CKPT_GEN), "--examples", str(blocker / "ex")], "cannot make this folder")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    _refused(quality_main, [str(CKPT_GEN), "--plot", str(tmp_path / "p.png")], "--plot needs matplotlib")


def test_a_report_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write torn by a full disk (or a kill) leaves the previous --json report as it was."""
    from mirage.core.report import write_json

    path = tmp_path / "r.json"
    write_json(path, {"run": 1})

    def torn(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError):
        write_json(path, {"run": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"run": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_taken_port_is_one_line_before_the_model_loads(no_model):
    """It was a traceback (OSError from the bind) after the model had loaded and calibrated."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        _refused(serve_main, ["--port", str(port), "--device", "cpu"], f"cannot listen on 127.0.0.1:{port}")


def test_ctrl_c_before_the_first_frame_is_one_line_and_status_130(tmp_path, monkeypatch):
    """It was click's 'Aborted!' and exit status 1 (or a traceback), unlike an interrupt mid-run."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("mirage.bridge.pipeline.load_pipeline", interrupted)
    out = tmp_path / "o.gif"
    r = CliRunner().invoke(run_main, [str(CKPT_GEN), "--output", str(out)])
    assert r.exit_code == 130 and "before the first frame; nothing was written" in r.output, r.output
    assert not out.exists()


def test_an_input_shorter_than_frames_is_said(tmp_path):
    """A 3-frame clip asked for 5 frames: the 3 are made, and a note says the input ended (it said nothing)."""
    source = _clip(tmp_path / "short.mp4", 32)
    r = CliRunner().invoke(run_main, [str(CKPT_V2V), "--input", str(source), "--frames", "5",
                                      "--output", str(tmp_path / "o.gif")])
    assert r.exit_code == 0 and "note: the input ended after 3 of 5 frames" in r.output, r.output


def _broken_midway(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """An 8-frame input broken at its 5th frame, and the name its error gives: a folder of PNGs with one
    unreadable file, or an mp4 cut in half (its header first, as a download or a streamed recording has it:
    ffmpeg decodes the frames before the cut and ends without an error)."""
    if kind == "images":
        write_video(tmp_path / "in", [np.full((32, 32, 3), v, np.float32) for v in np.linspace(-0.5, 0.5, 8)])
        (tmp_path / "in" / "00004.png").write_bytes(b"not a png")
        return tmp_path / "in", "00004.png: unreadable image"
    import subprocess

    import imageio_ffmpeg

    rng = np.random.default_rng(0)
    write_video(tmp_path / "whole.mp4", [rng.uniform(-1, 1, (32, 32, 3)).astype(np.float32) for _ in range(8)],
                scale=1)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(tmp_path / "whole.mp4"), "-c", "copy",
                    "-movflags", "+faststart", str(tmp_path / "start.mp4")], check=True)
    data = (tmp_path / "start.mp4").read_bytes()
    (tmp_path / "in.mp4").write_bytes(data[:len(data) // 2])
    return tmp_path / "in.mp4", "cannot be decoded: the video stops after"


@pytest.mark.parametrize("kind", ["images", "video"])
def test_an_input_broken_midway_is_one_line_and_keeps_the_frames_made_as_partial(tmp_path, kind):
    """A bad frame in the middle of the input replaced the output with the frames before it, without a word
    (a cut mp4: exit 0): now the error names the bad frame, the output already there stays as it was, and the
    frames made are kept under a name that says they are partial."""
    source, named = _broken_midway(tmp_path, kind)
    out = _clip(tmp_path / "out.gif", 32)
    before = out.read_bytes()
    r = CliRunner().invoke(run_main, [str(CKPT_V2V), "--input", str(source), "--frames", "8", "--output", str(out)])
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 2 and len(errors) == 1 and named in errors[0], r.output
    assert f"are in {tmp_path / 'out.partial.gif'}, {out} was not written" in errors[0], errors[0]
    assert out.read_bytes() == before and not list(tmp_path.glob(".*partial*"))
    from PIL import Image

    with Image.open(tmp_path / "out.partial.gif") as gif:
        assert 0 < gif.n_frames < 8


def test_a_frames_folder_replaces_an_earlier_run_whole_and_refuses_other_files(tmp_path, no_model):
    """A 6-frame run into the folder of an earlier 8-frame run left the earlier run's frames 6 and 7 beside the
    new ones: the folder is now replaced whole; a folder holding anything else is refused before any work (also
    as mirage-quality's --examples, which the same writer fills after the rollout)."""
    frames = tmp_path / "frames"
    assert write_video(frames, [np.full((32, 32, 3), -0.5, np.float32)] * 8, scale=1) == 8
    assert write_video(frames, [np.full((32, 32, 3), 0.5, np.float32)] * 6, scale=1) == 6
    assert sorted(p.name for p in frames.glob("*.png")) == [f"{k:05d}.png" for k in range(6)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or old folder left
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    _refused(run_main, [str(CKPT_GEN), "--output", str(mine)], "a folder holding files mirage did not write")
    _refused(quality_main, [str(CKPT_GEN), "--examples", str(mine)], "a folder holding files mirage did not write")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (frames / "keep.txt").write_text("mine")  # a user's file put among an earlier run's frames: not replaced
    _refused(run_main, [str(CKPT_GEN), "--output", str(frames)], "a folder holding files mirage did not write")
    assert (frames / "keep.txt").read_text() == "mine" and len(list(frames.glob("*.png"))) == 6


DIT = ROOT / "checkpoints" / "dit-tiny-taesd"  # a DiT trained here: its config.json names dit-tiny-taesd


def test_a_dit_checkpoint_without_dit_is_named_by_run_and_export(tmp_path, monkeypatch):
    """As mirage-serve says it (train.checkpoint.check_not_dit), before any weights are read."""
    import mirage.bridge.artifact as artifact

    monkeypatch.setattr(artifact, "load_checkpoint", lambda *a: pytest.fail("a checkpoint was loaded"))
    message = f"{DIT} is a DiT checkpoint: add --dit dit-tiny-taesd"
    _refused(run_main, [str(DIT), "--output", str(tmp_path / "o.gif")], message)
    _refused(export_main, ["--checkpoint", str(DIT), "--out", str(tmp_path / "art")], message)


def test_strength_for_a_unet_is_one_error_that_says_all_to_change(tmp_path, monkeypatch, no_model):
    """--strength (a DiT's video-to-video) given to a U-Net, with or without --input: one line that says what
    --strength is for and everything to leave out, before any other check (a newcomer was told that --strength
    needs an --input, then that the U-Net takes no strength, then that a generating U-Net takes no --input).
    A U-Net artifact is refused alike; a DiT checkpoint without --dit is told its --dit."""
    import mirage.cli.run as run
    from mirage.core.config import to_json

    out = ["--frames", "4", "--output", str(tmp_path / "o.gif")]
    for model, restores in ((CKPT_V2V, True), (CKPT_GEN, False)):
        what = "restores its --input as trained" if restores else "generates from no input"
        for given_input in ([], ["--input", "synthetic"]):
            leave = "--strength" if restores or not given_input else "--strength and --input"
            _refused(run_main, [str(model), *given_input, "--strength", "0.5", *out],
                     f"--strength is a DiT's video-to-video strength (how much of its --input a --dit checkpoint "
                     f"or a DiT artifact redraws); {model} is a U-Net that {what}: leave out {leave}")
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / G.MANIFEST).write_text("{}")
    monkeypatch.setattr(run, "read_manifest", lambda folder: {"model": to_json(get_config("tiny", "v2v"))})
    _refused(run_main, [str(artifact), "--strength", "0.5", *out], f"{artifact} is a U-Net that restores its --input")
    _refused(run_main, [str(DIT), "--strength", "0.5", *out], f"{DIT} is a DiT checkpoint: add --dit dit-tiny-taesd")


def test_a_dit_checkpoint_of_another_config_is_said_field_by_field_first(tmp_path):
    """--dit dit-tiny for a dit-tiny-taesd checkpoint: the saved config's mismatch, as mirage-export says it, not
    that dit-tiny (a Wan VAE layout) needs a --decoder."""
    _refused(run_main, [str(DIT), "--dit", "dit-tiny", "--prompt-embeds", str(DIT / "prompt.safetensors"),
                        "--output", str(tmp_path / "o.gif")],
             "DiT config mismatch; name: checkpoint has 'dit-tiny-taesd', asked for 'dit-tiny'")
