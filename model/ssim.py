"""SSIM and MS-SSIM (Wang et al. 2003/2004) in torch: a training loss and an evaluation metric.

Images in [0, data_range] (default [0, 1]). The SSIM of mirage.core.metrics (SSIM_DEFINITION: its
window and constants, valid windows only), differentiable; the same definition as scikit-image's
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
MS-SSIM takes the contrast-structure term at every scale and the luminance term at the last;
with fewer than 5 scales (small crops) the published weights are cut and renormalised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mirage.core.metrics import SSIM_K, SSIM_SIGMA, SSIM_WINDOW, gaussian_window

MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.from_numpy(gaussian_window(size, sigma)).to(like)
    return g.expand(channels, 1, 1, size)  # (C, 1, 1, k): one depthwise 1-D filter per channel


def _blur(x: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    x = F.conv2d(x, win, groups=c)  # along W
    return F.conv2d(x, win.transpose(2, 3), groups=c)  # along H


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, data_range: float, win: torch.Tensor):
    """Per-image luminance and contrast-structure terms, each (B, C) averaged over valid windows."""
    c1, c2 = (SSIM_K[0] * data_range) ** 2, (SSIM_K[1] * data_range) ** 2
    mx, my = _blur(x, win), _blur(y, win)
    vx = _blur(x * x, win) - mx * mx
    vy = _blur(y * y, win) - my * my
    cov = _blur(x * y, win) - mx * my
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    cs = (2 * cov + c2) / (vx + vy + c2)
    return lum, cs


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Mean SSIM per image: x, y (B, C, H, W) with H, W >= win_size -> (B,)."""
    win = _window(win_size, sigma, x.shape[1], x)
    lum, cs = _ssim_terms(x, y, data_range, win)
    return (lum * cs).mean(dim=(1, 2, 3))


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, scales: int | None = None,
            win_size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Multi-scale SSIM per image: (B, C, H, W) -> (B,); the smallest scale must still hold one window.
    scales=None takes as many as fit, at most 5 (256x256 and up get all five)."""
    if scales is None:
        scales = max(1, min(5, (min(x.shape[-2:]) // win_size).bit_length()))
    smallest = min(x.shape[-2:]) >> (scales - 1)
    if smallest < win_size:
        raise ValueError(f"ms_ssim: {tuple(x.shape[-2:])} frames are too small for {scales} scales "
                         f"(smallest would be {smallest} < window {win_size})")
    weights = torch.tensor(MS_WEIGHTS[:scales], dtype=x.dtype, device=x.device)
    weights = weights / weights.sum()
    win = _window(win_size, sigma, x.shape[1], x)
    factors = []
    for s in range(scales):
        lum, cs = _ssim_terms(x, y, data_range, win)
        last = s == scales - 1
        # relu: a negative contrast-structure mean raised to a fractional power is undefined
        factors.append(torch.relu((lum * cs if last else cs).mean(dim=(1, 2, 3))))
        if not last:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.prod(torch.stack(factors, dim=1) ** weights, dim=1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image: (B, C, H, W) -> (B,)."""
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))
