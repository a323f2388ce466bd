"""Synthetic video made on the fly (numpy only): seeded clips of textured shapes moving, rotating
and bouncing over a gradient. Training data, parity and quality inputs, and `mirage-run --input
synthetic` all draw from it, so it lives in the torch-free bottom layer."""
from __future__ import annotations

import math

import numpy as np

# RGB per shape class: circle, square, triangle, ring, cross, diamond.
PALETTE = np.array([[0.95, 0.25, 0.2], [0.2, 0.8, 0.3], [0.25, 0.4, 0.95],
                    [0.95, 0.8, 0.15], [0.85, 0.3, 0.85], [0.2, 0.85, 0.9]], dtype=np.float32)


def _sdf(kind: int, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (negative inside) of shape `kind` of radius r in shape-local coords."""
    if kind == 0:
        return np.hypot(x, y) - r
    if kind == 1:
        return np.maximum(abs(x), abs(y)) - 0.8 * r
    if kind == 2:  # equilateral triangle
        k = math.sqrt(3.0)
        return np.maximum(-y - 0.5 * r, (k * abs(x) + y) / 2 - 0.5 * r)
    if kind == 3:
        return abs(np.hypot(x, y) - 0.7 * r) - 0.3 * r
    if kind == 4:
        return np.minimum(np.maximum(abs(x) - r, abs(y) - 0.3 * r), np.maximum(abs(x) - 0.3 * r, abs(y) - r))
    return abs(x) + abs(y) - r


def _bounce(p0: float, v: float, lo: float, hi: float, t: np.ndarray) -> np.ndarray:
    """Position at times t of a point moving at speed v, reflecting off lo and hi (triangle wave)."""
    span = hi - lo
    u = np.mod(p0 - lo + v * t, 2 * span)
    return lo + np.where(u < span, u, 2 * span - u)


class SyntheticVideo:
    """Clip `index` of a seeded, infinite family of synthetic videos."""

    def __init__(self, image_size: int, seed: int = 0, min_shapes: int = 2, max_shapes: int = 4):
        self.size, self.seed = image_size, seed
        self.min_shapes, self.max_shapes = min_shapes, max_shapes
        c = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
        self.gy, self.gx = np.meshgrid(c, c, indexing="ij")  # (H, W) each, pixel centers in [0, 1]

    def clip(self, index: int, length: int, start: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        t = np.arange(start, start + length, dtype=np.float32)
        phi, g0, g1 = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.45), rng.uniform(-0.25, 0.25)
        bg = g0 + g1 * ((self.gx - 0.5) * math.cos(phi) + (self.gy - 0.5) * math.sin(phi))
        frames = np.repeat(np.repeat(bg[None, :, :, None], 3, axis=3), length, axis=0)  # (T, H, W, 3)
        aa = self.size  # 1-pixel antialiasing ramp
        for _ in range(rng.integers(self.min_shapes, self.max_shapes + 1)):
            kind = int(rng.integers(len(PALETTE)))
            r = rng.uniform(0.1, 0.2)
            speed, heading = rng.uniform(0.01, 0.035), rng.uniform(0, 2 * np.pi)
            cx = _bounce(rng.uniform(r, 1 - r), speed * math.cos(heading), r, 1 - r, t)
            cy = _bounce(rng.uniform(r, 1 - r), speed * math.sin(heading), r, 1 - r, t)
            theta = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.12, 0.12) * t
            texture, freq = int(rng.integers(3)), rng.uniform(1.5, 3.0)
            color = PALETTE[kind] * rng.uniform(0.65, 1.0)
            dx, dy = self.gx - cx[:, None, None], self.gy - cy[:, None, None]  # (T, H, W)
            cs, sn = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
            x, y = cs * dx + sn * dy, -sn * dx + cs * dy  # shape-local coordinates
            cover = np.clip(0.5 - _sdf(kind, x, y, r) * aa, 0.0, 1.0)[..., None]
            if texture == 1:  # stripes
                shade = 0.7 + 0.3 * (np.sin(freq * math.pi * x / r) > 0)
            elif texture == 2:  # checker
                shade = 0.7 + 0.3 * (np.sin(freq * math.pi * x / r) * np.sin(freq * math.pi * y / r) > 0)
            else:
                shade = np.ones_like(x)
            frames = frames * (1 - cover) + color * shade[..., None] * cover
        return (frames * 2 - 1).astype(np.float32)
