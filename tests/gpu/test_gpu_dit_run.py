"""`mirage-run --dit` on the GPU (dit-tiny, random weights, bfloat16): the warm-up that compiles and captures
before the first timed block leaves no trace in the video (graph / Inductor runs equal the eager one), and
the report has the GPU's name and peak memory. `python -m pytest tests/gpu/test_gpu_dit_run.py -m gpu`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mirage.cli.run import main
from mirage.model.dit_pipeline import DiTPipeline, DiTSpec

BLOCKS = 5  # dit-tiny's window of 6 frames is full from the third block: every span, then the ring turns


@pytest.fixture
def embeds(tmp_path):
    path = tmp_path / "prompt.safetensors"
    save_file({"prompt_embeds": torch.randn(5, 64, generator=torch.Generator().manual_seed(0))}, path)
    return path


def video(embeds, **paths) -> np.ndarray:
    torch.manual_seed(0)  # the random DiT and TAEHV weights
    with DiTPipeline.open(DiTSpec("dit-tiny", sink=2), embeds, device="cuda", **paths) as pipe:
        pipe.reset(seed=1)  # graph / compile: warms up every span first
        frames = np.concatenate(list(pipe.blocks(BLOCKS)))
        assert pipe.describe()[1] > 0
    return frames


@pytest.mark.gpu
@pytest.mark.parametrize("paths", [dict(graph=True), dict(compile=True, graph=False), dict(compile=True, graph=True)])
def test_warmed_up_paths_make_the_eager_video(embeds, paths):
    eager = video(embeds, graph=False)
    other = video(embeds, **paths)
    assert eager.shape == (1 + 4 * (2 * BLOCKS - 1), 128, 128, 3) and eager.std() > 0.01
    assert np.abs(other - eager).mean() < 2e-2


@pytest.mark.gpu
def test_mirage_run_dit_reports_the_gpu(tmp_path, embeds):
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["--dit", "dit-tiny", "--random-weights", "--prompt-embeds", str(embeds),
                                       "--device", "cuda", "--blocks", "3", "--output", str(tmp_path / "v.mp4"),
                                       "--json", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["cuda_graph"] is True and data["peak_gpu_mb"] > 0 and data["device"] != "cpu"
    assert data["written"] == 1 + 4 * (2 * 3 - 1) and data["setup_ms"] > 0
