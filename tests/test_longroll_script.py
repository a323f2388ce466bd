"""scripts/train_longroll_gpu.sh, the GPU driver of issue 18, in its CPU smoke mode: each of its
knobs reaches the run it names, and only checkpoints that exist are packed (the device tool brings
back at most 8 files, so an empty tar costs a result)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

from conftest import ROOT


def test_dmd_sweep_of_another_configs_generator(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, DEVICE="cpu", STEPS="2", BATCH="2", FRAMES="6",
               WINDOW="3", STREAMS="1", WORKERS="0", PARTS="dmd", GEN_CONFIG="tiny", TEACHER_STEPS="2",
               DMD_REGRESSIONS="0 4", DMD_CONTROL="0", DMD_FAKE_UPDATES="1", TRAIN_ARGS="--seed 3",
               QUALITY_ARGS="--seed 5", OMP_NUM_THREADS="1")
    subprocess.run(["bash", "scripts/train_longroll_gpu.sh"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)

    assert sorted(p.name for p in out.glob("*.tar")) == ["ckpt-gen-dmd.tar"]  # no empty tars
    with tarfile.open(out / "ckpt-gen-dmd.tar") as tar:
        assert sorted(tar.getnames()) == [f"gen-dmd-sf-r{r}/{f}" for r in (0, 4)
                                          for f in ("config.json", "model.safetensors")]
        train = {r: json.load(tar.extractfile(f"gen-dmd-sf-r{r}/config.json"))["train"] for r in (0, 4)}
    for r, cfg in train.items():
        assert cfg["dmd_regression"] == r
        assert cfg["dmd_from"].endswith("/gen-t")  # GEN_CONFIG's generator, trained first, not checkpoints/tiny
        assert cfg["self_forcing_prob"] == 1.0 and cfg["seed"] == 3
    with tarfile.open(out / "reports.tar.gz") as tar:
        names = tar.getnames()
        assert {"q-gen-base.json", "q-gen-dmd-sf-r0.json", "q-gen-dmd-sf-r4.json"} <= set(names)
        assert "gen-t.log" in names
        report = json.load(tar.extractfile("q-gen-dmd-sf-r4.json"))
    assert report["seed"] == 5 and report["frames"] == 6


def test_students_are_the_package_distillation_chain(tmp_path):
    """PARTS=v2v: the script's students are `mirage-train --distill-chain 4,2,1` (v2v/s2 from the
    teacher, v2v/s1 from s2), packed and scored under their names."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, DEVICE="cpu", STEPS="1", BATCH="1", FRAMES="3",
               WINDOW="3", STREAMS="1", WORKERS="0", PARTS="v2v", OMP_NUM_THREADS="1")
    subprocess.run(["bash", "scripts/train_longroll_gpu.sh"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    with tarfile.open(out / "ckpt-v2v.tar") as tar:
        assert sorted(tar.getnames()) == [f"v2v/s{n}/{f}" for n in (1, 2) for f in ("config.json", "model.safetensors")]
        meta = {n: json.load(tar.extractfile(f"v2v/s{n}/config.json")) for n in (1, 2)}
    assert meta[2]["train"]["distill_from"] == "checkpoints/tiny-v2v" and meta[2]["sampling_steps"] == 2
    assert meta[1]["train"]["distill_from"].endswith("/v2v/s2") and meta[1]["sampling_steps"] == 1
    with tarfile.open(out / "reports.tar.gz") as tar:
        reports = {n: json.load(tar.extractfile(f"q-v2v-{n}.json")) for n in ("t4", "t2", "t1", "s2", "s1")}
    assert [reports[n]["steps"] for n in ("t4", "t2", "t1", "s2", "s1")] == [4, 2, 1, 2, 1]


def test_blur_and_noise_move_the_data_on_the_sharpness_motion_plane(tmp_path):
    """scripts/quality_blur_noise.py: the clean data scores 1.0; blur lowers sharpness faster than
    motion (the ratio motion / sharpness grows with sigma); independent noise raises both."""
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, "scripts/quality_blur_noise.py", "--size", "16", "--frames", "6", "--json", str(out)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, timeout=300)
    rows = {(r["sigma"], r["noise"]): r for r in json.loads(out.read_text())["rows"]}
    clean = rows[0.0, 0.0]
    assert clean["sharpness_ratio"] == clean["motion_ratio"] == clean["flicker_ratio"] == 1.0
    blurred = [rows[s, 0.0] for s in (0.5, 0.9, 1.2)]
    assert [r["sharpness_ratio"] for r in blurred] == sorted((r["sharpness_ratio"] for r in blurred), reverse=True)
    ratio = [r["motion_ratio"] / r["sharpness_ratio"] for r in blurred]
    assert 1 < ratio[0] < ratio[1] < ratio[2]
    assert rows[0.0, 0.04]["sharpness_ratio"] > 1 and rows[0.0, 0.04]["motion_ratio"] > 1
