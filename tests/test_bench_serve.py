"""scripts/bench_serve.py for a DiT: the random checkpoint it serves (one mirage-serve --dit reads, bf16, with its
prompt and, switched on, a TAEHV), and how a block model's count is judged (FPS against the video rate, p99 in block
periods), end to end against the script's block stand-in server; CPU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_script
from safetensors import safe_open

from mirage.core.config import get_dit_config
from mirage.core.prompts import read_embeddings
from mirage.model.taehv import Taehv
from mirage.model.wan_checkpoint import load_dit, saved_dit_config
from mirage.model.wan_decode import load_taehv

SCRIPT = ROOT / "scripts" / "bench_serve.py"


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_serve")


def test_a_random_dit_is_a_checkpoint_trained_here_in_bf16_with_its_prompt_and_a_taehv(bench, tmp_path):
    cfg = get_dit_config("dit-tiny")
    ckpt, serve = bench.random_dit("dit-tiny", tmp_path, taehv=True, strength=0.4)
    with safe_open(f"{ckpt}/model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert saved_dit_config(ckpt) == cfg
    model, _ = load_dit(ckpt, cfg)  # what mirage-serve --dit dit-tiny CKPT opens
    assert sum(p.numel() for p in model.parameters()) == cfg.param_count()
    flags = dict(zip(serve[::2], serve[1::2]))
    assert flags.keys() == {"--dit", "--prompt-embeds", "--decoder", "--strength"} and flags["--strength"] == "0.4"
    assert read_embeddings(flags["--prompt-embeds"]).shape == (cfg.text_len, cfg.text_dim)
    assert isinstance(load_taehv(Path(flags["--decoder"])), Taehv)  # the published layout, its encoder included
    assert torch.get_default_dtype() == torch.float32  # built in bf16, the default put back


@pytest.mark.parametrize("config, taehv, given", [
    ("dit-tiny", False, {"--dit", "--prompt-embeds"}),  # generation, the latents' preview
    ("dit-tiny-taesd", True, {"--dit", "--prompt-embeds", "--strength"}),  # a per-frame autoencoder's v2v, no TAEHV
])
def test_video_to_video_only_where_the_model_has_an_encoder(bench, tmp_path, config, taehv, given):
    _, serve = bench.random_dit(config, tmp_path, taehv, 0.6)
    assert set(serve[::2]) == given and not (tmp_path / "taew2_1.pth").exists()


def _result(v2v: bool, rate: float | None, frames_in: int, replies: int) -> dict:
    return {"video_to_video": v2v, "video_rate": rate, "frames_in": frames_in, "replies_per_request": replies}


@pytest.mark.parametrize("result, fps, expect", [
    # wan-1.3b with TAEHV: blocks of 3 latent frames, 12 video frames at 16 FPS
    (_result(True, 16.0, 12, 1), 16, {"target_fps": 16.0, "block_ms": 750.0, "max_p99_ms": 1500.0}),
    (_result(True, 16.0, 12, 1), 30, {"target_fps": 16.0, "block_ms": 750.0, "max_p99_ms": 1500.0}),
    # wan-1.3b generating its latents' preview: 3 frames a request at 4 FPS, the same block period
    (_result(False, 4.0, 0, 3), 16, {"target_fps": 4.0, "block_ms": 750.0, "max_p99_ms": 1500.0}),
    (_result(True, None, 1, 1), 30, {"target_fps": 30, "block_ms": None, "max_p99_ms": 33.0}),  # a U-Net
])
def test_a_block_model_is_judged_at_its_video_rate_and_in_block_periods(bench, result, fps, expect):
    args = type("Args", (), {"fps": fps, "max_p99_ms": None})()
    assert bench.targets([result], args) == expect
    args.max_p99_ms = 900.0
    assert bench.targets([result], args)["max_p99_ms"] == 900.0


def test_the_table_and_report_of_a_block_model_say_streams_x_fps_and_p99_in_block_periods(bench, tmp_path,
                                                                                          monkeypatch, capsys):
    """Against the script's own block stand-in (blocks of 4 frames played at 16 FPS: 250 ms periods)."""
    out = tmp_path / "serve.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--null-step-ms", "20", "--null-block", "4", "--null-rate", "16",
                                      "--fps", "16", "--counts", "1", "--seconds", "1.5", "--warmup-s", "1",
                                      "--calibrate-steps", "0", "--json", str(out)])
    bench.main()
    report = json.loads(out.read_text())
    [row] = report["rows"]
    assert (row["block_ms"], row["max_p99_ms"], row["target_fps"]) == (250.0, 500.0, 16.0)
    assert row["p99_blocks"] == pytest.approx(row["p99_ms"] / 250.0) and row["answered"] > 0
    assert report["kept_up"] == (1 if bench.keeps_up(row) else 0)
    assert "block periods of 250 ms" in report["verdict"] and report["verdict"] in capsys.readouterr().out
