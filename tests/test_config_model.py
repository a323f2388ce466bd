"""Configs, parameter counts, forward shapes and the context-memory contract of the U-Net."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mirage.core.config import (CONFIGS, ConfigError, ModelConfig, TrainConfig, check_same, from_json,
                                 get_config, to_json)
from mirage.model.unet import AttentionImpl, MirageUNet, TemporalAttention, parameter_count

# Stated ranges: tiny trains on a laptop; seed880m matches the roadmap baseline (~880M).
PARAM_RANGES = {
    "tiny": (1.3e6, 1.7e6),
    "small": (18e6, 25e6),
    "base": (90e6, 120e6),
    "seed880m": (850e6, 920e6),
    # latent configs: the same U-Nets on 4-channel latents (tiny-64 has two levels)
    "tiny-64": (0.8e6, 1.1e6),
    "tiny-128": (0.8e6, 1.1e6),
    "tiny-256": (1.3e6, 1.7e6),
    "small-256": (18e6, 25e6),
    "base-512": (90e6, 120e6),
    "seed880m-512": (850e6, 920e6),
}


def test_every_named_config_has_a_stated_range():
    assert set(CONFIGS) == set(PARAM_RANGES)


@pytest.mark.parametrize("task", ["generate", "v2v"])
@pytest.mark.parametrize("name", sorted(PARAM_RANGES))
def test_parameter_counts(name, task):
    cfg = get_config(name, task)
    assert cfg.cond_channels == (cfg.channels if task == "v2v" else 0)
    assert cfg.task == task
    with torch.device("meta"):
        model = MirageUNet(cfg)
    lo, hi = PARAM_RANGES[name]
    n = parameter_count(model)
    assert lo <= n <= hi, f"{name}/{task}: {n / 1e6:.2f}M parameters outside [{lo / 1e6}M, {hi / 1e6}M]"


def test_v2v_adds_exactly_the_conditioning_input_weights():
    # The only difference is in_conv taking C more input channels: C * 3 * 3 * base_channels weights.
    for name in CONFIGS:
        with torch.device("meta"):
            gen = parameter_count(MirageUNet(get_config(name, "generate")))
            v2v = parameter_count(MirageUNet(get_config(name, "v2v")))
        assert v2v - gen == CONFIGS[name].channels * 9 * CONFIGS[name].base_channels


def test_tiny_memory_layout():
    cfg = get_config("tiny")
    # 32x32 frames, levels 32/16/8; temporal layers at levels 1, 2 on the way down, middle, then up.
    assert cfg.level_sizes == (32, 16, 8)
    assert cfg.memory_layers == (256, 64, 64, 64, 256)
    assert cfg.memory_tokens == 704


def _inputs(cfg: ModelConfig, batch: int, real: bool = True):
    make = torch.randn if real else torch.empty
    s, k = cfg.image_size, cfg.context_frames
    x = make(batch, cfg.channels, s, s)
    cond = make(batch, cfg.channels, s, s) if cfg.cond_channels else None
    memory = make(batch, k, 2, cfg.memory_tokens, cfg.temporal_dim)
    ages = torch.zeros(batch, k, dtype=torch.long)
    t = torch.full((batch,), 500, dtype=torch.long)
    return x, t, cond, memory, ages


@pytest.mark.parametrize("task", ["generate", "v2v"])
def test_tiny_forward_shapes(task):
    torch.manual_seed(0)
    cfg = get_config("tiny", task)
    model = MirageUNet(cfg).eval()
    b = 2
    x, t, cond, memory, ages = _inputs(cfg, b)
    ages[:, :2] = torch.tensor([1, 2])
    with torch.no_grad():
        kv = model.context_encode(torch.randn(b, 3, 32, 32), torch.tensor([0, 100]))
        v = model.denoise(x, t, cond, memory, ages)
    assert kv.shape == (b, 2, cfg.memory_tokens, cfg.temporal_dim)
    assert v.shape == x.shape
    assert torch.isfinite(kv).all() and torch.isfinite(v).all()


@pytest.mark.parametrize("task", ["generate", "v2v"])
@pytest.mark.parametrize("name", ["small", "base", "seed880m"])
def test_large_forward_shapes_on_meta(name, task):
    cfg = get_config(name, task)
    b = 2
    with torch.device("meta"):
        model = MirageUNet(cfg)
        x, t, cond, memory, ages = _inputs(cfg, b, real=False)
        kv = model.context_encode(torch.empty(b, 3, cfg.image_size, cfg.image_size), t)
        v = model.denoise(x, t, cond, memory, ages)
    assert kv.shape == (b, 2, cfg.memory_tokens, cfg.temporal_dim)
    assert v.shape == (b, cfg.channels, cfg.image_size, cfg.image_size)
    assert v.device.type == "meta"


def test_get_config_unknown_name_lists_choices():
    with pytest.raises(ConfigError) as e:
        get_config("nope")
    msg = str(e.value)
    assert "nope" in msg
    for name in CONFIGS:
        assert name in msg


def test_get_config_unknown_task():
    with pytest.raises(ConfigError, match="bad"):
        get_config("tiny", task="bad")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"temporal_levels": (1, 3)}, "temporal_levels"),
    ({"attn_levels": (-1,)}, "attn_levels"),
    ({"image_size": 30}, "image_size=30"),
    ({"temporal_dim": 66}, "temporal_heads"),
    ({"cond_channels": 1}, "cond_channels"),
    ({"prediction": "eps"}, "prediction"),
    ({"base_channels": 36}, "norm_groups"),
    ({"head_dim": 20}, "head_dim=20"),
])
def test_invalid_model_config(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ModelConfig(**kwargs)


def test_invalid_train_config():
    with pytest.raises(ConfigError):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError):
        TrainConfig(steps=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_json_round_trip(name):
    for task in ("generate", "v2v"):
        cfg = get_config(name, task)
        assert from_json(ModelConfig, to_json(cfg)) == cfg
        # and through real JSON text, where tuples come back as lists
        assert from_json(ModelConfig, json.loads(json.dumps(to_json(cfg)))) == cfg
    tcfg = TrainConfig(steps=7, lr=3e-4)
    assert from_json(TrainConfig, json.loads(json.dumps(to_json(tcfg)))) == tcfg


def test_from_json_rejects_unknown_fields():
    data = to_json(get_config("tiny")) | {"flux_capacitor": 1}
    with pytest.raises(ConfigError, match="flux_capacitor"):
        from_json(ModelConfig, data)


def test_check_same_names_both_values():
    a = get_config("tiny")
    check_same(a, get_config("tiny"))  # equal configs pass
    b = dataclasses.replace(a, context_frames=6)
    with pytest.raises(ConfigError) as e:
        check_same(a, b)
    msg = str(e.value)
    assert "context_frames" in msg and "4" in msg and "6" in msg
    with pytest.raises(ConfigError) as e:
        check_same(get_config("tiny"), get_config("small"))
    assert "'tiny'" in str(e.value) and "'small'" in str(e.value)


def test_v2v_denoise_requires_cond():
    cfg = get_config("tiny", "v2v")
    model = MirageUNet(cfg).eval()
    x, t, _, memory, ages = _inputs(cfg, 1)
    with pytest.raises(ValueError, match="video-to-video"):
        model.denoise(x, t, None, memory, ages)


# ---- the context-memory contract: ages mask slots, slot order does not matter ----------------

@pytest.fixture(params=["trained", "random"])
def memory_model(request, gen_model, make_random_tiny):
    return gen_model if request.param == "trained" else make_random_tiny("generate", seed=1)


def _denoise(model, x, t, memory, ages):
    with torch.no_grad():
        return model.denoise(x, t, None, memory, ages)


def _seeded_inputs(cfg, batch: int, seed: int):
    """A seeded generator and, drawn from it in this order, x and a full random memory; t from _inputs."""
    g = torch.Generator().manual_seed(seed)
    x, t, _, memory, _ = _inputs(cfg, batch)
    return g, torch.randn(x.shape, generator=g), t, torch.randn(memory.shape, generator=g)


def test_temporal_out_projection_is_live(memory_model):
    # Guard for the tests below: memory must be able to influence the output at all.
    outs = [m.out.weight.abs().max().item() for m in memory_model.modules()
            if type(m).__name__ == "TemporalAttention"]
    assert len(outs) == 5 and min(outs) > 0


def test_empty_slots_are_masked(memory_model):
    cfg = memory_model.cfg
    g, x, t, mem_a = _seeded_inputs(cfg, 2, seed=0)
    mem_b = 3 * torch.randn(mem_a.shape, generator=g)
    ages = torch.zeros(2, cfg.context_frames, dtype=torch.long)
    out_a = _denoise(memory_model, x, t, mem_a, ages)
    out_b = _denoise(memory_model, x, t, mem_b, ages)
    assert torch.equal(out_a, out_b)
    # Also with some slots valid: changing only the empty ones changes nothing...
    ages = torch.tensor([[0, 2, 0, 1], [3, 0, 1, 2]])
    mem_c = mem_a.clone()
    mem_c[0, [0, 2]] = mem_b[0, [0, 2]]
    mem_c[1, 1] = mem_b[1, 1]
    assert torch.allclose(_denoise(memory_model, x, t, mem_a, ages), _denoise(memory_model, x, t, mem_c, ages),
                          atol=1e-6)


def test_valid_slot_changes_output(memory_model):
    cfg = memory_model.cfg
    g, x, t, mem_a = _seeded_inputs(cfg, 1, seed=1)
    ages = torch.tensor([[0, 0, 1, 0]])
    mem_b = mem_a.clone()
    mem_b[:, 2] = torch.randn(mem_b[:, 2].shape, generator=g)
    out_a = _denoise(memory_model, x, t, mem_a, ages)
    out_b = _denoise(memory_model, x, t, mem_b, ages)
    assert (out_a - out_b).abs().max().item() > 1e-3
    # ...and a valid memory differs from an empty one
    out_empty = _denoise(memory_model, x, t, mem_a, torch.zeros_like(ages))
    assert (out_a - out_empty).abs().max().item() > 1e-3


def test_slot_order_invariance(memory_model):
    cfg = memory_model.cfg
    _, x, t, memory = _seeded_inputs(cfg, 2, seed=2)
    ages = torch.tensor([[3, 0, 1, 2], [4, 2, 3, 1]])
    perm = torch.tensor([2, 0, 3, 1])
    out = _denoise(memory_model, x, t, memory, ages)
    out_perm = _denoise(memory_model, x, t, memory[:, perm], ages[:, perm])
    assert torch.allclose(out, out_perm, atol=1e-5)
    # ages carry the order: permuting the ages alone (same memory) is a different input
    out_ages = _denoise(memory_model, x, t, memory, ages[:, perm])
    assert (out - out_ages).abs().max().item() > 1e-4


# ---- interfaces fixed at construction: attention implementations, memory slices, time table ----

def test_attention_impl_rejects_unknown_names():
    with pytest.raises(ConfigError, match="spatial attention 'flash'"):
        AttentionImpl(spatial="flash")
    with pytest.raises(ConfigError, match="temporal attention 'cuda'"):
        AttentionImpl(temporal="cuda")


def test_with_attention_shares_weights_and_matches(make_random_tiny):
    model = make_random_tiny("generate", seed=3)
    cfg = model.cfg
    _, x, t, memory = _seeded_inputs(cfg, 2, seed=3)
    ages = torch.tensor([[3, 0, 1, 2], [4, 2, 3, 1]])
    ref = _denoise(model, x, t, memory, ages)
    decomposed = model.with_attention(AttentionImpl(spatial="decomposed"))
    op = model.with_attention(AttentionImpl(temporal="op"))
    assert decomposed.attention.spatial == "decomposed" and model.attention == AttentionImpl()
    assert decomposed.in_conv.weight.data_ptr() == model.in_conv.weight.data_ptr()  # shared, not copied
    assert not decomposed.training and all(m.use_op for m in op.modules() if isinstance(m, TemporalAttention))
    assert torch.allclose(_denoise(decomposed, x, t, memory, ages), ref, atol=1e-5)
    assert torch.equal(_denoise(op, x, t, memory, ages), ref)  # off CUDA the op runs the same function
    # converting the twin leaves the original alone
    decomposed.half()
    assert model.in_conv.weight.dtype == torch.float32


def test_each_temporal_layer_reads_its_own_memory_slice(make_random_tiny):
    model = make_random_tiny("generate", seed=4)
    cfg = model.cfg
    layers = [m for m in model.modules() if isinstance(m, TemporalAttention)]
    slices = [slice(m.start, m.stop) for m in layers]  # registration order: down, middle, up
    assert slices == list(model.memory_slices)
    assert [s.stop - s.start for s in slices] == list(cfg.memory_layers)
    assert slices[0].start == 0 and slices[-1].stop == cfg.memory_tokens
    seen = []
    for m in layers:  # the H*W of the features each layer sees is the width of its slice
        m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].shape[2] * args[0].shape[3])))
    _, x, t, memory = _seeded_inputs(cfg, 1, seed=4)
    _denoise(model, x, t, memory, torch.ones(1, cfg.context_frames, dtype=torch.long))
    assert sorted((m.stop - m.start, n) for m, n in seen) == sorted((n, n) for n in cfg.memory_layers)
    assert all(m.stop - m.start == n for m, n in seen)


@pytest.mark.parametrize("task", ["generate", "v2v"])
def test_time_table_matches_plain_denoise(make_random_tiny, task):
    model = make_random_tiny(task, seed=5)
    cfg = model.cfg
    x, _, cond, memory, ages = _inputs(cfg, 2)
    ages[:, :3] = torch.tensor([1, 3, 2])
    timesteps = torch.tensor([999.0, 749.0, 499.0, 249.0])
    table = model.time_table(timesteps)
    assert table.timesteps == (999.0, 749.0, 499.0, 249.0)
    assert len(table.shifts) == len(model.time_blocks) and table.shifts[0].shape[0] == 4
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            plain = model.denoise(x, t.repeat(2), cond, memory, ages)
            hoisted = model.denoise_shifted(x, table.step(i), cond, memory, ages)
            torch.testing.assert_close(hoisted, plain, rtol=1e-5, atol=1e-6)
        # a wrong step is a different input: the table is really used
        other = model.denoise_shifted(x, table.step(0), cond, memory, ages)
        assert (other - plain).abs().max().item() > 1e-3
