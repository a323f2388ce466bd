"""Latent decoders for the Wan 2.1 DiT, from local files: the Wan VAE (diffusers' AutoencoderKLWan) or TAEHV.

Both take a block of latent frames as the DiT gives them, (B, 16, T, h, w) (Wan's latents normalised
per channel by the VAE's latents_mean / latents_std, as Self-Forcing's `WanVAEWrapper` does), and
return video frames (B, T', 3, 8h, 8w) in [-1, 1]. Both are streaming: `decode` continues the video
decoded since `reset`, so a video decoded block by block equals it decoded at once, and T latent
frames give 1 + 4 (T - 1) video frames (the first latent frame gives one).

    load_decoder(path): a file (.pth / .safetensors) is TAEHV (`taew2_1.pth`); a folder is the Wan VAE
    (a diffusers AutoencoderKLWan folder, or a diffusers pipeline folder with its vae/ subfolder).

A TAEHV file with its encoder (the published one has it) also encodes, which video-to-video needs; the
Wan VAE here only decodes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mirage.model.taehv import Taehv, TaehvDecoder, TGrow
from mirage.model.weights import CheckpointError, Entry, as_entries, check_shapes, copy_into, is_flat_state, \
    open_weights

VAE_CLASS = "AutoencoderKLWan"
WAN_OWN_VAE_KEY = "decoder.middle.0.residual.0.gamma"  # Wan2.1_VAE.pth (diffusers detects that file by this key)
# The Wan 2.1 VAE's layout: Wan's own `_video_vae` (wan/modules/vae.py: dim 96, z_dim 16, dim_mult [1, 2, 4, 4],
# 2 res blocks, no attention scales, temporal downsampling [False, True, True]), which is also diffusers'
# AutoencoderKLWan default and Wan2.1-T2V-1.3B-Diffusers/vae/config.json; latents_mean / latents_std are
# diffusers' defaults, the published ones (a test checks these against diffusers' defaults)
WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)


class WanVaeDecoder:
    """diffusers' AutoencoderKLWan decoder, run one latent frame at a time with its causal-conv cache kept
    across blocks (its own `decode` clears that cache on every call, which would restart the video).

    This drives the loop of AutoencoderKLWan._decode (its `_feat_map` / `_conv_idx` cache and the decoder's
    `first_chunk` argument; diffusers 0.42). The tests compare it with diffusers' own `decode` of the whole
    clip, so a diffusers that changes those internals fails a test instead of decoding wrongly."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        self.mean = torch.tensor(vae.config.latents_mean).view(shape)
        self.std = torch.tensor(vae.config.latents_std).view(shape)
        self.reset()

    def to(self, device, dtype) -> "WanVaeDecoder":
        self.vae.to(device, dtype)
        return self

    def reset(self) -> None:
        self.vae.clear_cache()
        self._first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype)
        z = z * self.std.to(z) + self.mean.to(z)
        x = self.vae.post_quant_conv(z)  # a 1x1x1 conv: frame by frame already
        out = []
        for i in range(x.shape[2]):
            self.vae._conv_idx = [0]
            out.append(self.vae.decoder(x[:, :, i:i + 1], feat_cache=self.vae._feat_map,
                                        feat_idx=self.vae._conv_idx, first_chunk=self._first))
            self._first = False
        return torch.cat(out, 2).clamp(-1, 1).transpose(1, 2)


def _vae_class():
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as e:
        raise CheckpointError("the Wan VAE needs diffusers: pip install -e '.[wan]'") from e
    return AutoencoderKLWan


def random_wan_vae(**overrides) -> WanVaeDecoder:
    """The Wan 2.1 VAE with random weights (benchmarks: speed does not depend on the values); `overrides`
    change its config (tests: a tiny one)."""
    return WanVaeDecoder(_vae_class()(**{**WAN21_VAE, **overrides}))


def load_wan_vae(folder: Path) -> WanVaeDecoder:
    if (folder / "vae").is_dir():
        folder = folder / "vae"
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: not a diffusers VAE folder (config.json: {e})") from e
    if config.get("_class_name") != VAE_CLASS:
        raise CheckpointError(f"{folder}: config.json is a {config.get('_class_name')!r}, not an {VAE_CLASS} (Wan VAE)")
    if config.get("patch_size") is not None or config.get("z_dim", 16) != 16:
        raise CheckpointError(f"{folder}: a Wan 2.2 VAE (patch_size / z_dim 48); Wan 2.1 models need the "
                              f"16-channel VAE")
    try:
        vae = _vae_class().from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot load the Wan VAE ({str(e).splitlines()[0]})") from e
    return WanVaeDecoder(vae)


def load_taehv(path: Path) -> TaehvDecoder:
    """A TAEHV weights file (taew2_1.pth / .safetensors), checked by name and shape: with `encoder.*` entries a
    Taehv that also encodes (video-to-video), without them a decoder only."""
    raw = open_weights(path)
    if not is_flat_state(raw):
        raise CheckpointError(f"{path}: not a TAEHV weights file (expected a flat dict of tensors)")
    if WAN_OWN_VAE_KEY in raw:
        raise CheckpointError(f"{path}: the Wan VAE in Wan's own layout (Wan2.1_VAE.pth); give its diffusers folder "
                              f"(Wan2.1-T2V-1.3B-Diffusers/vae) or a TAEHV file")
    entries = as_entries(raw)
    decoder = Taehv() if any(k.startswith("encoder.") for k in entries) else TaehvDecoder()
    for i, layer in enumerate(decoder.decoder):
        name = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and name in entries:
            entries[name] = _last_steps(entries[name], layer.conv.weight.shape[0])
    check_shapes({k: e.shape for k, e in entries.items()},
                 {k: tuple(v.shape) for k, v in decoder.state_dict().items()}, f"{path} (TAEHV)")
    copy_into(decoder, entries)
    return decoder.eval().requires_grad_(False)


def _last_steps(entry: Entry, channels: int) -> Entry:
    """A TGrow conv saved for more time steps than the decoder upsamples: keep the last `channels` outputs
    (taehv.py's patch_tgrow_layers); any other shape is left for check_shapes to name."""
    if entry.shape[0] <= channels or entry.shape[0] % channels:
        return entry
    return Entry((channels, *entry.shape[1:]), lambda: entry.load()[-channels:])


def load_decoder(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A streaming latent decoder (`reset()`, `decode(latents)`) from a local file (TAEHV) or folder (Wan VAE),
    checked on the CPU, then moved to `device` in `dtype`."""
    path = Path(path)
    if path.is_dir():
        return load_wan_vae(path).to(device, dtype)
    if not path.exists():
        raise CheckpointError(f"{path}: decoder not found (a TAEHV file such as taew2_1.pth, or a Wan VAE folder)")
    return load_taehv(path).to(device, dtype)
