"""Self-Forcing's published 4-step schedule (shift 5, warped [1000, 750, 500, 250]) as golden values."""
from __future__ import annotations

import pytest

from mirage.core.config import get_dit_config
from mirage.core.flow_schedule import block_schedule, sigma_at, train_sigmas, warp_timesteps


def test_warped_published_steps():
    # FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True).timesteps[[0, 250, 500, 750]]
    assert warp_timesteps((1000, 750, 500, 250), 5.0) == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-9)
    assert warp_timesteps((1000,), 1.0) == [1000.0]
    assert train_sigmas(5.0)[500] == pytest.approx(5 * 0.5 / (1 + 4 * 0.5))


def test_default_block_schedule_is_self_forcings():
    cfg = get_dit_config("wan-1.3b")
    rows = block_schedule(cfg.denoising_steps, cfg.timestep_shift, cfg.warp_denoising_step)
    want = [(1000.0, 1.0, 0.9375), (937.5, 0.9375, 5 / 6), (2500 / 3, 5 / 6, 0.625), (625.0, 0.625, 0.0)]
    assert [r for row in rows for r in row] == pytest.approx([w for row in want for w in row], abs=1e-9)
    assert cfg.context_timestep == 0 and cfg.block_frames == 3 and cfg.steps == 4


def test_unwarped_steps_use_the_nearest_table_sigma():
    rows = block_schedule((1000, 750, 500, 250), 5.0, warp=False)
    assert [r[0] for r in rows] == [1000.0, 750.0, 500.0, 250.0]
    # σ of the shifted table entry nearest t=750 (σ ≈ 0.75 after the shift, i.e. an unshifted ≈ 0.375)
    assert rows[1][1] == pytest.approx(0.75, abs=2e-3) and sigma_at(0.0, 5.0) == 0.0
    with pytest.raises(ValueError, match="outside"):
        warp_timesteps((1001,), 5.0)
