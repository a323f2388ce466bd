"""Fault suite for checkpoints and training: faults are injected, never left to timing.

* a save killed at each of its writes (every file write, fsync and rename, and a torn write of
  each weights file), then a crash during the recovery itself: the checkpoint loads as exactly
  one step, the old or the new, and no leftovers stay;
* each file of a checkpoint corrupted (garbage) or truncated; hand-edited config.json fields;
* a non-finite or non-positive --lr; a NaN loss or gradient (training stops at that step, the
  checkpoint keeps the last good save) and a save of non-finite weights (refused);
* SIGINT / SIGTERM during training (raised from inside a step, and sent to a real
  `mirage-train` process); an unwritable --out; a full disk; a config too large for memory.
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mirage.train.checkpoint as ck
import mirage.train.trainer as trainer
from mirage.cli.train import main as train_cli
from mirage.core.config import ConfigError, ModelConfig, TrainConfig
from mirage.model.unet import MirageUNet
from mirage.train.checkpoint import (CONFIG, JOURNAL, STATE, WEIGHTS, CheckpointError, load_checkpoint,
                                     load_train_state, read_meta, save_checkpoint)
from mirage.train.resources import check_fits, needed_bytes

from conftest import CKPT_GEN

# Small enough that a save takes milliseconds and a training step well under a second.
MINI = ModelConfig(name="mini", image_size=16, base_channels=8, channel_mults=(1, 2), attn_levels=(1,),
                   temporal_levels=(1,), head_dim=8, temporal_dim=16, temporal_heads=2, context_frames=2, norm_groups=4)
MINI_RUN = dict(batch_size=1, warmup=1, log_every=1, save_every=1000)


class Crash(BaseException):
    """A kill: a BaseException, so no `except` in the code under test can swallow it."""


def _models(seed: int) -> tuple[MirageUNet, MirageUNet, torch.optim.Optimizer]:
    """Raw model, EMA and an AdamW with state, all different for each seed."""
    torch.manual_seed(seed)
    model = MirageUNet(MINI)
    opt = torch.optim.AdamW(model.parameters())
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(seed)
    return model, ema, opt


def _assert_is_step(folder: Path, step: int, saved: dict) -> None:
    """The folder loads as exactly `step`: its config, EMA weights, raw weights and optimizer."""
    model, ema, opt = saved[step]
    loaded, meta = load_checkpoint(folder)
    assert meta["step"] == step
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ema.state_dict().values()))
    m2, e2 = MirageUNet(MINI), MirageUNet(MINI)
    o2 = torch.optim.AdamW(m2.parameters())
    assert load_train_state(folder, m2, e2, o2)["step"] == step
    assert all(torch.equal(a, b) for a, b in zip(m2.parameters(), model.parameters()))
    assert all(torch.equal(o2.state[a]["exp_avg"], opt.state[b]["exp_avg"])
               for a, b in zip(m2.parameters(), model.parameters()))
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG, WEIGHTS, STATE])  # no leftovers


class Faults:
    """Counts the writes of a save (file writes, fsyncs, renames, unlinks) and raises Crash at
    write number `at`; `torn` makes that write a weights file cut in half first."""

    def __init__(self, monkeypatch, at: int | None = None, torn: bool = False):
        self.calls, self.at, self.torn, self.log = 0, at, torn, []
        real_save, real_fsync, real_replace = ck.save_file, ck._fsync, os.replace
        real_write, real_unlink = Path.write_text, Path.unlink

        def hit(kind: str, path) -> None:
            self.calls += 1
            self.log.append((kind, Path(path).name))
            if self.calls == self.at:
                if self.torn and kind == "save_file":
                    Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])
                raise Crash(f"killed at write {self.calls} ({kind} {path})")

        def save(tensors, path):
            real_save(tensors, path)
            hit("save_file", path)

        monkeypatch.setattr(ck, "save_file", save)
        monkeypatch.setattr(ck, "_fsync", lambda p: (hit("fsync", p), real_fsync(p))[1])
        monkeypatch.setattr(os, "replace", lambda a, b: (hit("rename", b), real_replace(a, b))[1])
        monkeypatch.setattr(Path, "write_text", lambda p, *a, **k: (hit("write", p), real_write(p, *a, **k))[1])
        monkeypatch.setattr(Path, "unlink", lambda p, *a, **k: (hit("unlink", p), real_unlink(p, *a, **k))[1])


@pytest.fixture(scope="module")
def saved_steps():
    return {1: _models(1), 2: _models(2)}


def _save(folder: Path, step: int, saved: dict) -> None:
    model, ema, opt = saved[step]
    save_checkpoint(folder, model, ema, TrainConfig(steps=10), step, opt)


def test_a_save_counts_its_writes(tmp_path, monkeypatch, saved_steps):
    _save(tmp_path, 1, saved_steps)
    with monkeypatch.context() as m:
        faults = Faults(m)
        _save(tmp_path, 2, saved_steps)
    assert faults.calls >= 12  # 2 weights files + config + journal, each written and flushed, then committed
    _assert_is_step(tmp_path, 2, saved_steps)


@pytest.mark.parametrize("torn", [False, True], ids=["killed", "torn-write"])
def test_save_killed_at_every_write_leaves_one_step(tmp_path, monkeypatch, saved_steps, torn):
    with monkeypatch.context() as m:
        counter = Faults(m)
        _save(tmp_path / "probe", 1, saved_steps)
        _save(tmp_path / "probe", 2, saved_steps)
    writes = counter.calls // 2  # each save made the same number of writes
    outcomes = []
    for at in range(1, writes + 1):
        folder = tmp_path / f"kill{at}"
        _save(folder, 1, saved_steps)
        with monkeypatch.context() as m:
            Faults(m, at=at, torn=torn)
            with pytest.raises(Crash):
                _save(folder, 2, saved_steps)
        step = read_meta(folder)["step"]  # the next opener recovers
        _assert_is_step(folder, step, saved_steps)
        outcomes.append(step)
    # before the commit point the old step survives, after it the new one: both must occur, in that order
    assert outcomes == sorted(outcomes) and outcomes[0] == 1 and outcomes[-1] == 2, outcomes


def test_crash_during_recovery_then_recovered(tmp_path, monkeypatch, saved_steps):
    with monkeypatch.context() as m:
        probe = Faults(m)
        _save(tmp_path / "probe", 1, saved_steps)
    roll_forward = [i + 1 for i, (kind, name) in enumerate(probe.log) if kind == "rename" and name != JOURNAL]
    tmp_path = tmp_path / "ck"
    _save(tmp_path, 1, saved_steps)
    with monkeypatch.context() as m:
        Faults(m, at=roll_forward[0] + 1)  # killed after the first file of the committed save was renamed
        with pytest.raises(Crash):
            _save(tmp_path, 2, saved_steps)
    assert (tmp_path / JOURNAL).exists()  # committed, half renamed
    with monkeypatch.context() as m:
        Faults(m, at=2)  # the recovery itself is killed after its first rename
        with pytest.raises(Crash):
            read_meta(tmp_path)
    _assert_is_step(tmp_path, 2, saved_steps)


def test_full_disk_during_save_keeps_previous(tmp_path, monkeypatch, saved_steps):
    _save(tmp_path, 1, saved_steps)

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint there is intact"):
        _save(tmp_path, 2, saved_steps)
    monkeypatch.undo()
    _assert_is_step(tmp_path, 1, saved_steps)


# ---- corrupt and truncated files --------------------------------------------------------------


def _garbage(path: Path, offset: int, size: int = 4096, seed: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + size] = random.Random(seed).randbytes(size)
    path.write_bytes(bytes(data))


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name", [WEIGHTS, STATE, CONFIG])
@pytest.mark.parametrize("damage", ["garbage", "truncated-half", "truncated-to-0"])
def test_damaged_file_is_a_clear_error(tmp_path, saved_steps, name, damage):
    _save(tmp_path, 1, saved_steps)
    path = tmp_path / name
    size = path.stat().st_size
    if damage == "garbage":
        _garbage(path, size // 2, min(4096, size // 4))
    else:
        path.write_bytes(path.read_bytes()[: size // 2 if damage == "truncated-half" else 0])
    model, ema = MirageUNet(MINI), MirageUNet(MINI)
    with pytest.raises(CheckpointError) as e:
        load_train_state(tmp_path, model, ema, torch.optim.AdamW(model.parameters()))
    msg = _one_line(e)
    assert str(path) in msg or (name == CONFIG and str(tmp_path) in msg), msg
    if name != CONFIG:
        assert "sha256" in msg or "bytes" in msg, msg  # caught by the recorded hash/size, before parsing


def test_garbage_in_hashless_weights_is_refused_as_non_finite(tmp_path):
    """The case from the issue: 4 KB of garbage inside model.safetensors of a checkpoint saved
    before hashes were recorded (the bundled ones) used to load and give black video."""
    shutil.copytree(CKPT_GEN, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / CONFIG).read_text())
    meta.pop("files", None)
    (tmp_path / "ck" / CONFIG).write_text(json.dumps(meta))
    path = tmp_path / "ck" / WEIGHTS
    _garbage(path, path.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"tensor \S+ holds NaN or infinite values") as e:
        load_checkpoint(tmp_path / "ck")
    assert str(path) in _one_line(e)


@pytest.mark.parametrize("bundled", ["tiny", "tiny-v2v"])
def test_garbage_in_bundled_weights_is_caught_by_recorded_hash(tmp_path, bundled):
    shutil.copytree(CKPT_GEN.parent / bundled, tmp_path / "ck")
    load_checkpoint(tmp_path / "ck")  # intact: loads, hash and all
    path = tmp_path / "ck" / WEIGHTS
    _garbage(path, path.stat().st_size // 2, seed=1)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: sha256 differs")):
        load_checkpoint(tmp_path / "ck")


def test_nan_weight_names_file_and_tensor(tmp_path, saved_steps):
    _save(tmp_path, 1, saved_steps)
    tensors = load_file(str(tmp_path / WEIGHTS))
    tensors["out.2.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(tmp_path / WEIGHTS))
    meta = json.loads((tmp_path / CONFIG).read_text())
    meta["files"][WEIGHTS] = {"sha256": ck.sha256_file(tmp_path / WEIGHTS), "bytes": (tmp_path / WEIGHTS).stat().st_size}
    (tmp_path / CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / WEIGHTS}: tensor out.2.weight holds NaN")):
        load_checkpoint(tmp_path)


def test_stale_train_state_beside_weights_only_save(tmp_path, saved_steps):
    _save(tmp_path, 1, saved_steps)
    model, ema, _ = saved_steps[2]
    save_checkpoint(tmp_path, model, ema, TrainConfig(steps=10), 2)  # weights only: the old state must go
    assert not (tmp_path / STATE).exists()
    shutil.copy(tmp_path / WEIGHTS, tmp_path / STATE)  # a stray file the config does not describe
    m2, e2 = MirageUNet(MINI), MirageUNet(MINI)
    with pytest.raises(CheckpointError, match="not part of the checkpoint"):
        load_train_state(tmp_path, m2, e2, torch.optim.AdamW(m2.parameters()))


# ---- hand-edited config.json ----------------------------------------------------------------------

EDITS = [  # (where, field, value, fragment of the one-line error)
    ("model", "image_size", -32, "image_size=-32 must be > 0"),
    ("model", "image_size", 0, "image_size=0 must be > 0"),
    ("model", "base_channels", 0, "base_channels=0 must be > 0"),
    ("model", "channels", -3, "channels=-3 must be > 0"),
    ("model", "context_frames", 0, "context_frames=0 must be >= 1"),
    ("model", "temporal_heads", 0, "temporal_heads=0 must be >= 1"),
    ("model", "norm_groups", 0, "norm_groups=0 must be >= 1"),
    ("model", "head_dim", -8, "head_dim=-8 must be > 0"),
    ("model", "num_res_blocks", 0, "num_res_blocks=0 must be >= 1"),
    ("model", "channel_mults", [], "channel_mults=() must be a non-empty list"),
    ("model", "channel_mults", [1, 0], "channel_mults=(1, 0) must be a non-empty list of positive"),
    ("model", "image_size", "16", "image_size='16' must be an integer"),
    ("model", "image_size", 16.5, "image_size=16.5 must be an integer"),
    ("model", "image_size", None, "image_size=None must be an integer"),
    ("model", "image_size", True, "image_size=True must be an integer"),
    ("model", "channel_mults", [1, "2"], "must be a list of integers"),
    ("model", "name", 7, "name=7 must be a str"),
    ("model", "flux_capacitor", 1, "flux_capacitor"),
    ("top", "model", [1, 2], "no \"model\" section"),
    ("top", "step", -1, "step=-1 must be a non-negative integer"),
    ("top", "step", "5", "step='5' must be a non-negative integer"),
    ("top", "files", {WEIGHTS: "abc"}, "\"files\" must map"),
]


@pytest.mark.parametrize("where, field, value, fragment", EDITS, ids=[f"{w}.{f}={v!r}" for w, f, v, _ in EDITS])
def test_edited_config_is_one_line(tmp_path, saved_steps, where, field, value, fragment):
    _save(tmp_path, 1, saved_steps)
    meta = json.loads((tmp_path / CONFIG).read_text())
    (meta if where == "top" else meta["model"])[field] = value
    (tmp_path / CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    msg = _one_line(e)
    assert fragment in msg and str(tmp_path) in msg, msg


TRAIN_EDITS = [("batch_size", 0, "batch_size=0 must be >= 1"), ("lr", -1, "lr=-1 must be > 0"),
               ("ema_decay", 1.5, "ema_decay=1.5 must be in [0, 1)"),
               ("context_noise_max", 5000, "context_noise_max=5000 must be in [0, 999]"),
               ("context_noise_prob", 2, "context_noise_prob=2 must be in [0, 1]"),
               ("save_minutes", 0, "save_minutes=0 must be > 0"), ("steps", "10", "steps='10' must be an integer")]


@pytest.mark.parametrize("field, value, fragment", TRAIN_EDITS)
def test_edited_train_config_refused_on_resume(tmp_path, saved_steps, field, value, fragment):
    _save(tmp_path, 1, saved_steps)
    meta = json.loads((tmp_path / CONFIG).read_text())
    meta["train"][field] = value
    (tmp_path / CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        trainer.train(MINI, TrainConfig(steps=3, **MINI_RUN), tmp_path, resume=True, device="cpu", progress=False)
    assert fragment in _one_line(e)


# ---- interruption, resume, early checks -----------------------------------------------------------


def _signal_at_step(monkeypatch, signum: int, at: int) -> None:
    """Deliver `signum` to this process from inside training step `at` (after its EMA update)."""
    real, count = trainer.ema_update, [0]

    def ema_update(*args):
        real(*args)
        count[0] += 1
        if count[0] == at:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(trainer, "ema_update", ema_update)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_the_step_reached_and_resume_continues(tmp_path, monkeypatch, signum):
    lines, before = [], signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        _signal_at_step(m, signum, at=2)
        summary = trainer.train(MINI, TrainConfig(steps=1000, **MINI_RUN), tmp_path, device="cpu", progress=False,
                                log=lines.append)
    assert summary["stopped_by"] == signal.Signals(signum).name and summary["step"] == 2
    assert read_meta(tmp_path)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert any("finishing this step" in line for line in lines)
    resumed = trainer.train(MINI, TrainConfig(steps=3, **MINI_RUN), tmp_path, resume=True, device="cpu",
                            progress=False, log=lines.append)
    assert resumed["step"] == 3 and resumed["trained_steps"] == 1 and read_meta(tmp_path)["step"] == 3
    assert any("resuming at step 2 of 3; train config changed: steps 1000 -> 3" in line for line in lines), lines


def test_wall_clock_saves(tmp_path, monkeypatch):
    saves = []
    real = trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda *a, **k: (saves.append(a[4]), real(*a, **k))[1])
    tcfg = TrainConfig(steps=3, save_minutes=1e-9, **MINI_RUN)  # every step is past the interval
    trainer.train(MINI, tcfg, tmp_path, device="cpu", progress=False)
    assert saves == [1, 2, 3]
    saves.clear()
    trainer.train(MINI, TrainConfig(steps=3, **MINI_RUN), tmp_path / "b", device="cpu", progress=False)
    assert saves == [3]  # only the final save with the default 10 minutes and save_every 1000


def test_resume_says_nothing_left_and_records_changes(tmp_path):
    lines = []
    trainer.train(MINI, TrainConfig(steps=2, **MINI_RUN), tmp_path, device="cpu", progress=False)
    done = trainer.train(MINI, TrainConfig(steps=2, **MINI_RUN), tmp_path, resume=True, device="cpu",
                         progress=False, log=lines.append)
    assert lines == [f"{tmp_path}: nothing left to train (step 2 of 2); pass a larger --steps to train on"]
    assert done["trained_steps"] == 0 and done["loss"] == read_meta(tmp_path)["loss"]  # a number, not NaN
    lines.clear()
    trainer.train(MINI, TrainConfig(steps=3, **{**MINI_RUN, "batch_size": 2}), tmp_path, resume=True, device="cpu",
                  progress=False, log=lines.append)
    assert "batch_size 1 -> 2" in lines[0]
    assert read_meta(tmp_path)["resumes"] == [{"step": 2, "changes": {"steps": [2, 3], "batch_size": [1, 2]}}]


def test_cli_resume_takes_unspecified_options_from_checkpoint(tmp_path):
    out = tmp_path / "run"
    first = CliRunner().invoke(train_cli, ["--steps", "1", "--batch-size", "1", "--lr", "5e-4", "--out", str(out),
                                           "--device", "cpu", "--save-minutes", "3"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(train_cli, ["--steps", "2", "--out", str(out), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    saved = read_meta(out)["train"]
    assert (saved["steps"], saved["batch_size"], saved["lr"], saved["save_minutes"]) == (2, 1, 5e-4, 3)
    assert "train config changed: steps 1 -> 2 (recorded" in again.stderr


@pytest.mark.parametrize("make_out", [lambda t: t / "file" / "sub", lambda t: Path("/proc/mirage-cannot-write")],
                         ids=["under-a-file", "read-only-fs"])
def test_unwritable_out_fails_before_any_step(tmp_path, monkeypatch, make_out):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(trainer, "MirageUNet", None)  # any model allocation would now fail loudly
    result = CliRunner().invoke(train_cli, ["--steps", "1", "--out", str(make_out(tmp_path)), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "checkpoint folder is not writable" in errors[0], result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cli_cuda_without_cuda_is_one_line(tmp_path):
    result = CliRunner().invoke(train_cli, ["--steps", "1", "--out", str(tmp_path / "r"), "--device", "cuda"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == ("Error: --device cuda: PyTorch sees no CUDA GPU here; "
                                                      "use --device cpu (or auto)")


def test_too_large_for_memory_refused_before_allocating(monkeypatch):
    weights, acts = needed_bytes(MINI, TrainConfig(batch_size=4))
    w8, acts8 = needed_bytes(MINI, TrainConfig(batch_size=8))
    _, acts_ckpt = needed_bytes(MINI, TrainConfig(batch_size=8, grad_checkpoint=True))
    assert weights == w8 == 5 * 4 * sum(p.numel() for p in MirageUNet(MINI).parameters())
    assert 1.8 * acts < acts8 < 2.2 * acts and acts_ckpt < acts8  # linear in batch; checkpointing saves
    import mirage.train.resources as res

    monkeypatch.setattr(res, "available_bytes", lambda dev: weights + acts8 - 1)
    check_fits(MINI, TrainConfig(batch_size=4), torch.device("cpu"))  # fits
    with pytest.raises(ConfigError, match=r"needs about .* GiB .* but cpu has .* GiB free; lower --batch-size"):
        check_fits(MINI, TrainConfig(batch_size=8), torch.device("cpu"))
    from mirage.core.device import host_available_bytes

    assert 0 < host_available_bytes() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_sigint_to_mirage_train_process(tmp_path):
    """The real command: Ctrl-C after two steps saves them, exits 130 and says how to resume."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mirage.cli.train", "--steps", "100000", "--batch-size", "1",
                             "--out", str(out), "--device", "cpu", "--save-minutes", "600"],
                            stderr=subprocess.PIPE, text=True, env=env)
    seen = ""
    while not re.search(r"\| *[2-9]\d*/100000", seen):  # tqdm's counter: two steps done
        chunk = proc.stderr.read(1)
        assert chunk, f"mirage-train ended early: {seen[-2000:]}"
        seen += chunk
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    step = read_meta(out)["step"]
    assert step >= 2
    assert f"stopped by SIGINT at step {step} of 100000; checkpoint saved in {out}; resume with: mirage-train --out {out}" in rest
    assert "Traceback" not in rest


@pytest.mark.parametrize("lr", ["inf", "nan", "-inf", "0", "-1e-3"])
def test_cli_refuses_a_non_finite_or_non_positive_lr_in_one_line(tmp_path, lr):
    result = CliRunner().invoke(train_cli, ["--lr", lr, "--steps", "1", "--out", str(tmp_path / "r"), "--device", "cpu"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert result.exit_code == 2 and "Traceback" not in result.output and len(errors) == 1, result.output
    assert "lr" in errors[0] and not (tmp_path / "r").exists()


def test_training_stops_at_the_first_non_finite_loss_and_keeps_the_last_save(tmp_path, monkeypatch):
    """Step 3's gradient is NaN (its update would poison the weights, as a too-high lr does): the
    run stops there with one line (exit 2) and the checkpoint keeps step 2."""
    real, calls = trainer.optimizer_step, [0]

    def poisoned(opt, scaler, loss, model, clip):
        calls[0] += 1
        return real(opt, scaler, loss * float("nan") if calls[0] == 3 else loss, model, clip)

    monkeypatch.setattr(trainer, "optimizer_step", poisoned)
    result = CliRunner().invoke(train_cli, ["--steps", "5", "--batch-size", "1", "--config", "tiny", "--out",
                                            str(tmp_path), "--device", "cpu", "--save-minutes", "1e-9"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert errors[0].startswith("Error: step 3: gradient norm nan") and "lower --lr" in errors[0]
    assert read_meta(tmp_path)["step"] == 2
    model, _ = load_checkpoint(tmp_path)  # the load checks every tensor is finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_loss_stops_dmd_too(tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    trainer.train(MINI, TrainConfig(steps=1, **MINI_RUN), teacher, device="cpu", progress=False)
    monkeypatch.setattr(trainer, "dmd_step", lambda *a: (float("nan"), 0.5))
    with pytest.raises(trainer.TrainingDiverged, match=r"^step 1: loss nan \(lr 0.0001"):
        trainer.train(MINI, TrainConfig(steps=3, lr=1e-4, dmd_from=str(teacher), dmd_fake_updates=1, **MINI_RUN),
                      tmp_path / "g", device="cpu", progress=False)
    assert not (tmp_path / "g" / CONFIG).exists()


def test_a_save_never_writes_non_finite_weights(tmp_path):
    model, ema, opt = _models(0)
    save_checkpoint(tmp_path, model, ema, TrainConfig(), 1, opt)
    with torch.no_grad():
        next(ema.parameters())[0] = float("inf")
    with pytest.raises(CheckpointError, match="not saving step 2: .* holds NaN or infinite values"):
        save_checkpoint(tmp_path, model, ema, TrainConfig(), 2, opt)
    assert read_meta(tmp_path)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG, STATE, WEIGHTS])


# ---- python -m mirage.cli.train_dit: its --out checked first, Ctrl-C saves ---------------------------------------


def test_train_dit_refuses_an_unwritable_out_before_encoding_anything(tmp_path, monkeypatch):
    import mirage.train.dit as dit_train
    from mirage.cli.train_dit import main as train_dit_cli

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(dit_train, "encoded_clips", None)  # encoding the clips would now fail loudly
    result = CliRunner().invoke(train_dit_cli, ["--out", str(tmp_path / "file"), "--max-steps", "1"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "checkpoint folder is not writable" in errors[0], result.stderr


def test_sigint_to_train_dit_saves_the_steps_made_and_exits_130(tmp_path, monkeypatch):
    import mirage.train.dit as dit_train
    from mirage.cli.train_dit import main as train_dit_cli

    real, count = dit_train.flow_matching_loss, [0]

    def loss_then_ctrl_c(*args):  # Ctrl-C arrives during the second step
        count[0] += 1
        if count[0] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(dit_train, "flow_matching_loss", loss_then_ctrl_c)
    before, out = signal.getsignal(signal.SIGINT), tmp_path / "dit"
    result = CliRunner().invoke(train_dit_cli, ["--out", str(out), "--max-steps", "1000", "--batch-size", "1",
                                                "--clips", "1"])
    assert result.exit_code == 130, result.output
    assert _saved_step_and_signal(out) == (2, "SIGINT") and signal.getsignal(signal.SIGINT) is before
    assert f"stopped by SIGINT; the weights after 2 steps are saved in {out}" in result.stderr


def test_train_dit_progress_bar_counts_to_where_the_time_budget_stops_it(tmp_path, monkeypatch):
    """The bar counted to --max-steps (100,000 by default) while the time budget ended the run after a few:
    its total, and so its ETA, is the step the run stops at. A clock of 10 s a reading: a step takes 20 s of
    a 1-minute budget, so the run makes 3 steps, and the bar says 3 from the first step on."""
    import types

    import mirage.train.dit as dit_train

    readings = iter(range(0, 10_000, 10))
    monkeypatch.setattr(dit_train, "time", types.SimpleNamespace(monotonic=lambda: float(next(readings))))
    totals, postfixes = [], []

    class Bar(dit_train.tqdm):
        def update(self, n=1):
            totals.append(self.total)
            return super().update(n)

        def set_postfix(self, **kwargs):
            postfixes.append(kwargs["until"])
            return super().set_postfix(**kwargs)

    monkeypatch.setattr(dit_train, "tqdm", Bar)
    meta = dit_train.train_dit(dit_train.DiTTrainOptions(out=str(tmp_path / "dit"), minutes=1, max_steps=1000,
                                                         batch_size=1, clips=1, threads=1))
    assert meta["step"] == 3
    assert totals == [3, 3, 3] and postfixes == ["time budget"] * 3, (totals, postfixes)
    assert dit_train.bar_total(2, 10.0, 60.0, 5) == (5, "max steps")  # the cap comes first: it is the total


def _saved_step_and_signal(out: Path) -> tuple[int, str]:
    meta = json.loads((out / CONFIG).read_text())
    return meta["step"], meta["stopped_by"]
