"""Options every command that runs a model shares (mirage-run, mirage-serve): one definition each."""
from __future__ import annotations

import functools
from typing import Callable

import click

from mirage.core.config import PIPELINE_BACKENDS


backend = click.option(
    "--backend", type=click.Choice(PIPELINE_BACKENDS), default="auto",
    help="auto: TensorRT for an artifact with engines on a GPU, else ONNX Runtime for an artifact, PyTorch for a "
         "checkpoint.")
fast = click.option(
    "--fast", is_flag=True,
    help="The fastest PyTorch path on a GPU (docs/PERF.md): float16, Inductor kernels over channels-last weights "
         "with freezing, the timestep-only work once per step, all in the frame's CUDA graph. Compiling takes a "
         "minute or two before the first frame.")


def group(name: str, *options: Callable) -> Callable:
    """Click options collected into one keyword argument: the command receives `name` = {option
    name: value} instead of one parameter per option, so a command with many options still has a
    short signature. `options` are click.option(...) decorators, listed in --help order."""
    names = [_param_name(option) for option in options]

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def collected(*args, **kwargs):
            kwargs[name] = {n: kwargs.pop(n) for n in names}
            return command(*args, **kwargs)

        for option in reversed(options):
            collected = option(collected)
        return collected

    return decorate


def _param_name(option: Callable) -> str:
    """The parameter name a click.option decorator gives its value."""
    def probe():
        pass

    option(probe)
    return probe.__click_params__[-1].name
