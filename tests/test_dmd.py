"""Distribution matching distillation (train/dmd.py, `mirage-train --dmd-from`)."""
import copy
import json
from contextlib import nullcontext

import pytest
import torch
from click.testing import CliRunner

from mirage.cli.train import main as train_cli
from mirage.core.config import DMD_LR, ConfigError, TrainConfig, get_config
from mirage.model.diffusion import alpha_sigma, q_sample
from mirage.train.checkpoint import CheckpointError, load_checkpoint, load_train_state, read_meta, save_checkpoint
from mirage.train.dmd import DMD, T_MAX, T_MIN, dmd_gradient, generator_loss
from mirage.train.trainer import TrainStep, dmd_step, train

from conftest import CKPT_GEN

FAST = dict(batch_size=2, warmup=1, log_every=1, save_every=1000, self_forcing_steps=2)


def _clips(b: int = 2, k: int = 4, seed: int = 7) -> torch.Tensor:
    from mirage.train.data import SyntheticVideo

    clips = [SyntheticVideo(32, seed=seed).clip(i, k + 1) for i in range(b)]
    return torch.from_numpy(__import__("numpy").stack(clips)).permute(0, 1, 4, 2, 3)  # (B, K+1, 3, H, W)


def _dmd(make_random_tiny, tcfg: TrainConfig, task: str = "generate") -> DMD:
    """G: a randomised tiny model; real: the bundled generator (or a randomised v2v one); fake: a copy of real."""
    real = load_checkpoint(CKPT_GEN)[0] if task == "generate" else make_random_tiny(task, seed=1)
    return DMD(make_random_tiny(task).train(), real.requires_grad_(False),
               copy.deepcopy(real).train().requires_grad_(True), tcfg)


def test_generator_gradient_is_the_normalised_score_difference():
    torch.manual_seed(0)
    x0 = torch.randn(3, 3, 8, 8, requires_grad=True)
    real, fake = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    generator_loss(x0, real, real).backward()
    assert torch.equal(x0.grad, torch.zeros_like(x0))  # fake == real: G's distribution is the data's, no push
    x0.grad = None
    generator_loss(x0, real, fake).backward()
    scale = (x0 - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x0.grad * x0.numel(), (fake - real) / scale, atol=1e-6)
    assert torch.allclose(dmd_gradient(x0, real, fake), (fake - real) / scale)


def test_dmd_moves_a_toy_generator_onto_the_data():
    """1-D Gaussians in every pixel: data N(μ, s²), G's samples θ + s z. Both denoisers are exact
    (the posterior mean of x_0 given x_t), so DMD's descent must carry θ to μ."""
    mu, s = 0.6, 0.3
    theta = torch.tensor(-0.5, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.5)

    def denoiser(mean):  # E[x_0 | x_t] for x_0 ~ N(mean, s²), x_t = α x_0 + σ ε
        def x0(x_t, t):
            a, sig = (v[:, None, None, None] for v in alpha_sigma(t))
            return mean + a * s ** 2 * (x_t - a * mean) / (a ** 2 * s ** 2 + sig ** 2)
        return x0

    torch.manual_seed(0)
    for _ in range(300):
        x0_g = theta + s * torch.randn(16, 1, 4, 4)
        t = torch.randint(T_MIN, T_MAX + 1, (16,))
        x_t = q_sample(x0_g.detach(), t, torch.randn_like(x0_g))
        opt.zero_grad()
        generator_loss(x0_g, denoiser(mu)(x_t, t), denoiser(theta.detach())(x_t, t)).backward()
        opt.step()
    assert abs(theta.item() - mu) < 0.05, theta.item()


def test_sample_backpropagates_through_one_denoiser_call(make_random_tiny):
    dmd = _dmd(make_random_tiny, TrainConfig(self_forcing_steps=4))
    calls = []  # (graph, grad enabled) per call of G
    denoise, encode = dmd.model.denoise, dmd.model.context_encode
    dmd.model.denoise = lambda *a: calls.append(("denoise", torch.is_grad_enabled())) or denoise(*a)
    dmd.model.context_encode = lambda *a: calls.append(("encode", torch.is_grad_enabled())) or encode(*a)
    exits = set()
    for seed in range(8):  # exit steps differ: always one call with gradient, after 0 .. 3 without
        torch.manual_seed(seed)
        calls.clear()
        sample = dmd.sample(_clips(), None, self_forced=False, grad=True)
        assert calls[0] == ("encode", True) and calls[-1] == ("denoise", True)
        assert calls.count(("denoise", True)) == 1
        exits.add(calls.count(("denoise", False)))
        assert sample.x0.requires_grad and sample.x0.shape == (2, 3, 32, 32)
    assert exits <= {0, 1, 2, 3} and len(exits) > 1
    dmd.tcfg = TrainConfig(self_forcing_steps=4, dmd_exit="last")  # the runtime's frame: after all 3 earlier steps
    for seed in range(3):
        torch.manual_seed(seed)
        calls.clear()
        dmd.sample(_clips(), None, self_forced=False, grad=True)
        assert calls.count(("denoise", False)) == 3 and calls[-1] == ("denoise", True)
    calls.clear()
    assert not dmd.sample(_clips(), None, self_forced=False, grad=False).x0.requires_grad
    assert all(not grad for _, grad in calls)
    calls.clear()
    dmd.fake = make_random_tiny(seed=2)  # a fake score other than the real one: G gets a push
    dmd.generator_loss(sample).backward()  # the scores run without gradient; G's last call carries it
    assert calls == [] and all(p.grad is None for p in [*dmd.real.parameters(), *dmd.fake.parameters()])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dmd.model.parameters())


def test_fake_equal_to_real_leaves_the_generator_unmoved_unless_anchored(make_random_tiny):
    tcfg = TrainConfig(weight_decay=0.0, dmd_fake_updates=1, dmd_regression=0.0, **FAST)
    dmd = _dmd(make_random_tiny, tcfg)
    fake_before = copy.deepcopy(dmd.fake.state_dict())
    before = copy.deepcopy(dmd.model.state_dict())
    opt = torch.optim.AdamW(dmd.model.parameters(), weight_decay=0.0)
    fake_opt = torch.optim.AdamW(dmd.fake.parameters(), weight_decay=0.0)
    scalers = (torch.amp.GradScaler("cpu", enabled=False),) * 2

    def step() -> tuple[float, float]:
        return dmd_step(dmd, lambda: (_clips(), None), opt, fake_opt, scalers, nullcontext, False,
                        TrainStep(dmd.model, dmd.tcfg))

    loss, fake_loss = step()
    assert loss == 0 and fake_loss > 0  # fake == real at the first step: no push on G; the fake score learns
    assert all(torch.equal(before[k], v) for k, v in dmd.model.state_dict().items())
    assert any(not torch.equal(fake_before[k], v) for k, v in dmd.fake.state_dict().items())
    assert all(p.grad is None for p in dmd.real.parameters())
    # the fake score has moved, so G now gets a push; and an anchor moves G even where the scores agree
    dmd.fake.load_state_dict(fake_before)
    dmd.tcfg = TrainConfig(weight_decay=0.0, dmd_fake_updates=1, dmd_regression=1.0, **FAST)
    loss, _ = step()
    assert loss > 0 and any(not torch.equal(before[k], v) for k, v in dmd.model.state_dict().items())


def test_fake_score_learns_the_generators_samples(make_random_tiny):
    """G is stubbed to make one frame P (a coloured checkerboard, unlike the data), whatever its
    context: trained on G's samples, the fake score's x̂_0 of noised frames of P moves onto P,
    away from the frozen real score's."""
    dmd = _dmd(make_random_tiny, TrainConfig(**FAST))
    cells = (torch.arange(32)[:, None] // 8 + torch.arange(32)[None, :] // 8) % 2  # (32, 32) of 8-pixel cells
    pattern = (0.8 * (2 * cells - 1) * torch.tensor([1.0, -0.5, 0.3])[:, None, None])[None]  # (1, 3, 32, 32)

    def g_makes_the_pattern(x_t, t, cond, memory, ages):  # v whose x̂_0 = α_t x_t - σ_t v is P
        a, s = (v[:, None, None, None] for v in alpha_sigma(t))
        return (a * x_t - pattern) / s

    dmd.model.denoise = g_makes_the_pattern
    real_before = copy.deepcopy(dmd.real.state_dict())
    opt = torch.optim.AdamW(dmd.fake.parameters(), lr=2e-3)
    for i in range(25):
        torch.manual_seed(i)
        loss = dmd.fake_loss(dmd.sample(_clips(seed=i), None, False, grad=False))
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def distance(score) -> float:  # mean |x̂_0(x_t) - P| over noised copies of P, t in 200 .. 700
        torch.manual_seed(123)
        sample = dmd.sample(_clips(seed=9), None, False, grad=False)
        t = torch.tensor([200, 700])
        x_t = q_sample(sample.x0, t, torch.randn_like(sample.x0))
        return (dmd._x0(score, x_t, t, sample) - pattern).abs().mean().item()

    real, fake = distance(dmd.real), distance(dmd.fake)
    assert fake < 0.6 * real, (real, fake)
    assert all(torch.equal(real_before[k], v) for k, v in dmd.real.state_dict().items())


def test_fake_score_and_its_optimizer_round_trip(tmp_path, make_random_tiny):
    model, fake = make_random_tiny(), make_random_tiny(seed=3)
    opt, fake_opt = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, fake))
    for m, o in ((model, opt), (fake, fake_opt)):  # one step each, so AdamW has moments to save
        TrainStep(m, TrainConfig(batch_size=2))(_clips()).backward()
        o.step()
    save_checkpoint(tmp_path, model, model, TrainConfig(), 1, opt, aux={"fake": (fake, fake_opt)})
    model2, fake2 = make_random_tiny(seed=5), make_random_tiny(seed=6)
    opt2, fake_opt2 = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model2, fake2))
    load_train_state(tmp_path, model2, copy.deepcopy(model2), opt2, aux={"fake": (fake2, fake_opt2)})
    assert all(torch.equal(v, fake2.state_dict()[k]) for k, v in fake.state_dict().items())
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in model.state_dict().items())
    saved, loaded = fake_opt.state_dict()["state"], fake_opt2.state_dict()["state"]
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[i]["exp_avg"], loaded[i]["exp_avg"]) for i in saved)
    assert not torch.equal(saved[0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])  # each its own moments
    # a train state without a fake score cannot resume a DMD run
    save_checkpoint(tmp_path / "plain", model, model, TrainConfig(), 1, opt)
    with pytest.raises(CheckpointError, match="holds no fake model"):
        load_train_state(tmp_path / "plain", model2, copy.deepcopy(model2), opt2, aux={"fake": (fake2, fake_opt2)})


def test_dmd_run_saves_g_resumes_and_runs_in_the_runtime(tmp_path):
    from mirage.bridge.pipeline import load_pipeline

    tcfg = TrainConfig(steps=2, dmd_from=str(CKPT_GEN), dmd_fake_updates=2, self_forcing_prob=1.0, **FAST)
    summary = train(get_config("tiny"), tcfg, tmp_path / "g", device="cpu", progress=False)
    assert summary["trained_steps"] == 2 and summary["self_forced_steps"] == 2 and summary["fake_loss"] > 0
    meta = read_meta(tmp_path / "g")
    assert "fake" in meta["aux_param_groups"] and meta["train"]["dmd_from"] == str(CKPT_GEN)
    teacher, g = load_checkpoint(CKPT_GEN)[0], load_checkpoint(tmp_path / "g")[0]
    assert any(not torch.equal(v, g.state_dict()[k]) for k, v in teacher.state_dict().items())  # G was trained
    resumed = train(get_config("tiny"), TrainConfig(**{**tcfg.__dict__, "steps": 3}), tmp_path / "g", resume=True, device="cpu",
                    progress=False)
    assert resumed["step"] == 3 and resumed["trained_steps"] == 1
    with load_pipeline(tmp_path / "g", device="cpu") as pipe:  # G is an ordinary checkpoint: 4 steps, as the teacher
        pipe.reset(0)
        assert len(pipe.schedule.timesteps) == 4 and pipe.step().shape == (32, 32, 3)


def test_dmd_trains_a_video_to_video_model(tmp_path, make_random_tiny):
    teacher = make_random_tiny("v2v")
    save_checkpoint(tmp_path / "t", teacher, teacher, TrainConfig(), step=1)
    tcfg = TrainConfig(steps=1, dmd_from=str(tmp_path / "t"), dmd_fake_updates=1, **FAST)
    summary = train(get_config("tiny", "v2v"), tcfg, tmp_path / "g", device="cpu", progress=False)
    assert summary["trained_steps"] == 1 and summary["loss"] > 0  # the anchor's v-loss: fake = real at step 1
    g = load_checkpoint(tmp_path / "g")[0]
    assert g.cfg.cond_channels == teacher.cfg.cond_channels > 0
    assert any(not torch.equal(v, g.state_dict()[k]) for k, v in teacher.state_dict().items())  # G was trained


@pytest.mark.parametrize("task", ["generate", "v2v"])
def test_a_generator_step_moves_gs_sample_toward_the_real_score(make_random_tiny, task):
    """On a fixed seed (same context, noise and t): one small descent step of L_G on G's weights
    moves G's sample x_0^G along -g, toward the real denoiser's x̂_0 and away from the fake's."""
    dmd = _dmd(make_random_tiny, TrainConfig(dmd_exit="last", **FAST), task)
    dmd.fake = make_random_tiny(task, seed=2).requires_grad_(False)  # unlike real: g != 0
    clips = _clips()

    def sample() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_0^G with G's gradient, x̂_0^real, x̂_0^fake) at t = 500, every draw seeded."""
        torch.manual_seed(0)
        s = dmd.sample(clips, None, self_forced=False, grad=True)
        torch.manual_seed(1)
        t = torch.full((s.x0.shape[0],), 500)
        x_t = q_sample(s.x0.detach(), t, torch.randn_like(s.x0))
        with torch.no_grad():
            return s.x0, dmd._x0(dmd.real, x_t, t, s), dmd._x0(dmd.fake, x_t, t, s)

    x0, real, fake = sample()
    g = dmd_gradient(x0.detach(), real, fake)
    assert g.abs().mean() > 0.1
    dmd.model.zero_grad()
    generator_loss(x0, real, fake).backward()
    with torch.no_grad():
        for p in dmd.model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad / p.grad.norm().clamp_min(1e-12)  # a small step along each tensor's descent
    step = (sample()[0] - x0).detach()
    cos = (step * -g).sum() / (step.norm() * g.norm())
    assert step.abs().mean() > 0 and cos > 0.1, cos.item()


def test_cli_dmd_errors(tmp_path):
    runner = CliRunner()
    out = ["--out", str(tmp_path / "x"), "--device", "cpu"]
    for args, message in ((["--dmd-from", str(CKPT_GEN), "--init-from", str(CKPT_GEN)], "drop init_from"),
                          (["--dmd-from", str(CKPT_GEN), "--distill-from", str(CKPT_GEN), "--student-steps", "2"],
                           "drop distill_from"),
                          (["--dmd-regression", "0.1"], "--dmd-regression need(s) --dmd-from"),
                          (["--dmd-fake-updates", "3"], "--dmd-fake-updates need(s) --dmd-from"),
                          (["--dmd-exit", "last"], "--dmd-exit need(s) --dmd-from"),
                          (["--dmd-from", str(CKPT_GEN), "--dmd-fake-updates", "0"], "--dmd-fake-updates"),
                          (["--dmd-from", str(tmp_path / "nowhere")], "--dmd-from")):
        bad = runner.invoke(train_cli, [*args, *out])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output, (args, bad.output)
    for field, value in (("dmd_fake_updates", 0), ("dmd_regression", -0.5), ("dmd_exit", "first")):
        with pytest.raises(ConfigError, match=f"{field}={value!r}"):
            TrainConfig(dmd_from="t", **{field: value})
    ok = runner.invoke(train_cli, ["--dmd-from", str(CKPT_GEN), "--dmd-fake-updates", "1", "--steps", "1",
                                   "--batch-size", "2", *out])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.output[ok.output.index('{"step"'):])  # after the progress bar
    assert summary["trained_steps"] == 1 and read_meta(tmp_path / "x")["train"]["dmd_fake_updates"] == 1
    assert read_meta(tmp_path / "x")["train"]["lr"] == DMD_LR  # a fine-tune's lr when --lr is not given
    assert read_meta(tmp_path / "x")["train"]["dmd_regression"] == 4.0  # anchored: unanchored DMD overshoots
    given = runner.invoke(train_cli, ["--dmd-from", str(CKPT_GEN), "--lr", "3e-5", "--dry-run",
                                      "--out", str(tmp_path / "y"), "--device", "cpu"])
    assert given.exit_code == 0 and json.loads(given.output[given.output.index("{"):])["train"]["lr"] == 3e-5
