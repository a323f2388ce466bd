"""Training on the model's own rollouts and progressive distillation (issue 18)."""
import json

import pytest
import torch
from click.testing import CliRunner

from mirage.cli.train import main as train_cli
from mirage.core.config import ConfigError, TrainConfig, get_config
from mirage.model.diffusion import ddim_coefficients, ddim_update
from mirage.train.checkpoint import read_meta, save_checkpoint
from mirage.train.distill import distill_target, step_table
from mirage.train.self_forcing import is_self_forced_step, self_forced_context
from mirage.train.trainer import TrainStep, train


def _clips(k: int = 4, b: int = 2) -> torch.Tensor:
    from mirage.train.data import SyntheticVideo

    clips = [SyntheticVideo(32, seed=7).clip(i, k + 1) for i in range(b)]
    return torch.from_numpy(__import__("numpy").stack(clips)).permute(0, 1, 4, 2, 3)  # (B, K+1, 3, H, W)


@pytest.mark.parametrize("task", ["generate", "v2v"])
def test_self_forced_context_is_the_models_own_and_carries_no_gradient(make_random_tiny, task):
    model = make_random_tiny(task).train()
    clips = _clips()
    torch.manual_seed(0)
    ctx = self_forced_context(model, clips, horizon=2, steps=2, context_noise=100)
    assert ctx.shape == clips[:, :4].shape and not ctx.requires_grad
    assert torch.equal(ctx[:, :2], clips[:, :2])  # the real prefix
    assert (ctx[:, 2:] - clips[:, 2:4]).abs().mean() > 0.05  # generated, not copied
    assert ctx.abs().max() <= 1
    with pytest.raises(ValueError, match="horizon 5"):
        self_forced_context(model, clips, horizon=5, steps=2, context_noise=100)


def test_self_forced_context_at_lower_strength_starts_from_the_real_frames(make_random_tiny):
    model = make_random_tiny().train()
    clips = _clips()
    errors = {}
    for strength in (1.0, 0.5, 0.25):
        torch.manual_seed(0)
        ctx = self_forced_context(model, clips, horizon=2, steps=4, context_noise=100, strength=strength)
        errors[strength] = (ctx[:, 2:] - clips[:, 2:4]).abs().mean().item()
    assert errors[0.25] < errors[0.5] < errors[1.0]  # less noise added, closer to the real frames
    with pytest.raises(ValueError, match="strength 0.1 leaves none of 4"):
        self_forced_context(model, clips, horizon=2, steps=4, context_noise=100, strength=0.1)
    with pytest.raises(ConfigError, match="self_forcing_strength=0"):
        TrainConfig(self_forcing_strength=0)


def test_self_forced_step_backpropagates_only_through_the_last_frame(make_random_tiny):
    model = make_random_tiny().train()
    calls = []  # (graph, grad enabled) per call
    denoise, encode = model.denoise, model.context_encode
    model.denoise = lambda *a: calls.append(("denoise", torch.is_grad_enabled())) or denoise(*a)
    model.context_encode = lambda *a: calls.append(("encode", torch.is_grad_enabled())) or encode(*a)
    step = TrainStep(model, TrainConfig(self_forcing_prob=1.0, self_forcing_horizon=3, self_forcing_steps=2))
    loss = step(_clips(), self_forced=True)
    assert torch.isfinite(loss)
    # unroll: 1 real + 3 generated frames encoded, 3 frames x 2 DDIM steps denoised, all without gradient;
    # then one context encode (the whole context) and one denoise with gradient
    assert calls.count(("encode", False)) == 4 and calls.count(("denoise", False)) == 6
    assert calls[-2:] == [("encode", True), ("denoise", True)]
    calls.clear()  # at strength 0.5 each generated frame runs the second of the 2 steps only
    TrainStep(model, TrainConfig(self_forcing_prob=1.0, self_forcing_horizon=3, self_forcing_steps=2,
                                 self_forcing_strength=0.5))(_clips(), self_forced=True)
    assert calls.count(("denoise", False)) == 3
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_self_forced_steps_are_a_fixed_fraction():
    picks = [is_self_forced_step(0, s, 0.25) for s in range(2000)]
    assert 0.22 < sum(picks) / len(picks) < 0.28
    assert picks == [is_self_forced_step(0, s, 0.25) for s in range(2000)]  # same after a resume / on every rank
    assert not any(is_self_forced_step(0, s, 0.0) for s in range(100))


@pytest.mark.parametrize("student_steps", [1, 2, 4])
def test_distill_target_lands_where_two_teacher_steps_land(student_steps):
    torch.manual_seed(0)
    x_t = torch.randn(student_steps, 3, 8, 8)
    index = torch.arange(student_steps)  # one sample per student step

    def teacher(x, t):  # a toy denoiser, non-linear in x and t
        return torch.tanh(x) * 0.7 + (t.float() / 1000)[:, None, None, None] * x.mean(dim=(1, 2, 3), keepdim=True)

    target = distill_target(teacher, x_t, index, student_steps)
    student_rows, teacher_rows = ddim_coefficients(student_steps), ddim_coefficients(2 * student_steps)
    for i in range(student_steps):
        x = x_t[i:i + 1]
        for row in teacher_rows[2 * i:2 * i + 2]:  # by hand: two DDIM steps of the teacher
            x = ddim_update(x, teacher(x, torch.tensor([int(row[0])])), row)
        student = ddim_update(x_t[i:i + 1], target[i:i + 1], student_rows[i])  # one step of the student
        assert student_rows[i][0] == teacher_rows[2 * i][0] == step_table(student_steps)[i, 0]
        assert torch.allclose(student, x, atol=1e-4), (i, (student - x).abs().max())


def test_distillation_records_the_students_steps(tmp_path, make_random_tiny):
    teacher = make_random_tiny("v2v")
    save_checkpoint(tmp_path / "teacher", teacher, teacher, TrainConfig(), step=1)
    tcfg = TrainConfig(steps=2, batch_size=2, log_every=1, distill_from=str(tmp_path / "teacher"), student_steps=2)
    summary = train(get_config("tiny", "v2v"), tcfg, tmp_path / "s2", device="cpu", progress=False)
    assert summary["sampling_steps"] == 2 and torch.isfinite(torch.tensor(summary["loss"]))
    assert read_meta(tmp_path / "s2")["sampling_steps"] == 2
    tcfg = TrainConfig(steps=1, batch_size=2, distill_from=str(tmp_path / "s2"), student_steps=2)
    with pytest.raises(ConfigError, match="samples with 2 steps.*--student-steps 1"):
        train(get_config("tiny", "v2v"), tcfg, tmp_path / "bad", device="cpu", progress=False)
    # a fine-tune of a student keeps its step count, and self-forcing unrolls with it
    tcfg = TrainConfig(steps=2, batch_size=2, init_from=str(tmp_path / "s2"), self_forcing_prob=1.0,
                       self_forcing_steps=2)
    summary = train(get_config("tiny", "v2v"), tcfg, tmp_path / "sf", device="cpu", progress=False)
    assert summary["self_forced_steps"] == 2 and read_meta(tmp_path / "sf")["sampling_steps"] == 2


def test_cli_distill_and_self_forcing_errors(tmp_path, make_random_tiny):
    runner = CliRunner()
    bad = runner.invoke(train_cli, ["--student-steps", "2", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--distill-from" in bad.output and "Traceback" not in bad.output
    model = make_random_tiny()
    save_checkpoint(tmp_path / "gen", model, model, TrainConfig(), step=1)
    bad = runner.invoke(train_cli, ["--distill-from", str(tmp_path / "gen"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "student_steps" in bad.output
    bad = runner.invoke(train_cli, ["--init-from", str(tmp_path / "gen"), "--task", "v2v", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "cond_channels" in bad.output
    bad = runner.invoke(train_cli, ["--init-from", str(tmp_path / "gen"), "--self-forcing-prob", "0.5",
                                    "--self-forcing-horizon", "9", "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert bad.exit_code == 2 and "self_forcing_horizon=9" in bad.output
    ok = runner.invoke(train_cli, ["--distill-from", str(tmp_path / "gen"), "--student-steps", "1", "--steps", "1",
                                   "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "s1")])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output[ok.output.index('{"step"'):])["sampling_steps"] == 1  # after the progress bar


def test_cli_distill_chain_runs_each_stage_from_the_last_and_resumes(tmp_path, make_random_tiny):
    teacher = make_random_tiny("v2v")
    save_checkpoint(tmp_path / "t4", teacher, teacher, TrainConfig(), step=1)  # records no steps: samples with 4
    args = ["--distill-chain", "4,2,1", "--distill-from", str(tmp_path / "t4"), "--out", str(tmp_path / "chain"),
            "--steps", "1", "--batch-size", "1", "--device", "cpu"]
    first = CliRunner().invoke(train_cli, args)
    assert first.exit_code == 0, first.output
    s2, s1 = read_meta(tmp_path / "chain" / "s2"), read_meta(tmp_path / "chain" / "s1")
    assert (s2["sampling_steps"], s2["train"]["distill_from"], s2["train"]["student_steps"]) == (2, str(tmp_path / "t4"), 2)
    assert (s1["sampling_steps"], s1["train"]["distill_from"], s1["train"]["student_steps"]) == (1, str(tmp_path / "chain" / "s2"), 1)
    # a rerun with more steps resumes every stage from its own checkpoint
    again = CliRunner().invoke(train_cli, [*args[:-6], "--steps", "2", "--batch-size", "1", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert [read_meta(tmp_path / "chain" / s)["step"] for s in ("s2", "s1")] == [2, 2]
    assert again.stderr.count("resuming at step 1 of 2") == 2
    for chain, says in [("4,3", "half the one before"), ("2,1", "samples with 4 steps, not 2"), ("4,x", "separated")]:
        bad = CliRunner().invoke(train_cli, ["--distill-chain", chain, "--distill-from", str(tmp_path / "t4"),
                                             "--out", str(tmp_path / "bad")])
        assert bad.exit_code == 2 and says in bad.stderr and "Traceback" not in bad.output, bad.output
    bad = CliRunner().invoke(train_cli, ["--distill-chain", "4,2", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "needs --distill-from" in bad.stderr


def test_runtime_and_quality_sample_a_student_with_its_own_steps(tmp_path, make_random_tiny):
    from mirage.bridge.pipeline import load_pipeline
    from mirage.runtime import PipelineOptions
    from mirage.bridge.quality import evaluate

    model = make_random_tiny()
    save_checkpoint(tmp_path / "student", model, model, TrainConfig(), step=1, extra={"sampling_steps": 2})
    with load_pipeline(tmp_path / "student", device="cpu") as pipe:
        assert len(pipe.schedule.timesteps) == 2
    with load_pipeline(tmp_path / "student", device="cpu", options=PipelineOptions(steps=3)) as pipe:
        assert len(pipe.schedule.timesteps) == 3
    assert evaluate(tmp_path / "student", frames=3, window=3)["steps"] == 2
