"""The video DiT in the runtime: a DiT artifact (ONNX, dit-tiny at 64x64, random weights) run by Pipeline,
StreamPool and mirage-run through the family's unit of work (core.dit_step.BlockUnit), against the torch
reference (BlockStepper) and the PyTorch backend; CPU."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CKPT_GEN
from mirage.bridge.artifact import ArtifactOptions
from mirage.bridge.dit_artifact import build_dit_artifact, dit_model
from mirage.bridge.pipeline import from_dit_model, load_pipeline, open_dit_checkpoint
from mirage.core import graphs as G
from mirage.core.config import PipelineOptions, get_dit_config
from mirage.core.loop import normal
from mirage.core.video_io import to_uint8
from mirage.model.dit_cache import BlockStepper
from mirage.runtime.pipeline import Pipeline, PipelineError
from mirage.runtime.pool import StreamPool
from test_runtime import TORCH_BLOCKED

# 16 tokens per latent frame, blocks of 2 in a window of 6 with a 2-frame sink: the 4th block rolls the ring
CFG = dataclasses.replace(get_dit_config("dit-tiny"), width=64, height=64, sink_frames=2)
SEED = 0  # the random weights the artifacts are exported with (dit_model)


def _prompt(seed: int, length: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((length, CFG.text_dim)).astype(np.float32)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """{batch: folder} of fp32 ONNX artifacts (about 15 s each on 2 cores)."""
    root = tmp_path_factory.mktemp("dit-rt")
    for batch in (1, 2):
        build_dit_artifact(CFG, root / f"b{batch}", ArtifactOptions(precision="fp32", backend="onnx", batch=batch,
                                                                    parity_frames=4), seed=SEED)
    return {1: root / "b1", 2: root / "b2"}


def _reference(text: np.ndarray, seed: int, blocks: int, switch: tuple[int, np.ndarray] | None = None
               ) -> list[np.ndarray]:
    """One stream's clean blocks by the torch block stepper, with the runtime's counter-based noise (draw
    k·S + i of the row's seed is step i's noise of block k); `switch` (block, text): its prompt switched
    before that block (BlockStepper.recache)."""
    model, _ = dit_model(CFG, None, SEED)
    stepper = BlockStepper(model, batch=1)
    stepper.set_prompt(torch.from_numpy(text[None]))
    shape, s = (CFG.in_dim, CFG.block_frames, *CFG.latent_size), CFG.steps
    out = []
    for k in range(blocks):
        if switch is not None and k == switch[0]:
            stepper.recache(torch.from_numpy(switch[1][None]))
        noise = np.stack([normal(seed, k * s + i, int(np.prod(shape))).reshape(shape) for i in range(s)])
        out.append(stepper.step(torch.from_numpy(noise[:, None])).numpy()[0])
    return out


def _preview(x0: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) frames the runtime shows for a clean block (C, N, h, w): channels 0-2, 8x8 pixels each (the VAE stride)."""
    return np.clip(x0[:3], -1, 1).transpose(1, 2, 3, 0).repeat(8, 1).repeat(8, 2)


def test_rows_at_their_own_frames_equal_the_torch_block_stepper(artifacts):
    """Two rows on ONNX Runtime, each its own stream (its own seed, prompt and frame position: row 1 restarts
    after a block), equal BlockStepper's rollout of that stream while the cache fills, rolls past the sink
    and the row restarts; the frames are the clean latents' preview."""
    a, b = _prompt(1), _prompt(2, length=CFG.text_len)
    with Pipeline.load(artifacts[2], device="cpu", options=PipelineOptions(batch=2)) as pipe:
        assert (pipe.frames_per_step, pipe.frame_shape, pipe.steps) == (2, (64, 64, 3), 4)
        pipe.set_prompt(a)
        pipe.reset(5)  # row 0: seed 5, row 1: seed 6, both prompt a (the default)
        pipe.set_prompt(b, rows=[1])  # row 1's own prompt from its first block
        first = pipe.step_batch()
        pipe.reset_row(1, 11)  # a new stream in row 1: frame 0, the default prompt (a) again
        rows = [[first[0]], []]
        for _ in range(4):
            out = pipe.step_batch()
            rows[0].append(out[0])
            rows[1].append(out[1])
    assert first.shape == (2, 2, 64, 64, 3)
    ref_0, ref_1 = _reference(a, 5, 5), _reference(a, 11, 4)
    np.testing.assert_allclose(first[1], _preview(_reference(b, 6, 1)[0]), atol=2e-5, rtol=0)
    for got, ref in ((rows[0], ref_0), (rows[1], ref_1)):
        for frames, x0 in zip(got, ref):
            np.testing.assert_allclose(frames, _preview(x0), atol=2e-5, rtol=0)


def test_a_prompt_switch_re_caches_the_row_as_the_block_stepper_does(artifacts):
    """control(row, prompt) mid-stream, after the cache has rolled past its sink: the row's held frames are
    re-cached under the new prompt (LongLive) and its next blocks equal BlockStepper.recache's; the other
    row does not notice."""
    a, b = _prompt(1), _prompt(2, length=9)
    with Pipeline.load(artifacts[2], device="cpu", options=PipelineOptions(batch=2),
                       prompt_encoder={"b": b}.get) as pipe:
        pipe.set_prompt(a)
        pipe.reset(5)
        got = [pipe.step_batch() for _ in range(4)]  # frames 0-7: the ring (window 6, sink 2) has turned
        pipe.control(0, prompt="b")
        got += [pipe.step_batch() for _ in range(2)]
        pipe.reset(5)  # new videos start with the default prompt, not the one control gave a row
        np.testing.assert_array_equal(pipe.step_batch(), got[0])
    for row, ref in enumerate((_reference(a, 5, 6, switch=(4, b)), _reference(a, 6, 6))):
        for k, (frames, x0) in enumerate(zip([g[row] for g in got], ref)):
            np.testing.assert_allclose(frames, _preview(x0), atol=2e-5, rtol=0, err_msg=f"row {row}, block {k}")
    assert np.abs(_preview(_reference(a, 5, 5)[4]) - got[4][0]).max() > 1e-2  # the switch changed the video


def test_a_rows_video_does_not_depend_on_its_neighbour(artifacts):
    """A stream's frames are bit-identical whether the other slot is free, or busy with another seed and
    prompt (changed mid-stream through control), and held rows commit nothing."""
    encoder = {"b": _prompt(3), "c": _prompt(4, length=2)}.get
    with StreamPool(Pipeline.load(artifacts[2], device="cpu", options=PipelineOptions(batch=2),
                                  prompt_encoder=encoder)) as pool:
        assert (pool.frames_in, pool.video_rate, pool.controls) == (0, 4.0, {"prompt": True})
        a = pool.attach(seed=1)
        alone = [pool.step()[a] for _ in range(3)]
        pool.detach(a)
        a, b = pool.attach(seed=1), pool.attach(seed=2)
        pool.control(b, prompt="b")
        beside = []
        for n in range(3):
            out = pool.step()
            assert set(out) == {a, b} and out[b].shape == (2, 64, 64, 3)
            beside.append(out[a])
            if n == 0:
                pool.control(b, prompt="c")
    for f, g in zip(alone, beside):
        np.testing.assert_array_equal(f, g)
    assert not np.array_equal(alone[2], out[b])  # the check can fail: streams differ


def test_controls_are_refused_where_the_model_does_not_take_them(artifacts):
    with StreamPool(Pipeline.load(artifacts[2], device="cpu", options=PipelineOptions(batch=2))) as pool:
        slot = pool.attach(seed=0)
        assert pool.controls == {}  # no prompt encoder: no prompt box
        made = sum(b.nbytes for b in pool.pipeline.buf.all())
        assert pool.pipeline.unit.buffer_bytes() == made  # the memory estimate is what the runtime allocates
        with pytest.raises(PipelineError, match="no text encoder was given"):
            pool.control(slot, prompt="a cat")
        with pytest.raises(PipelineError, match="takes no strength"):
            pool.control(slot, strength=0.5)
        with pytest.raises(PipelineError, match="is not attached"):
            pool.control(1 - slot, prompt="a cat")
        with pytest.raises(PipelineError, match=r"takes \(L, 64\) with 1 <= L <= 16"):
            pool.pipeline.set_prompt(np.zeros((4, 32), np.float32))
    with StreamPool.open(CKPT_GEN, slots=1, device="cpu", load=load_pipeline) as unet:
        assert (unet.controls, unet.frames_in, unet.video_rate) == ({}, 0, 16)
        with pytest.raises(PipelineError, match="takes no prompt"):
            unet.control(unet.attach(0), prompt="a cat")


def test_mirage_run_on_a_dit_artifact_without_torch_equals_the_pytorch_backend(artifacts, tmp_path):
    """mirage-run on the ONNX artifact with torch unimportable writes each block's frames and the block
    report; they are the runtime's PyTorch backend's frames for the same weights, seed and prompt."""
    from safetensors.numpy import save_file

    embeds = tmp_path / "prompt.safetensors"
    save_file({"prompt_embeds": _prompt(7)}, str(embeds))
    out, report = tmp_path / "frames", tmp_path / "report.json"
    code = TORCH_BLOCKED + f"""
from mirage.cli.run import main
main([{str(artifacts[1])!r}, "--prompt-embeds", {str(embeds)!r}, "--frames", "5", "--seed", "3",
      "--output", {str(out)!r}, "--json", {str(report)!r}, "--device", "cpu"], standalone_mode=False)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    written = np.stack([np.asarray(Image.open(f)) for f in sorted(out.glob("*.png"))])[:, ::2, ::2]  # written 2x
    assert written.shape == (6, 64, 64, 3)  # 5 frames -> 3 whole blocks of 2
    r = json.loads(report.read_text())
    assert (r["backend"], r["blocks"], r["written"], r["steps"]) == ("ort", 3, 6, 4)
    assert r["first_frame_ms"] > 0 and r["block_p99_ms"] >= r["block_median_ms"] > 0
    assert r["frames_are"].startswith("latent preview")
    model, _ = dit_model(CFG, None, SEED)
    with from_dit_model(model, "cpu") as pipe:
        pipe.set_prompt(_prompt(7))
        pipe.reset(3)
        expected = to_uint8(np.concatenate([pipe.step() for _ in range(3)]))
    assert np.abs(written.astype(int) - expected).max() <= 1  # float32 ORT vs torch: a rounding step at most


def test_a_self_forcing_checkpoint_runs_in_the_runtime(tmp_path):
    """A generator checkpoint in Self-Forcing's layout ({"generator": "model." + WanModel keys}) opened into the
    runtime on the PyTorch backend makes the in-memory model's blocks; another layout's keys are refused."""
    model, _ = dit_model(CFG, None, SEED)
    path = tmp_path / "self_forcing.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    blocks = []
    for pipe in (open_dit_checkpoint(path, CFG, "cpu"), from_dit_model(model, "cpu")):
        with pipe:
            pipe.set_prompt(_prompt(1))
            pipe.reset(2)
            blocks.append([pipe.step() for _ in range(2)])
    np.testing.assert_array_equal(blocks[0], blocks[1])
    torch.save({"generator": {"model.not_a_wan_key": torch.zeros(1)}}, path)
    from mirage.core.errors import CheckpointError

    with pytest.raises(CheckpointError):
        open_dit_checkpoint(path, CFG, "cpu")


@pytest.mark.parametrize("args, message", [
    ([], "needs one of --prompt TEXT"),
    (["--prompt", "a cat"], "--prompt needs --text-encoder"),
    (["--prompt-embeds", "WIDE"], "takes (L, 64)"),
    (["--prompt-embeds", "WIDE", "--steps", "2"], "samples with its own 4 steps"),
])
def test_mirage_run_refuses_a_dit_artifact_s_bad_conditioning(artifacts, tmp_path, args, message):
    from click.testing import CliRunner
    from safetensors.numpy import save_file

    from mirage.cli.run import main

    wide = tmp_path / "wide.safetensors"
    save_file({"x": np.zeros((3, 4096), np.float32)}, str(wide))
    out = tmp_path / "out.gif"
    result = CliRunner().invoke(main, [str(artifacts[1]), "--output", str(out), "--device", "cpu",
                                       *[str(wide) if a == "WIDE" else a for a in args]])
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ")
    assert not out.exists()


class _CpuAsGpu:
    """GpuExecution's plumbing on CPU tensors (the PyTorch backend's ops): streams and events do nothing, a
    "graph" replays its body. What a CPU can check of the GPU path: the unit's host inputs staged per parity,
    the warm-up, between-unit writes (prompt, re-cache) and the row resets, against CpuExecution's blocks."""

    compute, copy_stream = "compute", "copy"

    def __init__(self):
        from mirage.model.torch_ops import TorchOps

        self.ops, self.captured = TorchOps("cpu"), 0
        self.event = lambda: type("Event", (), {"record": lambda e, s: None, "wait": lambda e, s: None,
                                                "synchronize": lambda e: None, "elapsed_time": lambda e, o: 0.0})()

    def zeros(self, shape, dtype):
        return torch.zeros(shape, dtype=getattr(torch, dtype))

    def pinned(self, like):
        return np.zeros(tuple(like.shape), np.uint8 if like.dtype == torch.uint8 else np.float32)

    def upload(self, dst, host):
        dst.copy_(torch.from_numpy(host))

    def download(self, host, src):
        host[...] = src.numpy()

    def copy(self, dst, src):
        dst.copy_(src)

    def warm_up(self, body, for_capture):
        body()

    def capture(self, body):
        self.captured += 1
        return type("Graph", (), {"replay": lambda g: body()})()

    def on_compute(self):
        return contextlib.nullcontext()

    def synchronize(self):
        pass

    def device_name(self):
        return "cpu as gpu"

    def memory_mb(self):
        return None, ""

    def close(self):
        pass


def test_the_gpu_execution_runs_the_cpu_s_blocks():
    """The same blocks through GpuExecution (on CPU tensors) as through CpuExecution, bit for bit: two
    rows at their own frames, a prompt switch with its re-cache, a row restarted; its warm-up leaves no
    trace."""
    from mirage.model.dit_backend import DiTTorchBackend

    model, _ = dit_model(CFG, None, SEED)
    specs = G.model_graphs(CFG, 2)

    def rollout(pipe):
        with pipe:
            pipe.set_prompt(_prompt(1))
            pipe.reset(3)
            out = [pipe.step_batch() for _ in range(4)]
            pipe.control(0, prompt="b")
            pipe.reset_row(1, 9)
            return out + [pipe.step_batch() for _ in range(2)]

    cpu = rollout(from_dit_model(model, "cpu", PipelineOptions(batch=2), prompt_encoder={"b": _prompt(2)}.get))
    backend = DiTTorchBackend(model, specs, "cpu")
    backend.device = "cuda:0"  # a GPU backend to the pipeline: GpuExecution, with the plumbing below
    gpu = _CpuAsGpu()
    pipe = Pipeline(backend, CFG, specs, PipelineOptions(batch=2), gpu, prompt_encoder={"b": _prompt(2)}.get)
    staged = rollout(pipe)
    assert gpu.captured == 2  # one graph per parity
    for n, (a, b) in enumerate(zip(cpu, staged)):
        np.testing.assert_array_equal(a, b, err_msg=f"block {n}")


def test_the_backends_bias_mask_attends_as_the_exported_boolean_mask():
    """The PyTorch backend's block graphs mask the rows not held with a bias broadcast over the queries
    (mirage.model.dit_graphs, mask_form "bias"); the exported graphs with a boolean mask. Same outputs, for a
    prefix of the window (a filling row) and for scattered rows (a re-cache after the ring turned)."""
    from mirage.model.dit_graphs import DiTGraph

    model, _ = dit_model(CFG, None, SEED)
    spec = G.model_graphs(CFG, 2)[G.DIT_STEP]
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(x.shape, generator=gen) for x in spec.inputs]
    names = [x.name for x in spec.inputs]
    t = CFG.tokens_per_frame
    inputs[names.index(G.SLOTS)] = torch.stack([torch.arange(4 * t, 6 * t), torch.arange(2 * t, 4 * t)]).int()
    valid = torch.zeros(2, CFG.window_frames * t)
    valid[0, :6 * t] = 1  # row 0: the whole window
    valid[1, :t] = valid[1, 2 * t:4 * t] = valid[1, 5 * t:] = 1  # row 1: scattered frames
    inputs[names.index(G.VALID)] = valid
    with torch.no_grad():
        got = DiTGraph(model, G.DIT_STEP, "bias")(*inputs)
        expected = DiTGraph(model, G.DIT_STEP, "bool")(*inputs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    valid[1, 5 * t:] = 0  # a row's attention does change with what it holds
    with torch.no_grad():
        assert not torch.allclose(DiTGraph(model, G.DIT_STEP, "bias")(*inputs)[0][1], got[0][1], atol=1e-4)


def test_the_compiled_backend_writes_the_cache_with_the_step_s_one_compilation():
    """DiTTorchBackend(compile_mode=...) (mirage-serve --fast on a DiT): the cache-write pass runs the step's
    compiled graph and returns its keys and values (the same as the eager cache write's), so the 30 layers of
    wan-1.3b compile once, not twice; the text graph stays eager. Inductor on the CPU here, as on a GPU."""
    from mirage.model.dit_backend import DiTTorchBackend
    from mirage.model.dit_graphs import DiTGraph

    model, _ = dit_model(CFG, None, SEED)
    specs = G.model_graphs(CFG, 2)
    spec = specs[G.DIT_CACHE_WRITE]
    gen = torch.Generator().manual_seed(0)
    inputs = {x.name: torch.randn(x.shape, generator=gen) for x in spec.inputs}
    t = CFG.tokens_per_frame
    inputs[G.SLOTS] = torch.stack([torch.arange(4 * t, 6 * t), torch.arange(2 * t, 4 * t)]).int()
    inputs[G.VALID] = torch.ones(2, CFG.window_frames * t)

    def cache_write(backend):
        out = {x.name: torch.empty(x.shape) for x in spec.outputs}
        backend.run(G.DIT_CACHE_WRITE, inputs, out)
        return out

    compiled = DiTTorchBackend(model, specs, "cpu", compile_mode="default")
    assert isinstance(compiled.graphs[G.DIT_TEXT], DiTGraph)  # eager
    assert not isinstance(compiled.graphs[G.DIT_STEP], DiTGraph)  # Inductor's
    torch._dynamo.reset()
    got = cache_write(compiled)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1
    step_out = {x.name: torch.empty(x.shape) for x in specs[G.DIT_STEP].outputs}
    compiled.run(G.DIT_STEP, inputs, step_out)  # the step itself: no second compilation
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    expected = cache_write(DiTTorchBackend(model, specs, "cpu"))
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step_out[name], value, atol=1e-4, rtol=1e-4)
