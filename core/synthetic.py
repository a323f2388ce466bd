"""Synthetic video made on the fly (numpy only): seeded clips of textured shapes moving, rotating
and bouncing over a gradient. Training data, parity and quality inputs, and `mirage-run --input
synthetic` all draw from it, so it lives in the torch-free bottom layer."""
from __future__ import annotations

import math

import numpy as np

from mirage.core.video_io import as_shape

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


def _box(center: float, reach: float, unit: int, size: int) -> slice:
    """The pixels (of `size` along the axis) whose centers lie within `reach` of `center` (both in frame units
    of `unit` pixels), one more each side."""
    return slice(max(0, int((center - reach) * unit) - 1), max(0, min(size, int((center + reach) * unit) + 2)))


class SyntheticVideo:
    """Clip `index` of a seeded, infinite family of synthetic videos, square (`image_size` a side) or (height,
    width). Lengths are in units of the shorter side, so shapes keep their size and speed whatever the aspect
    and bounce across the whole frame (a square clip is the one it always was)."""

    def __init__(self, image_size: int | tuple[int, int], seed: int = 0, min_shapes: int = 2, max_shapes: int = 4):
        (self.height, self.width), self.seed = as_shape(image_size), seed
        self.min_shapes, self.max_shapes = min_shapes, max_shapes
        self.unit = min(self.height, self.width)  # pixels per frame unit
        cy = (np.arange(self.height, dtype=np.float32) + 0.5) / self.unit
        cx = (np.arange(self.width, dtype=np.float32) + 0.5) / self.unit
        self.gy, self.gx = np.meshgrid(cy, cx, indexing="ij")  # (H, W) each, pixel centers in frame units

    def clip(self, index: int, length: int, start: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        t = np.arange(start, start + length, dtype=np.float32)
        phi, g0, g1 = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.45), rng.uniform(-0.25, 0.25)
        bg = g0 + g1 * ((self.gx - 0.5) * math.cos(phi) + (self.gy - 0.5) * math.sin(phi))
        frames = np.empty((length, self.height, self.width, 3), np.float32)  # (T, H, W, 3); shapes painted in float64
        frames[...] = bg[:, :, None]
        aa = self.unit  # 1-pixel antialiasing ramp
        xmax, ymax = self.width / self.unit, self.height / self.unit
        for _ in range(rng.integers(self.min_shapes, self.max_shapes + 1)):
            kind = int(rng.integers(len(PALETTE)))
            r = rng.uniform(0.1, 0.2)
            speed, heading = rng.uniform(0.01, 0.035), rng.uniform(0, 2 * np.pi)
            cx = _bounce(rng.uniform(r, xmax - r), speed * math.cos(heading), r, xmax - r, t)
            cy = _bounce(rng.uniform(r, ymax - r), speed * math.sin(heading), r, ymax - r, t)
            theta = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.12, 0.12) * t
            texture, freq = int(rng.integers(3)), rng.uniform(1.5, 3.0)
            color = PALETTE[kind] * rng.uniform(0.65, 1.0)
            cs, sn = np.cos(theta), np.sin(theta)
            reach = 1.5 * r + 3 * 0.5 / aa  # the shape's cover is 0 beyond (any kind, with the ramp)
            for i in range(length):  # inside the shape's box only: at 512x512 a frame took 31 ms over whole frames
                rows, cols = _box(cy[i], reach, self.unit, self.height), _box(cx[i], reach, self.unit, self.width)
                dx, dy = self.gx[rows, cols] - cx[i], self.gy[rows, cols] - cy[i]
                x, y = cs[i] * dx + sn[i] * dy, -sn[i] * dx + cs[i] * dy  # shape-local coordinates
                cover = np.clip(0.5 - _sdf(kind, x, y, r) * aa, 0.0, 1.0)[..., None]
                if texture == 1:  # stripes
                    shade = 0.7 + 0.3 * (np.sin(freq * math.pi * x / r) > 0)
                elif texture == 2:  # checker
                    shade = 0.7 + 0.3 * (np.sin(freq * math.pi * x / r) * np.sin(freq * math.pi * y / r) > 0)
                else:
                    shade = np.ones_like(x)
                box = frames[i, rows, cols]
                box[...] = box * (1 - cover) + color * shade[..., None] * cover
        frames *= 2
        frames -= 1
        return frames
