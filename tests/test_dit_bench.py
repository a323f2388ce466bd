"""The DiT benchmark driver runs on the CPU (dit-tiny, eager) and reports what the GPU run will report."""
from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import load_script

from mirage.core.config import get_dit_config


def load_driver():
    return load_script("bench_dit")


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


def test_bench_dit_decoders_window_split_and_profile_cpu(monkeypatch):
    """Each decoder's clip decodes every block (the Wan VAE count of video frames), its ready times add
    up to its intervals and fps; blocks are split at the full window; the profile sums its kinds."""
    from mirage.model import dit_bench, wan_decode

    monkeypatch.setattr(wan_decode, "WAN21_VAE", dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1))
    # 32x32 video (4x4 latents), a window of 4 latent frames: the second block of 2 is at a full window
    cfg = dataclasses.replace(get_dit_config("dit-tiny"), width=32, height=32, window_frames=4)
    report = dit_bench.run(cfg, ["eager"], 2, "cpu", decoders=("taehv", "wan-vae"), profile=True)
    [eager] = report["modes"]
    assert (eager["full_window_blocks"], eager["filling_blocks"]) == (1, 1)
    assert eager["full_window_median_ms"] == eager["blocks_ms"][1] and eager["filling_block_mean_ms"] == eager["blocks_ms"][0]
    assert [(d["decoder"], d["overlap"]) for d in eager["decoded"]] == [("taehv", False), ("wan-vae", False)]
    for d in eager["decoded"]:
        assert d["video_frames"] == eager["video_frames"] == 5 + 8
        assert d["first_frame_ms"] == d["ready_ms"][0] and d["ready_ms"][1] > d["ready_ms"][0]
        assert d["video_fps"] == 13 / (d["ready_ms"][-1] / 1e3)
        assert d["block_mean_ms"] == pytest.approx(d["ready_ms"][1] / 2)  # the intervals between ready blocks
        assert len(d["decode_ms"]) == 2 and 0 < d["decode_ms"][0] < d["ready_ms"][0]
        assert d["fps_vs_no_decoder"] == d["video_fps"] / eager["video_fps"]
    profile = eager["profile"]
    assert profile["span_frames"] == 4
    kinds = {r["kind"]: r for r in profile["by_kind"]}
    assert kinds["attention"]["calls"] > 0
    assert sum(r["ms"] for r in profile["by_kind"]) == pytest.approx(profile["kernel_ms_per_block"])
    assert "wan-vae" in dit_bench.table(report) and "kernels/block" in dit_bench.table(report)


def test_bench_dit_refuses_an_unknown_decoder(tmp_path, capsys):
    out = tmp_path / "dit.json"
    assert load_driver().main(["--config", "dit-tiny", "--device", "cpu", "--decoders", "vae", "--json", str(out)]) == 2
    assert not out.exists() and "decoders ['vae']: choose from taehv, wan-vae" in capsys.readouterr().err


@pytest.mark.parametrize("name, kind", [
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_7", "triton norm"),  # Wan's RMSNorm
    ("triton_per_fused_native_layer_norm_3", "triton norm"),
    ("triton_poi_fused_add_mul_5", "triton pointwise"),
    ("triton_red_fused_sum_2", "triton reduction"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64>>", "attention"),
    ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT", "gemm"),
    ("void at::native::elementwise_kernel<128, 2>", "eager pointwise"),
    ("some_kernel", "other"),
])
def test_kernel_kinds(name, kind):
    from mirage.core.kernel_profile import kernel_kind

    assert kernel_kind(name) == kind


def test_kernel_summary_shares_and_top():
    from mirage.core.kernel_profile import summarize

    s = summarize([("nvjet_a", 30.0), ("nvjet_a", 30.0), ("flash_fwd", 40.0)], "block", top=1)
    assert (s["kernels_per_block"], s["kernel_ms_per_block"]) == (3, 0.1)
    assert [(r["kind"], r["calls"], r["share"]) for r in s["by_kind"]] == [("gemm", 2, 0.6), ("attention", 1, 0.4)]
    assert s["top"] == [{"name": "nvjet_a", "calls": 2, "ms": 0.06, "share": 0.6}]


def test_wan21_vae_layout_is_diffusers_default():
    """The benchmark's random Wan VAE is the published Wan 2.1 one: diffusers' AutoencoderKLWan defaults
    (those of Wan2.1-T2V-1.3B-Diffusers/vae), and its default latents_mean / latents_std are kept."""
    import inspect

    from diffusers import AutoencoderKLWan

    from mirage.model.wan_decode import WAN21_VAE

    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLWan.__init__).parameters.items()}
    assert {k: defaults[k] for k in WAN21_VAE} == WAN21_VAE
    assert defaults["latents_mean"][:2] == [-0.7571, -0.7089] and defaults["patch_size"] is None


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


def test_bench_dit_refuses_the_wan_vae_under_a_pinned_attention(tmp_path, capsys):
    out = tmp_path / "dit.json"
    assert load_driver().main(["--config", "dit-tiny", "--device", "cpu", "--decoders", "wan-vae", "--attention", "flash",
                               "--json", str(out)]) == 2
    assert not out.exists() and "the Wan VAE with attention 'flash'" in capsys.readouterr().err
