"""The progressive distillation chain (Salimans & Ho 2022: 4 -> 2 -> 1 DDIM steps): each stage is
one distillation run (train/distill.py) whose student teaches the next stage. `mirage-train
--distill-chain 4,2,1 --distill-from TEACHER --out DIR` runs the stages into DIR/s2, DIR/s1; each
stage resumes from its own folder, so a rerun continues where the chain stopped (a finished stage
says it has nothing left to train).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mirage.core.config import ConfigError
from mirage.core.schedule import default_steps
from mirage.train.checkpoint import read_meta


@dataclass(frozen=True)
class Stage:
    student_steps: int
    teacher: Path  # the first teacher, or the previous stage's student
    out: Path  # DIR/s<student_steps>


def parse_chain(text: str) -> list[int]:
    """'4,2,1' -> [4, 2, 1]: the teacher's step count, then each student's, each half the one before."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--distill-chain {text!r}: give step counts separated by commas, e.g. 4,2,1") from None
    if len(steps) < 2 or any(b < 1 or a != 2 * b for a, b in zip(steps, steps[1:])):
        raise ConfigError(f"--distill-chain {text}: each count must be half the one before it, down to 1 at the "
                          "least (e.g. 4,2,1 or 8,4,2)")
    return steps


def chain_stages(text: str, teacher: str | Path, out: str | Path) -> list[Stage]:
    """The stages of `text` from `teacher`, whose recorded (or default) step count must be the first."""
    steps, out = parse_chain(text), Path(out)
    sampling = default_steps(read_meta(teacher))
    if sampling != steps[0]:
        raise ConfigError(f"--distill-chain {text}: the teacher {teacher} samples with {sampling} steps, not "
                          f"{steps[0]}; start the chain at {sampling}")
    stages, previous = [], Path(teacher)
    for n in steps[1:]:
        stages.append(Stage(n, previous, out / f"s{n}"))
        previous = out / f"s{n}"
    return stages
