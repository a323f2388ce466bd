"""The DiT is the published Wan 2.1 layout: its names are WanModel's (diffusers' own converter maps them onto
WanTransformer3DModel), and with the same weights its full forward equals diffusers' (float32, CPU)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mirage.core.config import ConfigError, DiTConfig, get_dit_config
from mirage.model.dit import PromptError, WanDiT
from mirage.model.wan_keys import WanKeyError, diffusers_to_wan, wan_to_diffusers

CFG = dataclasses.replace(get_dit_config("dit-tiny"), num_layers=2, width=192)  # a 12x8 token grid: h and w differ


def randomized(cfg: DiTConfig, seed: int = 0) -> WanDiT:
    """Every parameter random (norm weights and biases too), so a misplaced one changes the output."""
    torch.manual_seed(seed)
    model = WanDiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.3))
    return model


def diffusers_twin(cfg: DiTConfig):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps).eval()


def test_names_are_wan_models_as_diffusers_converts_them():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ours = WanDiT(CFG).state_dict()
    converted = convert_wan_transformer_to_diffusers({k: torch.zeros(1) for k in ours})
    assert sorted(converted) == sorted(wan_to_diffusers(k) for k in ours)
    assert set(converted) == set(diffusers_twin(CFG).state_dict())
    assert all(diffusers_to_wan(wan_to_diffusers(k)) == k for k in ours)
    assert wan_to_diffusers("blocks.7.norm3.weight") == "blocks.7.norm2.weight"
    assert wan_to_diffusers("head.modulation") == "scale_shift_table"
    assert wan_to_diffusers("blocks.0.modulation") == "blocks.0.scale_shift_table"
    for bad in ("blocks.0.self_attn.qkv.weight", "model.patch_embedding.weight", "head.norm.weight"):
        with pytest.raises(WanKeyError, match="not a parameter"):
            wan_to_diffusers(bad)


def test_wan_13b_shapes_are_the_published_ones():
    """Shapes of wan-1.3b without allocating it (meta device): the 1.3B checkpoint's."""
    with torch.device("meta"):
        model = WanDiT(get_dit_config("wan-1.3b"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["patch_embedding.weight"] == (1536, 16, 1, 2, 2)
    assert shapes["text_embedding.0.weight"] == (1536, 4096)
    assert shapes["time_embedding.0.weight"] == (1536, 256)
    assert shapes["time_projection.1.weight"] == (9216, 1536)
    assert shapes["blocks.29.ffn.0.weight"] == (8960, 1536)
    assert shapes["blocks.29.modulation"] == (1, 6, 1536)
    assert shapes["head.head.weight"] == (64, 1536)
    assert len([k for k in shapes if k.startswith("blocks.0.")]) == 27  # modulation, 2 x (q,k,v,o + norm_q,k), norm3, ffn
    assert sum(v.numel() for v in model.state_dict().values()) == get_dit_config("wan-1.3b").param_count()


def test_full_forward_equals_diffusers():
    ours = randomized(CFG)
    theirs = diffusers_twin(CFG)
    theirs.load_state_dict({wan_to_diffusers(k): v for k, v in ours.state_dict().items()}, strict=True)
    gen = torch.Generator().manual_seed(1)
    frames = 3
    x = torch.randn(2, CFG.in_dim, frames, *CFG.latent_size, generator=gen)
    text = torch.randn(2, CFG.text_len, CFG.text_dim, generator=gen)
    t = torch.tensor([[999.0, 500.0, 3.0], [250.0, 250.0, 625.0]])  # per-frame timesteps
    with torch.no_grad():
        mine = ours(x, t, text)
        ref = theirs(x, t.repeat_interleave(CFG.tokens_per_frame, 1), text, return_dict=False)[0]
    assert mine.shape == ref.shape == x.shape
    assert ref.abs().mean() > 0.1
    assert (mine - ref).abs().max() < 1e-4


@pytest.mark.parametrize("change, message", [
    (dict(width=130), "width=130 is not divisible by 16"),
    (dict(height=100), "height=100 is not divisible by 16"),
    (dict(window_frames=1), "window_frames=1 is smaller than the sink \\(0\\) plus a block \\(2\\)"),
    (dict(sink_frames=5), "window_frames=6 is smaller than the sink \\(5\\)"),
    (dict(num_heads=5), "even head width"),
    (dict(patch_size=(2, 2, 2)), "one latent frame per token"),
    (dict(denoising_steps=(250, 500)), "falling list"),
    (dict(context_timestep=1000), "in \\[0, 999\\]"),
])
def test_config_rejects_with_one_line(change, message):
    with pytest.raises(ConfigError, match=message) as err:
        dataclasses.replace(get_dit_config("dit-tiny"), **change)
    assert "\n" not in str(err.value)


def test_config_accounting():
    wan = get_dit_config("wan-1.3b")
    assert wan.latent_size == (60, 104) and wan.tokens_per_frame == 1560 and wan.rope_dims == (44, 42, 42)
    assert wan.param_count() == 1_418_996_800
    assert get_dit_config("wan-1.3b-longlive").cache_frames == 9 and wan.cache_frames == 18
    assert [wan.past_frames(b) for b in range(8)] == [0, 3, 6, 9, 12, 15, 18, 18]
    assert wan.video_frames(3, first=True) == 9 and wan.video_frames(3, first=False) == 12
    assert sum(wan.video_frames(3, first=b == 0) for b in range(7)) == 81  # Self-Forcing's 81-frame clip
    # A block at a full 21-frame window: 4 + 1 passes of 4680 queries over 28080 keys, ~202 TFLOP
    assert 2.0e14 < wan.block_flops(18) < 2.05e14
    lq, lk, d = 3 * 1560, 21 * 1560, 1536
    assert wan.pass_flops(3, 18) - wan.pass_flops(3, 17) == 30 * 4 * lq * 1560 * d  # attention term
    assert wan.attention_flops(3, 18) == 30 * 4 * lq * d * (lk + 512)  # QKᵀ and PV, self and cross
    with pytest.raises(ConfigError, match="unknown DiT config"):
        get_dit_config("wan-14b")
    assert lk > lq


@pytest.mark.parametrize("shape", [(1, 16, 65), (1, 17, 64), (16, 64)])
def test_prompt_embeddings_of_another_shape_are_refused(shape):
    with pytest.raises(PromptError, match=r"dit-tiny takes \(batch, tokens <= 16, 64\)"):
        WanDiT(CFG).text_kv(torch.zeros(shape))
