"""Fault suite for artifacts and runs: every file of an artifact corrupted, truncated or removed,
every manifest field edited, exports failed and interrupted by injection, runs interrupted and
pointed at outputs they cannot write. Each case asserts its exact outcome: one clear error (exit 2
from the CLI), the previous artifact intact, or a valid partial output."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import CKPT_GEN, CKPT_V2V
from mirage.cli.run import main as run_main
from mirage.core import graphs as G
from mirage.core.config import PipelineOptions
from mirage.bridge.artifact import ArtifactOptions, build_artifact
from mirage.core.errors import MirageError
from mirage.engine.manifest import sha256_file
from mirage.bridge.pipeline import from_model, load_pipeline
from mirage.runtime import Pipeline
from mirage.runtime.execution import NonFiniteError

FAST = dict(calibration_frames=2, parity_frames=3)
FILES = ("manifest.json", "denoise.onnx", "context_encode.onnx")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a") / "tiny"
    build_artifact(CKPT_GEN, out, ArtifactOptions(precision="fp32", **FAST))
    return out


def _copy(artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(artifact, dst)
    return dst


def _refused(folder: Path, match: str) -> None:
    with pytest.raises(MirageError, match=match):
        load_pipeline(folder, device="cpu")
    r = CliRunner().invoke(run_main, [str(folder), "--frames", "1", "--output", str(folder.parent / "o.gif")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert not (folder.parent / "o.gif").exists()


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("fault", ["flip", "truncate", "remove"])
def test_broken_file_is_refused(artifact, tmp_path, name, fault):
    art = _copy(artifact, tmp_path)
    path = art / name
    if fault == "flip":
        data = bytearray(path.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        path.write_bytes(bytes(data))
    elif fault == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    if name == "manifest.json":
        _refused(art, "corrupt JSON|manifest|without a manifest.json")
    else:
        _refused(art, "corrupt or modified|missing")


EDITS = {  # manifest field -> (edit, what the refusal says)
    "format": (lambda m: m.update(format=9), "format 9"),
    "mirage_version": (lambda m: m.update(mirage_version="9.9.9"), "newer than this one"),
    "precision": (lambda m: m.update(precision="fp4"), "precision 'fp4'"),
    "onnx_sha256": (lambda m: m["graphs"]["denoise"].update(onnx_sha256="0" * 64), "corrupt or modified"),
    "backend": (lambda m: m.update(backend={"name": "tensorrt", "version": None}), "records no version"),
    "targets": (lambda m: m.update(backend={"name": "tensorrt", "version": "10.0"},
                                   target={"compute_capabilities": []}), "no target compute capabilities"),
    "engine": (lambda m: m.update(backend={"name": "tensorrt", "version": "10.0"},
                                  target={"compute_capabilities": ["sm90"]}), "records no engine"),
    "batch": (lambda m: m.update(batch=0), "not batch sizes"),
    "model": (lambda m: m["model"].update(image_size=64), "differ from what the model config implies"),
    "bad_config": (lambda m: m["model"].update(channel_mults=[1, 2, 2, 2, 2, 2, 2]), "bad model config"),
    "dtype": (lambda m: m["graphs"]["denoise"]["inputs"][0].update(dtype="float16"), "differ from what"),
    "missing_graph": (lambda m: m["graphs"].pop("context_encode"), "missing graphs.context_encode"),
    "missing_key": (lambda m: m.pop("options"), "missing options"),
}


@pytest.mark.parametrize("field", list(EDITS))
def test_edited_manifest_is_refused(artifact, tmp_path, field):
    art = _copy(artifact, tmp_path)
    m = json.loads((art / G.MANIFEST).read_text())
    edit, match = EDITS[field]
    edit(m)
    (art / G.MANIFEST).write_text(json.dumps(m))
    _refused(art, match)


def test_other_precisions_onnx_files_are_refused(artifact, tmp_path):
    """An fp16 graph copied into the fp32 artifact: its hash no longer matches."""
    art = _copy(artifact, tmp_path)
    fp16 = tmp_path / "fp16"
    build_artifact(CKPT_GEN, fp16, ArtifactOptions(precision="fp16", **FAST))
    shutil.copy(fp16 / "denoise.onnx", art / "denoise.onnx")
    _refused(art, "corrupt or modified")


def test_verified_hashes_are_remembered(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    with load_pipeline(art, device="cpu"):
        pass
    sidecar = json.loads((art / ".verified.json").read_text())
    assert set(sidecar) == {"denoise.onnx", "context_encode.onnx"}


def _fingerprint(folder: Path) -> dict:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".verified.json"}


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_failed_or_interrupted_export_keeps_the_previous_artifact(artifact, tmp_path, monkeypatch, fault):
    art = _copy(artifact, tmp_path)
    before = _fingerprint(art)
    import mirage.bridge.artifact as A

    real, calls = A.export_graph, []

    def export_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the first graph was written into the staging folder
            raise fault("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "export_graph", export_then_fail)
    with pytest.raises(fault, match="injected"):
        build_artifact(CKPT_GEN, art, ArtifactOptions(precision="fp16", **FAST))
    assert _fingerprint(art) == before
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no staging folder left behind


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_an_artifact_folder_s_mode_follows_the_umask(tmp_path, umask):
    """The staging folder is mkdtemp's (0700) renamed into place: the artifact was unreadable to the group and
    others whatever the umask; now it is what mkdir makes (0755 under 022)."""
    from mirage.bridge.artifact import staged

    previous = os.umask(umask)
    try:
        staged(tmp_path / "art", lambda stage: {})
    finally:
        os.umask(previous)
    assert (tmp_path / "art").stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_dit_checkpoint_s_files_follow_the_umask(tmp_path, umask):
    """safetensors writes through a temporary file: a trained DiT's model.safetensors and prompt.safetensors were
    0600 (newcomer finding) while its config.json was 0644; now all are what open() makes."""
    import torch

    from mirage.core.config import get_dit_config
    from mirage.model.dit import WanDiT
    from mirage.train.dit import save_dit

    cfg = get_dit_config("dit-tiny")
    previous = os.umask(umask)
    try:
        out = save_dit(tmp_path / "d", WanDiT(cfg), torch.zeros(1, cfg.text_len, cfg.text_dim), {"step": 0})
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.suffix in (".safetensors", ".json")} == \
        {n: 0o666 & ~umask for n in ("model.safetensors", "prompt.safetensors", "config.json")}


def test_parity_failure_writes_nothing_unless_overridden(artifact, tmp_path, monkeypatch):
    import mirage.bridge.artifact as A

    art = _copy(artifact, tmp_path)
    before = _fingerprint(art)
    broken = {"v": {"rel": float("inf"), "max_abs": float("inf"), "calls": 1},
              "kv": {"rel": 0.0, "max_abs": 0.0, "calls": 1}}
    monkeypatch.setattr(A, "tensor_parity", lambda *a: broken)
    with pytest.raises(A.ExportError, match="parity failed"):
        build_artifact(CKPT_GEN, art, ArtifactOptions(precision="fp32", **FAST))
    assert _fingerprint(art) == before
    m = build_artifact(CKPT_GEN, art, ArtifactOptions(precision="fp32", allow_parity_failure=True, **FAST))
    assert m["parity"]["passed"] is False and m["parity"]["override"] is True
    assert "--allow-parity-failure" in m["rebuild_command"]


def test_a_folder_that_is_not_an_artifact_is_never_replaced(tmp_path, monkeypatch):
    """Refused before any work (no checkpoint is even loaded), for a foreign folder and for a file."""
    import mirage.bridge.artifact as A

    monkeypatch.setattr(A, "load_checkpoint", lambda *a: pytest.fail("work began"))
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("not an artifact")
    a_file = tmp_path / "file"
    a_file.write_text("a file")
    for out in (keep, a_file):
        with pytest.raises(A.ExportError, match="not a Mirage artifact"):
            build_artifact(CKPT_GEN, out, ArtifactOptions(precision="fp32", **FAST))
    assert (keep / "notes.txt").read_text() == "not an artifact" and a_file.read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]


def test_non_finite_weights_stop_the_run_naming_the_graph(make_random_tiny):
    model = make_random_tiny()
    with torch.no_grad():
        model.out[-1].weight.fill_(float("nan"))
    with from_model(model, "cpu") as pipe:
        pipe.reset(0)
        with pytest.raises(NonFiniteError, match="denoise graph produced non-finite"):
            pipe.step()


def test_interrupted_run_keeps_the_frames_made(tmp_path, monkeypatch):
    """SIGINT (delivered to this process after the third frame): the output holds three frames."""
    real = Pipeline.collect
    count = []

    def collect_then_interrupt(self):
        frame = real(self)
        count.append(1)
        if len(count) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return frame

    monkeypatch.setattr(Pipeline, "collect", collect_then_interrupt)
    out = tmp_path / "frames"
    r = CliRunner().invoke(run_main, [str(CKPT_V2V), "--frames", "50", "--output", str(out)])
    assert r.exit_code == 128 + signal.SIGINT, r.output
    assert len(list(out.glob("*.png"))) == 3 and "interrupted (SIGINT) after 3 of 50 frames" in r.output


def test_outputs_are_checked_before_any_frame(tmp_path, monkeypatch):
    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    runner = CliRunner()
    r = runner.invoke(run_main, ["--output", str(tmp_path / "out.avi")])
    assert r.exit_code == 2 and "cannot write .avi videos" in r.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = runner.invoke(run_main, ["--output", str(blocker / "out.gif")])
    assert r.exit_code == 2 and "cannot write here" in r.output
    r = runner.invoke(run_main, ["--json", str(tmp_path / "missing" / "r.json")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_gif_output_is_valid_after_an_interrupted_run(tmp_path):
    from mirage.core.video_io import VideoWriter

    with VideoWriter(tmp_path / "v.gif") as w:
        for value in (-0.5, 0.5):
            w.write(np.full((32, 32, 3), value, np.float32))
    from PIL import Image

    assert Image.open(tmp_path / "v.gif").n_frames == 2


def test_same_seed_same_video_across_backends(artifact):
    """Noise is drawn by the runtime: the fp32 artifact on ONNX Runtime and its checkpoint on
    PyTorch give the same frames for one seed."""
    outs = []
    for path in (artifact, CKPT_GEN):
        with load_pipeline(path, device="cpu", options=PipelineOptions(steps=2)) as pipe:
            pipe.reset(11)
            outs.append(np.stack([pipe.step() for _ in range(3)]))
    assert np.abs(outs[0] - outs[1]).max() < 1e-4


def test_mirage_run_runs_an_artifact_without_torch(artifact, tmp_path):
    """With torch unimportable, mirage-run makes the artifact's video byte for byte as with torch, and
    refuses a checkpoint with one line and exit status 2."""
    def run_blocked(model, out):
        code = ("import sys; sys.modules['torch'] = None\nfrom mirage.cli.run import main\n"
                f"main([{str(model)!r}, '--frames', '2', '--steps', '2', '--output', {str(out)!r}])")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    blocked = run_blocked(artifact, tmp_path / "blocked.gif")
    assert blocked.returncode == 0, blocked.stderr
    r = CliRunner().invoke(run_main, [str(artifact), "--frames", "2", "--steps", "2",
                                      "--output", str(tmp_path / "torch.gif")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "blocked.gif").read_bytes() == (tmp_path / "torch.gif").read_bytes()
    refused = run_blocked(CKPT_GEN, tmp_path / "ckpt.gif")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == \
        "Error: running a checkpoint needs PyTorch; or export it to an artifact"
    assert not (tmp_path / "ckpt.gif").exists()


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path):
    """A config edited to ~3 TB of weights: one line naming the size, not the OS killing the process."""
    ckpt = tmp_path / "huge"
    shutil.copytree(CKPT_GEN, ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"].update(base_channels=16384, channel_mults=[1, 2, 4])
    (ckpt / "config.json").write_text(json.dumps(meta))
    r = CliRunner().invoke(run_main, [str(ckpt), "--frames", "1", "--output", str(tmp_path / "o.gif")])
    assert r.exit_code == 2 and "GiB of fp32 weights" in r.output, r.output


@pytest.mark.parametrize("args, message", [
    (["--fast", "--device", "cuda"], "--fast / --compile (dtype, compile, channels_last, freeze, precompute_time) tune "
                                     "the torch backend"),
    (["--compile"], "--fast / --compile (compile) tune the torch backend"),
    (["--device", "cuda"], "--device cuda: the onnxruntime backend runs on the CPU"),
    (["--backend", "onnxruntime", "--device", "cuda:1"], "--device cuda:1: the onnxruntime backend runs on the CPU"),
])
def test_options_an_onnx_artifact_would_ignore_are_refused(artifact, tmp_path, args, message):
    """They were silently ignored: --fast ran the artifact as it was, --device cuda ran it on the CPU."""
    out = tmp_path / "o.gif"
    r = CliRunner().invoke(run_main, [str(artifact), *args, "--frames", "1", "--output", str(out)])
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 2 and len(errors) == 1 and message in errors[0], r.output
    assert not out.exists()


def test_the_pipeline_refuses_torch_options_for_an_artifact(artifact):
    for options in (PipelineOptions.fastest(), PipelineOptions(dtype="float16"), PipelineOptions(channels_last=True)):
        with pytest.raises(MirageError, match="tune the torch backend"):
            Pipeline.load(artifact, device="cpu", options=options)


def test_an_artifact_opened_at_another_batch_names_the_export_and_the_serve_that_run_it(artifact):
    """A static batch-1 U-Net artifact opened for 3 streams: the hint is its export with a dynamic batch up to 3
    (its --batch 1 kept, so mirage-run still runs it), or mirage-serve at its own batch, which mirage-serve takes
    when --slots is not given. The reverse, a batch-4 artifact for mirage-run's one row, asks for a max batch of
    4 (not the --batch 4 it already has: the newcomer's finding) or --slots 4."""
    import shlex

    from mirage.runtime.pool import default_slots
    from mirage.engine.manifest import read_manifest, rebuild_command, with_option
    from mirage.runtime.artifact import batch_remedy

    with pytest.raises(MirageError) as refused:
        Pipeline.load(artifact, device="cpu", options=PipelineOptions(batch=3))
    message = str(refused.value)
    assert "runs a batch of 1, not 3; export it for a batch of 3: mirage-export " in message
    command = shlex.split(message.split("batch of 3: ")[1].split(" (or")[0])
    assert command[command.index("--max-batch") + 1] == "3" and "--batch" not in command  # its batch 1 the optimum
    assert message.endswith(f"(or serve it at its own: mirage-serve {artifact} --slots 1)")
    assert default_slots(artifact) == 1 and default_slots(CKPT_GEN) == 4
    manifest = read_manifest(artifact)
    four, rebuilt_at_4 = {**manifest, "batch": 4}, with_option(rebuild_command(manifest, artifact), "--batch", "4")

    def hint(family: str) -> list[str]:
        remedy = batch_remedy(artifact, {**four, "family": family}, rebuilt_at_4, 1)
        assert remedy.endswith("--slots 4)")
        return shlex.split(remedy.split("batch of 1: ")[1].split(" (or")[0])

    unet, dit = hint("unet"), hint("dit")
    assert (unet[unet.index("--batch") + 1], unet[unet.index("--max-batch") + 1]) == ("4", "4")
    assert dit[dit.index("--batch") + 1] == "1" and "--max-batch" not in dit  # a DiT's batch is static
