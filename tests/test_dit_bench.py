"""The DiT benchmark driver runs on the CPU (dit-tiny, eager) and reports what the GPU run will report."""
from __future__ import annotations

import json
import sys

from conftest import ROOT

from mirage.core.config import get_dit_config

SCRIPT = ROOT / "scripts" / "bench_dit.py"


def load_driver():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_dit
    finally:
        sys.path.pop(0)
    return bench_dit


def test_bench_dit_cpu_smoke(tmp_path, capsys):
    out = tmp_path / "dit.json"
    assert load_driver().main(["--config", "dit-tiny", "--device", "cpu", "--blocks", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    cfg = get_dit_config("dit-tiny")
    [eager] = report["modes"]
    assert eager["mode"] == "eager" and len(eager["blocks_ms"]) == 2
    assert eager["video_frames"] == 5 + 8  # Wan VAE: the first latent frame is one video frame, then 4 each
    assert eager["first_block_ms"] == eager["blocks_ms"][0] > 0
    assert eager["video_fps"] == 13 / (sum(eager["blocks_ms"]) / 1e3)
    assert report["floor"]["block_flops"] == [cfg.block_flops(0), cfg.block_flops(2)]
    assert report["floor"]["params"] == cfg.param_count()
    assert "eager" in capsys.readouterr().out


def test_bench_dit_refuses_graphs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "dit.json"
    assert load_driver().main(["--config", "dit-tiny", "--device", "cpu", "--modes", "graph", "--json", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "CUDA graphs need a CUDA device" in err


def test_bench_dit_fp8_rows_on_the_same_clip(tmp_path):
    out = tmp_path / "dit.json"
    assert load_driver().main(["--config", "dit-tiny", "--device", "cpu", "--blocks", "1", "--fp8", "dynamic",
                               "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    native, fp8 = report["modes"]
    assert (native["mode"], native["fp8"]) == ("eager", None) and (fp8["mode"], fp8["fp8"]) == ("eager", "dynamic")
    assert report["fp8"]["dynamic"]["layers"] == 40 and report["fp8"]["dynamic"]["activations"] == "per token, dynamic"
    assert native["max_abs_diff_vs_first_mode"] == 0 < fp8["max_abs_diff_vs_first_mode"] < 0.1


def test_bench_dit_refuses_an_unknown_fp8_mode(tmp_path, capsys):
    assert load_driver().main(["--config", "dit-tiny", "--device", "cpu", "--fp8", "e5m2",
                               "--json", str(tmp_path / "x.json")]) == 2
    assert "fp8 e5m2: choose from static, dynamic" in capsys.readouterr().err
