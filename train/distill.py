"""Progressive distillation (Salimans & Ho 2022) for v-prediction on the zero-terminal-SNR
schedule: a student that samples in N DDIM steps learns to land where two DDIM steps of its
teacher (2N steps) land. Notation as in mirage.model.diffusion.

With trailing spacing, the teacher's timesteps are the student's with one more between each
pair: student step i goes t -> t'' and the teacher's steps 2i, 2i+1 go t -> t' -> t''
(t'' = "clean", ᾱ = 1, after the last step). From x_t = α_t x_0 + σ_t ε (data x_0, noise ε):

    teacher, twice (deterministic DDIM, η = 0):
        v = teacher(x_t, t);   x̂_0 = α_t x_t - σ_t v;   ε̂ = σ_t x_t + α_t v
        x_t' = α_t' x̂_0 + σ_t' ε̂;          then the same from x_t' at t' gives x_t''

    the student's one DDIM step x_t -> x_t'' is  x_t'' = α_t'' x̃_0 + σ_t'' (x_t - α_t x̃_0) / σ_t,
    so the clean sample it must predict is

        x̃_0 = (x_t'' - (σ_t'' / σ_t) x_t) / (α_t'' - (σ_t'' / σ_t) α_t)

    and, as a v-prediction (x̂_0 = α_t x_t - σ_t v  <=>  v = (α_t x_t - x̂_0) / σ_t),

        ṽ = (α_t x_t - x̃_0) / σ_t

The denominators do not vanish: σ_t > 0 for every t > 0 the student visits, and
α_t'' / σ_t'' > α_t / σ_t because t'' < t (SNR falls with t). At t = T-1 (α_t = 0, x_t = ε)
this is x̃_0 = (x_t'' - σ_t'' ε) / α_t'' and ṽ = -x̃_0, well posed under zero terminal SNR.
The student minimises |v_student(x_t, t) - ṽ|² at its own timesteps t.
"""
from __future__ import annotations

from typing import Callable

import torch

from mirage.core import schedule
from mirage.core.config import ConfigError

TeacherFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> v, conditioning bound


def step_table(student_steps: int) -> torch.Tensor:
    """(N, 8) float64 rows [t, t', α_t, σ_t, α_t', σ_t', α_t'', σ_t''] per student step."""
    rows = schedule.ddim_coefficients(2 * student_steps)  # [t, α_t, σ_t, α_prev, σ_prev (η = 0), 0]
    return torch.tensor([[a[0], b[0], a[1], a[2], b[1], b[2], b[3], b[4]]
                         for a, b in zip(rows[0::2], rows[1::2])], dtype=torch.float64)


def distill_target(teacher: TeacherFn, x_t: torch.Tensor, index: torch.Tensor, student_steps: int) -> torch.Tensor:
    """ṽ for x_t (B, C, H, W) at student step index (B,) (timestep step_table(N)[index, 0])."""
    rows = step_table(student_steps).to(x_t.device)[index]  # (B, 8)
    t, t1 = rows[:, 0].long(), rows[:, 1].long()
    a, s, a1, s1, a2, s2 = (rows[:, j].float()[:, None, None, None] for j in range(2, 8))
    x = x_t.float()
    x1 = schedule.ddim_step(x, teacher(x_t, t).float(), a, s, a1, s1)
    x2 = schedule.ddim_step(x1, teacher(x1.to(x_t.dtype), t1).float(), a1, s1, a2, s2)
    x0 = (x2 - (s2 / s) * x) / (a2 - (s2 / s) * a)
    return (a * x - x0) / s


def check_teacher(teacher_meta: dict, student_steps: int, teacher_path: str) -> None:
    """A teacher that records its own step count (a student itself) must sample with 2N steps."""
    steps = teacher_meta.get("sampling_steps")
    if steps is not None and steps != 2 * student_steps:
        raise ConfigError(f"{teacher_path} samples with {steps} steps; progressive distillation halves the steps: "
                          f"use --student-steps {steps // 2}" if steps > 1 else
                          f"{teacher_path} already samples with 1 step; distil from a teacher with more steps")
