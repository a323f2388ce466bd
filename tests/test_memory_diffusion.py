"""Noise schedule, DDIM sampler, and golden values of full rollouts of the bundled models (the ring
buffer's ops are tested in test_runtime.py).

Regenerating the golden values (only when the model, the sampler, the noise generator or a bundled
checkpoint changes ON PURPOSE): run

    MIRAGE_PRINT_GOLDEN=1 python -m pytest tests/test_memory_diffusion.py -k golden -s

which prints GOLDEN_GENERATE and GOLDEN_V2V in the form used below. Paste them over the dicts
here and say in the commit why the numbers moved.
"""
from __future__ import annotations

import os
import pprint

import pytest
import torch

from mirage.model.diffusion import (ALPHAS_CUMPROD, T, alpha_sigma, ddim_coefficients, ddim_sample, ddim_timesteps,
                                    q_sample, v_target)
from mirage.train.rollout import rollout

# ---- schedule ------------------------------------------------------------------------------


def test_schedule_shape_and_ends():
    a = ALPHAS_CUMPROD
    assert a.dtype == torch.float64 and a.shape == (T,)
    assert torch.all(a[1:] < a[:-1]), "alphas_cumprod must decrease strictly"
    assert 0.999 < a[0].item() <= 1.0
    assert a[-1].item() == 0.0  # zero terminal SNR, exactly
    alpha, sigma = alpha_sigma(torch.tensor([0, 999]))
    assert sigma[1].item() == 1.0 and alpha[1].item() == 0.0
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones(2))


def test_ddim_timesteps():
    assert ddim_timesteps(4) == [999, 749, 499, 249]
    assert ddim_timesteps(1) == [999]
    assert ddim_timesteps(10)[:3] == [999, 899, 799]
    full = ddim_timesteps(1000)
    assert full == list(range(999, -1, -1))
    for steps in (3, 7, 999):
        ts = ddim_timesteps(steps)
        assert len(ts) == steps and ts[0] == 999 and min(ts) >= 0
        assert all(x > y for x, y in zip(ts, ts[1:]))
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError):
            ddim_timesteps(bad)


def test_ddim_coefficients_last_step_is_clean():
    coefs = ddim_coefficients(4)
    assert coefs.shape == (4, 6)
    assert coefs[:, 0].tolist() == [999, 749, 499, 249]
    assert coefs[-1, 3].item() == 1.0 and coefs[-1, 4].item() == 0.0  # prev = x0
    assert coefs[:, 5].abs().sum().item() == 0.0  # eta = 0: deterministic


def test_v_parameterisation_inverts():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t, v = q_sample(x0, t, eps), v_target(x0, t, eps)
    a, s = (z[:, None, None, None] for z in alpha_sigma(t))
    assert torch.allclose(a * x_t - s * v, x0, atol=1e-5)
    assert torch.allclose(s * x_t + a * v, eps, atol=1e-5)


def _oracle(x0: torch.Tensor):
    """A perfect denoiser for a known clean sample: returns the exact v at (x_t, t)."""

    def denoise(x_t, t, cond):
        a, s = (z[:, None, None, None].double() for z in alpha_sigma(t))
        eps = (x_t.double() - a * x0.double()) / s  # sigma > 0 at every DDIM timestep
        return (a * eps - s * x0.double()).float()

    return denoise


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_ddim_with_oracle_recovers_x0(steps):
    g = torch.Generator().manual_seed(steps)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    x_T = torch.randn(2, 3, 8, 8, generator=g)
    out = ddim_sample(_oracle(x0), x_T, steps)
    assert (out - x0).abs().max().item() < 1e-5


def test_ddim_with_oracle_and_eta_recovers_x0():
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    out = ddim_sample(_oracle(x0), torch.randn(1, 3, 8, 8, generator=g), 6, eta=1.0,
                      generator=torch.Generator().manual_seed(0))
    assert (out - x0).abs().max().item() < 1e-5


def test_ddim_wrong_denoiser_does_not_recover():
    # the oracle test can fail: a denoiser for another x0 lands on that other x0
    x0, other = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    out = ddim_sample(_oracle(other), torch.randn(1, 3, 4, 4), 4)
    assert (out - x0).abs().min().item() > 0.49


# ---- golden values of full rollouts ----------------------------------------------------------

PIXELS = [(0, 5, 7), (1, 16, 16), (2, 20, 20), (0, 31, 0), (1, 0, 31)]  # (channel, y, x) of batch 0

# checkpoints/tiny, rollout(model, 3, steps=4, seed=0)
GOLDEN_GENERATE = [
    {'mean': -0.260644, 'std': 0.073472, 'pixels': [-0.309475, -0.256801, -0.238635, -0.372573, -0.143367]},
    {'mean': -0.261271, 'std': 0.078009, 'pixels': [-0.307091, -0.271572, -0.231127, -0.369183, -0.167798]},
    {'mean': -0.255959, 'std': 0.078123, 'pixels': [-0.293589, -0.248946, -0.23841, -0.366227, -0.145011]},
]
# checkpoints/tiny-v2v, rollout(model, 3, steps=4, seed=0, cond=v2v_input(SyntheticVideo(32, seed=7).clip(0, 3)))
GOLDEN_V2V = [
    {'mean': -0.195762, 'std': 0.198552, 'pixels': [-0.042702, -0.170798, -0.588055, -0.189617, -0.141469]},
    {'mean': -0.192854, 'std': 0.193948, 'pixels': [-0.042314, -0.179696, -0.588528, -0.150231, -0.199668]},
    {'mean': -0.190611, 'std': 0.188109, 'pixels': [-0.055134, -0.17012, -0.320865, -0.159481, -0.13996]},
]


def _v2v_cond(frames: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    from mirage.core.synthetic import SyntheticVideo
    from mirage.train.data import v2v_input

    clip = torch.from_numpy(SyntheticVideo(32, seed=7).clip(0, frames)).permute(0, 3, 1, 2)  # (T, 3, H, W)
    return [f[None] for f in v2v_input(clip)], clip


def _summary(frames: list[torch.Tensor]) -> list[dict]:
    return [{"mean": round(f.mean().item(), 6), "std": round(f.std().item(), 6),
             "pixels": [round(f[0, c, y, x].item(), 6) for c, y, x in PIXELS]} for f in frames]


def _rollout_generate(model):
    return list(rollout(model, 3, steps=4, seed=0))


def _rollout_v2v(model):
    cond, _ = _v2v_cond()
    return list(rollout(model, 3, steps=4, seed=0, cond=cond))


@pytest.fixture(scope="module")
def gen_frames(gen_model):
    return _rollout_generate(gen_model)


@pytest.fixture(scope="module")
def v2v_frames(v2v_model):
    return _rollout_v2v(v2v_model)


def _compare(frames, golden, name):
    if os.environ.get("MIRAGE_PRINT_GOLDEN"):
        print(f"{name} = " + pprint.pformat(_summary(frames), width=110, sort_dicts=False))
    assert len(frames) == len(golden)
    for n, (f, want) in enumerate(zip(frames, golden)):
        assert f.shape == (1, 3, 32, 32)
        assert f.min().item() >= -1 and f.max().item() <= 1
        assert f.mean().item() == pytest.approx(want["mean"], abs=1e-4), f"frame {n} mean"
        assert f.std().item() == pytest.approx(want["std"], abs=1e-4), f"frame {n} std"
        got = [f[0, c, y, x].item() for c, y, x in PIXELS]
        assert got == pytest.approx(want["pixels"], abs=1e-4), f"frame {n} pixels"


def test_golden_generate(gen_frames):
    _compare(gen_frames, GOLDEN_GENERATE, "GOLDEN_GENERATE")


def test_golden_v2v(v2v_frames):
    _compare(v2v_frames, GOLDEN_V2V, "GOLDEN_V2V")


def test_rollout_is_deterministic(gen_model):
    a = list(rollout(gen_model, 2, steps=2, seed=5))
    b = list(rollout(gen_model, 2, steps=2, seed=5))
    c = list(rollout(gen_model, 2, steps=2, seed=6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all((x - y).abs().max().item() > 1e-2 for x, y in zip(a, c))


def test_rollout_frames_depend_on_history(gen_model):
    # Frame 2 conditions on frames 0-1 through memory: with the memory disabled it comes out different.
    with_mem = list(rollout(gen_model, 2, steps=2, seed=0))
    without = list(rollout(gen_model, 2, steps=2, seed=0, context_noise=999))  # history drowned in noise
    assert torch.equal(with_mem[0], without[0])  # first frame sees an empty memory either way
    assert (with_mem[1] - without[1]).abs().max().item() > 1e-3


def test_rollout_input_errors(gen_model, v2v_model):
    cond, _ = _v2v_cond(2)
    with pytest.raises(ValueError, match="generation model"):
        next(rollout(gen_model, 1, cond=cond))
    with pytest.raises(ValueError, match="video-to-video"):
        next(rollout(v2v_model, 1))
    with pytest.raises(ValueError, match="shape"):
        next(rollout(v2v_model, 1, steps=1, cond=[torch.zeros(1, 3, 16, 16)]))
    # a finite input stream ends the rollout early
    assert len(list(rollout(v2v_model, 5, steps=1, cond=cond))) == 2


def test_v2v_checkpoint_restores_colors(v2v_frames):
    _, clip = _v2v_cond()
    err = [(f[0] - clip[n]).abs().mean().item() for n, f in enumerate(v2v_frames)]
    assert max(err) < 0.08, f"mean abs error per frame vs ground truth: {err}"
