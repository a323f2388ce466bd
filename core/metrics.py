"""Frame-quality metrics in numpy (no torch): what the long-rollout report measures.

Frames are float arrays (T, H, W, C) in [-1, 1] (the runtime's layout). Per-frame metrics
return (T,) arrays; window statistics return floats.

- psnr, ssim            fidelity against ground truth (video-to-video); SSIM_DEFINITION says which SSIM
- latent_psnr           per latent frame against a reference rollout (exported graphs, FP8 matmuls)
- sharpness             mean |Laplacian|: falls when frames blur
- motion                mean |x_n - x_{n-1}|: falls when the video slows or freezes
- flicker               mean |x_{n+1} - 2 x_n + x_{n-1}|: temporal second difference; constant
                        motion of smooth content gives ~0, frame-to-frame jitter does not (edges of
                        moving shapes also contribute, so read it as a ratio to the data's)
- collapsed             per frame: its pixels vary less than COLLAPSE_STD (one flat colour)
- colour histograms     per channel, and their total-variation distance
- random-conv features  a fixed, seeded two-layer conv bank (no training, no download) and the
                        Fréchet distance between two sets of frames' features (FID's formula)
"""
from __future__ import annotations

import numpy as np

from mirage.core.report import psnr

COLLAPSE_STD = 0.03  # a frame whose pixels vary less than this (in [-1, 1] units) is one flat colour
HIST_BINS = 16


# SSIM (Wang et al. 2004), one definition: this numpy metric and mirage.model.ssim's torch loss
# both use these constants and mean over "valid" windows only (no padding at the borders)
SSIM_WINDOW, SSIM_SIGMA, SSIM_K = 11, 1.5, (0.01, 0.03)
SSIM_DEFINITION = ("SSIM: Gaussian window 11, sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2, mean over valid windows "
                   "(no border padding) = scikit-image structural_similarity(gaussian_weights=True, "
                   "use_sample_covariance=False) on frames mapped to [0, 1]")


def latent_psnr(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-frame PSNR (dB) of latent frames (F, C, h, w), the peak being the reference's peak-to-peak range
    (latents are not in [-1, 1])."""
    peak = float(ref.max() - ref.min())
    err = ((out.astype(np.float64) - ref.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(peak ** 2 / np.maximum(err, 1e-20))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian (float64) whose outer product is SSIM's window."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame SSIM (SSIM_DEFINITION) of (T, H, W, C) frames in [-1, 1], H and W >= SSIM_WINDOW."""
    a, b = (np.asarray(a, np.float64) + 1) / 2, (np.asarray(b, np.float64) + 1) / 2
    g, k = gaussian_window(), SSIM_WINDOW

    def blur(x: np.ndarray) -> np.ndarray:  # separable Gaussian over H and W, valid windows only
        h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
        x = sum(g[i] * x[:, i:i + h] for i in range(k))
        return sum(g[i] * x[:, :, i:i + w] for i in range(k))

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = SSIM_K[0] ** 2, SSIM_K[1] ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(axis=(1, 2, 3))


def sharpness(frames: np.ndarray) -> float:
    """Mean |4-neighbour Laplacian| over the interior pixels of (T, H, W, C) frames."""
    x = np.asarray(frames, np.float64)
    c = x[:, 1:-1, 1:-1]
    lap = x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:] - 4 * c
    return float(np.abs(lap).mean())


def motion(frames: np.ndarray) -> float:
    """Mean |x_n - x_{n-1}| (0 for a single frame)."""
    x = np.asarray(frames, np.float64)
    return float(np.abs(x[1:] - x[:-1]).mean()) if len(x) > 1 else 0.0


def flicker(frames: np.ndarray) -> float:
    """Mean |x_{n+1} - 2 x_n + x_{n-1}| (0 for fewer than three frames)."""
    x = np.asarray(frames, np.float64)
    return float(np.abs(x[2:] - 2 * x[1:-1] + x[:-2]).mean()) if len(x) > 2 else 0.0


def collapsed(frames: np.ndarray) -> np.ndarray:
    """(T,) bool: frames whose pixels vary less than COLLAPSE_STD (stuck on one colour)."""
    x = np.asarray(frames, np.float64)
    return x.reshape(len(x), -1).std(axis=1) < COLLAPSE_STD


def colour_histogram(frames: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
    """(C, bins) normalised histogram of each channel over [-1, 1]."""
    x = np.asarray(frames)
    hist = np.stack([np.histogram(x[..., c], bins=bins, range=(-1.0, 1.0))[0] for c in range(x.shape[-1])])
    return hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)


def histogram_distance(h1: np.ndarray, h2: np.ndarray) -> float:
    """Total-variation distance of two (C, bins) histograms, averaged over channels (0 = equal, 1 = disjoint)."""
    return float(0.5 * np.abs(h1 - h2).sum(axis=1).mean())


# -- feature-space distance -----------------------------------------------------------------------

class RandomConvFeatures:
    """A fixed random two-layer conv bank: (T, H, W, C) frames -> (T, 2 * (F1 + F2)) features.

    conv3x3(C -> F1) -> ReLU -> 2x2 mean pool -> conv3x3(F1 -> F2) -> ReLU; each layer's maps
    are summarised by their spatial mean and standard deviation. The weights are drawn from a
    seeded generator, so every run and machine computes the same features without training or
    downloading a network. It sees local colour, edge and texture statistics within a ~8-pixel
    receptive field (blur, noise, colour shifts, missing or extra edges); it does not see object
    identity, shape semantics, global layout or anything temporal (each frame on its own).
    Frames larger than `max_side` are first mean-pooled by a whole factor to at most that size
    (a 512x512 frame to 128x128): the float64 convolutions cost 16x less, so 500-frame reports at
    512x512 take minutes, not an hour; the receptive field then spans ~32 pixels of the frame.
    """

    max_side = 128

    def __init__(self, channels: int = 3, f1: int = 16, f2: int = 32, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.w1 = rng.standard_normal((3, 3, channels, f1)) / np.sqrt(9 * channels)  # He-like scale
        self.w2 = rng.standard_normal((3, 3, f1, f2)) / np.sqrt(9 * f1) * np.sqrt(2)

    @staticmethod
    def _conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        # (T, H, W, Cin) -> (T, H-2, W-2, Cout), valid 3x3
        win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))  # (T, H-2, W-2, Cin, 3, 3)
        return np.einsum("thwcij,ijco->thwo", win, w, optimize=True)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        x = np.asarray(frames, np.float64)
        k = -(-max(x.shape[1:3]) // self.max_side)  # ceil: the pooling factor
        if k > 1:
            t, h, w, c = x.shape
            x = x[:, :h // k * k, :w // k * k].reshape(t, h // k, k, w // k, k, c).mean(axis=(2, 4))
        h1 = np.maximum(self._conv(x, self.w1), 0)
        t, hh, ww, f = h1.shape
        pooled = h1[:, :hh // 2 * 2, :ww // 2 * 2].reshape(t, hh // 2, 2, ww // 2, 2, f).mean(axis=(2, 4))
        h2 = np.maximum(self._conv(pooled, self.w2), 0)
        return np.concatenate([h1.mean(axis=(1, 2)), h1.std(axis=(1, 2)),
                               h2.mean(axis=(1, 2)), h2.std(axis=(1, 2))], axis=1)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features."""
    f = np.asarray(features, np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.maximum(w, 0))) @ v.T


def frechet_distance(stats1: tuple[np.ndarray, np.ndarray], stats2: tuple[np.ndarray, np.ndarray]) -> float:
    """|μ1 - μ2|² + tr(Σ1 + Σ2 - 2 (Σ1^½ Σ2 Σ1^½)^½), the Fréchet distance of two Gaussians."""
    (mu1, c1), (mu2, c2) = stats1, stats2
    s1 = _sqrtm_psd(c1)
    cross = np.sqrt(np.maximum(np.linalg.eigvalsh(s1 @ c2 @ s1), 0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross)


__all__ = ["COLLAPSE_STD", "SSIM_DEFINITION", "RandomConvFeatures", "collapsed", "colour_histogram", "feature_stats", "flicker",
           "frechet_distance", "histogram_distance", "motion", "psnr", "sharpness", "ssim"]
