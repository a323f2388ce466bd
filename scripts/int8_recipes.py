"""Measure INT8 Q/DQ recipes on a checkpoint: what each costs against PyTorch fp32.

    python scripts/int8_recipes.py checkpoints/tiny-v2v --json int8.json [--only "recipe"]

Each recipe quantizes the fp32 graphs with ModelOpt options (calibrated on rollout inputs, as
mirage-export does), then reports the relative error of v and kv on held-out inputs, the PSNR
of a 50-frame ONNX Runtime rollout against the PyTorch rollout and, for video-to-video, the
task PSNR against the ground truth. The shipped recipe is the one in export/quantize.py.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import onnx

from mirage.core import graphs as G
from mirage.export.onnx_export import ExportOptions, export_graph, record_rollout_inputs
from mirage.export.parity import rollout_psnr, tensor_parity
from mirage.export.quantize import INT8_UNQUANTIZED_OPS, quantize_qdq, shipped_recipe
from mirage.train.checkpoint import load_checkpoint

# weight-name patterns (tiny's 3 levels: up.2 is the full-resolution decoder level)
SIM_TOP6 = r"model\.(in_conv|out\.2|up\.2\.res\.[01]\.skip|up\.2\.res\.0\.conv[12])\.weight"
RECIPES = {  # name -> (calibration frames, method, ModelOpt options or "shipped")
    "default (max)": (8, "max", {}),
    "entropy calibration": (8, "entropy", {}),
    "32 calibration frames": (32, "max", {}),
    "fp16: first/last conv, time MLP, attention MatMuls": (8, "max", {"nodes_to_exclude": [
        "^node_conv2d$", "^node_conv2d_34$", "^node_linear$", "^node_linear_1$", "^node_MatMul_.*"]}),
    "Conv only": (8, "max", {"op_types_to_quantize": ["Conv"]}),
    "no Add/Mul Q/DQ": (8, "max", {"op_types_to_exclude": list(INT8_UNQUANTIZED_OPS)}),
    "fp16: 6 most sensitive layers": (8, "max", {"weights_to_exclude": SIM_TOP6}),
    "fp16: 6 most sensitive layers, entropy": (8, "entropy", {"weights_to_exclude": SIM_TOP6}),
    "fp16: 6 most sensitive layers, Conv only": (8, "max", {"weights_to_exclude": SIM_TOP6,
                                                            "op_types_to_quantize": ["Conv"]}),
    "fp16: 6 most sensitive layers, no Add/Mul Q/DQ": (8, "max", {"weights_to_exclude": SIM_TOP6,
                                                                  "op_types_to_exclude": list(INT8_UNQUANTIZED_OPS)}),
    "shipped: fp16 in/out conv + full-res decoder level, no Add/Mul Q/DQ": (8, "max", "shipped"),
}


def _nodes_using(path: Path, pattern: str) -> list[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [f"^{re.escape(n.name)}$" for n in graph.node if any(re.fullmatch(pattern, i) for i in n.input)]


def _quantize(fp32: Path, out: Path, calibration: list[dict], method: str, options) -> None:
    if options == "shipped":
        options = shipped_recipe(fp32, "int8")
    options = dict(options)
    if "weights_to_exclude" in options:
        options["nodes_to_exclude"] = _nodes_using(fp32, options.pop("weights_to_exclude"))
    quantize_qdq(fp32, out, calibration, "int8", calibration_method=method, recipe=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--frames", type=int, default=50, help="rollout frames of the PSNR")
    parser.add_argument("--only", action="append", help="run only recipes whose name contains this (repeatable)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    model, _ = load_checkpoint(args.checkpoint)
    check = record_rollout_inputs(model, 3, seed=1)
    calibrations = {n: record_rollout_inputs(model, n, seed=0) for n in {f for f, _, _ in RECIPES.values()}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = {g: export_graph(model, g, tmp / G.onnx_file(g), ExportOptions("fp32", 1, None, decompose_attention=False))
                for g in G.GRAPHS}
        for i, (name, (frames, method, options)) in enumerate(RECIPES.items()):
            if args.only and not any(o in name for o in args.only):
                continue
            files = {g: tmp / f"{i}-{G.onnx_file(g)}" for g in G.GRAPHS}
            for g in G.GRAPHS:
                _quantize(fp32[g], files[g], calibrations[frames][g], method, options)
            tensors, rollout = tensor_parity(model, files, check), rollout_psnr(model, files, args.frames)
            qdq = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(files[G.DENOISE])).graph.node)
            row = {"recipe": name, "denoise_quantize_nodes": qdq, "v_rel": tensors[G.V]["rel"],
                   "kv_rel": tensors[G.KV]["rel"], "rollout_psnr_db": rollout["psnr_mean_db"],
                   "task_psnr_db": rollout.get("task_psnr_db"), "task_psnr_torch_db": rollout.get("task_psnr_torch_db")}
            rows.append(row)
            task = (f"  task {row['task_psnr_db']:.2f} dB ({row['task_psnr_db'] - row['task_psnr_torch_db']:+.2f})"
                    if row["task_psnr_db"] is not None else "")
            print(f"{name:<70} Q {qdq:3d}  v {row['v_rel']:.3f}  kv {row['kv_rel']:.3f}  "
                  f"rollout {row['rollout_psnr_db']:.1f} dB{task}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
