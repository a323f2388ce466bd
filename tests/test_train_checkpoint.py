"""Training, checkpoints (save / load / resume) and the `mirage-train` command line."""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mirage.train.checkpoint import (CONFIG, STATE, WEIGHTS, CheckpointError, check_not_dit, load_checkpoint,
                                     load_train_state, read_meta, save_checkpoint)
from mirage.cli.train import main
from mirage.core.config import ConfigError, ModelConfig, TrainConfig, from_json, get_config
from mirage.train.data import SyntheticVideo
from mirage.model.unet import MirageUNet
from mirage.train.trainer import TrainStep, lr_at, train

from conftest import CKPT_GEN, CKPT_V2V, ROOT

SMALL_RUN = dict(batch_size=2, lr=1e-3, warmup=1, log_every=1, save_every=1000)


def test_training_loss_decreases(tmp_path):
    tcfg = TrainConfig(steps=60, batch_size=8, lr=2e-3, warmup=10, log_every=10, save_every=1000)
    summary = train(get_config("tiny"), tcfg, tmp_path / "run", device="cpu", progress=False)
    assert summary["step"] == 60
    # Deterministic (fixed seeds): first batch ~0.52, mean of the last 10 steps ~0.18.
    assert summary["loss"] < 0.6 * summary["first_loss"], summary
    assert summary["parameters"] == 1480547
    meta = read_meta(tmp_path / "run")
    assert meta["step"] == 60 and meta["loss"] == pytest.approx(summary["loss"])
    assert (tmp_path / "run" / WEIGHTS).is_file() and (tmp_path / "run" / STATE).is_file()


def test_lr_schedule():
    tcfg = TrainConfig(steps=100, lr=1e-3, warmup=10)
    assert lr_at(0, tcfg) == pytest.approx(1e-4)
    assert lr_at(9, tcfg) == pytest.approx(1e-3)
    assert lr_at(10, tcfg) == pytest.approx(1e-3)
    assert lr_at(100, tcfg) == pytest.approx(1e-4)  # cosine down to 10% of the peak
    assert lr_at(55, tcfg) == pytest.approx(0.55e-3)


def _clips(batch: int, seed: int = 0) -> torch.Tensor:
    src = SyntheticVideo(32, seed=seed)
    return torch.stack([torch.from_numpy(src.clip(i, 5)).permute(0, 3, 1, 2) for i in range(batch)])


def _step(model, opt, tcfg, clips, seed):
    torch.manual_seed(seed)
    loss = TrainStep(model, tcfg)(clips)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def test_checkpoint_round_trip_and_optimizer_state(tmp_path):
    torch.manual_seed(0)
    cfg, tcfg = get_config("tiny"), TrainConfig(steps=3, batch_size=2)
    model = MirageUNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    clips = _clips(2)
    for s in range(2):
        _step(model, opt, tcfg, clips, seed=s)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)  # make the EMA differ from the raw weights, to see which one is loaded
    save_checkpoint(tmp_path / "ck", model, ema, tcfg, step=2, optimizer=opt, extra={"note": "x"})
    assert not list((tmp_path / "ck").glob("*.tmp"))

    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert loaded.cfg == cfg and not loaded.training
    assert meta["step"] == 2 and meta["note"] == "x" and from_json(TrainConfig, meta["train"]) == tcfg
    ref = ema.state_dict()
    got = loaded.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # the .safetensors path works too
    again, _ = load_checkpoint(tmp_path / "ck" / WEIGHTS)
    assert all(torch.equal(again.state_dict()[k], ref[k]) for k in ref)

    # restore raw weights, EMA and AdamW moments into fresh objects
    model2, ema2 = MirageUNet(cfg), MirageUNet(cfg)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, betas=(0.9, 0.99))
    meta2 = load_train_state(tmp_path / "ck", model2, ema2, opt2)
    assert meta2["step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), ema2.parameters()))
    saved = load_file(str(tmp_path / "ck" / STATE))
    for idx, p in enumerate(model.parameters()):
        s1, s2 = opt.state[p], opt2.state[list(model2.parameters())[idx]]
        assert torch.equal(s2["exp_avg"], s1["exp_avg"]) and torch.equal(s2["exp_avg_sq"], s1["exp_avg_sq"])
        assert float(s2["step"]) == 2.0
        assert torch.equal(saved[f"opt.{idx}.exp_avg"], s1["exp_avg"])
    assert any(s["exp_avg"].abs().sum() > 0 for s in opt2.state.values())
    # and training continues exactly as if never interrupted
    l1 = _step(model, opt, tcfg, clips, seed=7)
    l2 = _step(model2, opt2, tcfg, clips, seed=7)
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    summary = train(get_config("tiny"), TrainConfig(steps=3, **SMALL_RUN), out, device="cpu", progress=False)
    return out, summary


def test_resume_continues_from_saved_step(short_run, tmp_path):
    out, first = short_run
    assert first["step"] == 3
    run = tmp_path / "run"
    shutil.copytree(out, run)
    saved = load_file(str(run / STATE))
    assert saved["opt.0.step"].item() == 3
    # load_train_state hands back the saved moments
    model, ema = MirageUNet(get_config("tiny")), MirageUNet(get_config("tiny"))
    opt = torch.optim.AdamW(model.parameters())
    load_train_state(run, model, ema, opt)
    assert torch.equal(opt.state[next(iter(model.parameters()))]["exp_avg"], saved["opt.0.exp_avg"])

    summary = train(get_config("tiny"), TrainConfig(steps=5, **SMALL_RUN), run, resume=True, device="cpu",
                    progress=False)
    assert summary["step"] == 5
    assert read_meta(run)["step"] == 5
    # AdamW's own step counter went 3 -> 5: the optimizer state was restored, not restarted at 0
    assert load_file(str(run / STATE))["opt.0.step"].item() == 5
    # without resume, the same call starts over
    fresh = train(get_config("tiny"), TrainConfig(steps=2, **SMALL_RUN), tmp_path / "fresh", resume=True,
                  device="cpu", progress=False)
    assert fresh["step"] == 2 and load_file(str(tmp_path / "fresh" / STATE))["opt.0.step"].item() == 2


@pytest.mark.parametrize("cfg, field, saved, asked", [
    (get_config("tiny", "v2v"), "cond_channels", "0", "3"),
    (dataclasses.replace(get_config("tiny"), context_frames=6), "context_frames", "4", "6"),
])
def test_resume_with_other_config_refused(short_run, cfg, field, saved, asked):
    out, _ = short_run
    before = (out / CONFIG).read_text()
    with pytest.raises(ConfigError) as e:
        train(cfg, TrainConfig(steps=6, **SMALL_RUN), out, resume=True, device="cpu", progress=False)
    msg = str(e.value)
    assert f"{field}: checkpoint has {saved}, asked for {asked}" in msg
    assert (out / CONFIG).read_text() == before  # nothing overwritten


# ---- unreadable checkpoints ---------------------------------------------------------------


def test_load_missing_folder(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_load_folder_without_config(tmp_path):
    shutil.copy(CKPT_GEN / WEIGHTS, tmp_path / WEIGHTS)
    with pytest.raises(CheckpointError, match=CONFIG) as e:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_load_corrupt_weights(tmp_path):
    shutil.copy(CKPT_GEN / CONFIG, tmp_path / CONFIG)
    (tmp_path / WEIGHTS).write_bytes(b"this is not a safetensors file" * 3)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    assert str(tmp_path / WEIGHTS) in str(e.value)


def test_load_missing_weights(tmp_path):
    shutil.copy(CKPT_GEN / CONFIG, tmp_path / CONFIG)
    with pytest.raises(CheckpointError, match="missing") as e:
        load_checkpoint(tmp_path)
    assert str(tmp_path / WEIGHTS) in str(e.value)


def test_load_corrupt_config(tmp_path):
    (tmp_path / CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt JSON") as e:
        load_checkpoint(tmp_path)
    assert str(tmp_path / CONFIG) in str(e.value)
    (tmp_path / CONFIG).write_text(json.dumps({"model": {"image_size": 30}}))
    with pytest.raises(CheckpointError, match="bad model config"):
        load_checkpoint(tmp_path)


def test_a_dit_checkpoint_is_named_beside_the_reader_that_refuses_it(tmp_path):
    """check_not_dit, beside read_meta: a DiT checkpoint trained here (config.json {"dit": ...}) is named with the
    --dit it needs, where read_meta only says it is no U-Net checkpoint; U-Net checkpoints and folders that are
    no checkpoint at all pass it to read_meta."""
    dit = ROOT / "checkpoints" / "dit-tiny-taesd"
    with pytest.raises(CheckpointError, match="no \"model\" section"):
        read_meta(dit)
    with pytest.raises(CheckpointError) as e:
        check_not_dit(dit)
    assert str(e.value) == f"{dit} is a DiT checkpoint: add --dit dit-tiny-taesd"
    (tmp_path / CONFIG).write_text("{not json")
    for folder in (CKPT_GEN, tmp_path, tmp_path / "missing"):
        check_not_dit(folder)


def test_bundled_checkpoints_load():
    gen, meta = load_checkpoint(CKPT_GEN)
    v2v, meta_v = load_checkpoint(CKPT_V2V)
    assert gen.cfg == get_config("tiny") and v2v.cfg == get_config("tiny", "v2v")
    assert meta["parameters"] == 1480547 and meta_v["parameters"] == 1481411


def test_load_weights_of_other_config(tmp_path):
    shutil.copy(CKPT_GEN / CONFIG, tmp_path / CONFIG)  # generation config...
    shutil.copy(CKPT_V2V / WEIGHTS, tmp_path / WEIGHTS)  # ...with v2v weights (in_conv has 6 inputs)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    assert str(tmp_path / WEIGHTS) in str(e.value)


# ---- command line ---------------------------------------------------------------------------


def test_cli_dry_run_seed880m():
    result = CliRunner().invoke(main, ["--dry-run", "--config", "seed880m"])
    assert result.exit_code == 0, result.output
    assert "model seed880m (generate): 895.38M parameters" in result.stderr
    printed = json.loads(result.stdout)
    assert printed["model"]["base_channels"] == 192 and printed["model"]["channel_mults"] == [1, 2, 5, 8]
    assert from_json(ModelConfig, printed["model"]) == get_config("seed880m")


def test_cli_unknown_config():
    result = CliRunner().invoke(main, ["--config", "nope"])
    assert result.exit_code == 2
    assert "nope" in result.stderr


def test_cli_missing_data_folder(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["--data", "/nonexistent", "--steps", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert not out.exists()  # refused before writing anything
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and errors[0].startswith("Error: /nonexistent: not a folder"), result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback


def test_cli_trains(tmp_path):
    out = tmp_path / "cli-run"
    result = CliRunner().invoke(main, ["--steps", "2", "--batch-size", "2", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["out"] == str(out)
    assert read_meta(out)["step"] == 2


def test_torchrun_ddp_on_cpu(tmp_path):
    """Two processes under torchrun (gloo on the CPU): DDP trains and rank 0 saves."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "mirage.cli.train",
           "--steps", "2", "--batch-size", "2", "--device", "cpu", "--out", str(out), "--no-resume"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((out / "config.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 2


def test_gradient_checkpointing_gives_the_same_gradients():
    from mirage.model.unet import MirageUNet
    from mirage.train.trainer import TrainStep

    torch.manual_seed(0)
    model = MirageUNet(get_config("tiny"))
    clips = torch.randn(2, model.cfg.context_frames + 1, 3, 32, 32)
    grads = []
    for flag in (False, True):
        model.grad_checkpoint = flag
        model.zero_grad()
        torch.manual_seed(1)  # same noise draws inside the step
        TrainStep(model, TrainConfig()).train()(clips).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
