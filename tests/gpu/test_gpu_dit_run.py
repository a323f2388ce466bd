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


def video(embeds, **paths) -> tuple[np.ndarray, torch.Tensor]:
    """The video and the latents the decoder was given: the random TAEHV decoder saturates to about -1
    everywhere (pixel std 0.005 on the H100), so the DiT's paths are compared on its latents."""
    torch.manual_seed(0)  # the random DiT and TAEHV weights
    latents = []
    with DiTPipeline.open(DiTSpec("dit-tiny", sink=2), embeds, device="cuda", **paths) as pipe:
        decode = pipe.decoder.decode
        pipe.decoder.decode = lambda z: (latents.append(z.float().cpu()), decode(z))[1]
        pipe.reset(seed=1)  # graph / compile: warms up every span first
        frames = np.concatenate(list(pipe.blocks(BLOCKS)))
        assert pipe.describe()[1] > 0
    return frames, torch.cat(latents, dim=2)  # (1, C, T, h, w): the blocks' latent frames in order


@pytest.mark.gpu
@pytest.mark.parametrize("paths", [dict(graph=True), dict(compile=True, graph=False), dict(compile=True, graph=True)])
def test_warmed_up_paths_make_the_eager_video(embeds, paths):
    eager, eager_z = video(embeds, graph=False)
    other, other_z = video(embeds, **paths)
    assert eager.shape == other.shape == (1 + 4 * (2 * BLOCKS - 1), 128, 128, 3)
    assert eager_z.shape[2] == 2 * BLOCKS and eager_z.std() > 0.1
    # bfloat16: Inductor's fused kernels round differently from eager's; a graph replays eager's kernels
    assert (other_z - eager_z).abs().mean() < 0.05 * eager_z.std(), (other_z - eager_z).abs().mean()


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
