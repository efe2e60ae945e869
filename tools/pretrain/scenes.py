"""Formula-driven pretraining images: scenes of geometric objects over procedural textures.

Every image is a textured background (one of `TEXTURES`) with 1 to `max_objects` filled objects, each one
of `SHAPES` at a random position, size, rotation and colour; the largest one, the *main* object, is
drawn last. Each image carries what a vision backbone should be able to read from it: the main object's
shape, where it is, how large and how rotated; how many objects there are; which texture lies behind.
Each pixel is labelled too, with the texture or the shape that covers it. The pretraining task predicts all
of them (see `tools.pretrain.run`).

Nothing here is shared with the built-in evaluation suite (`peftvision.data.builtin`): its shapes
(squares, ellipses, hearts, wedges, teardrops, spheres, cubes), glyphs, photos and land-cover or tissue
generators appear nowhere in these scenes, and no code is imported from it.

Everything is numpy and deterministic: batch `i` of a `SceneTask` is a pure function of
(config, seed, i), whichever process renders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

NUM_POSE = 5  # x, y (in [-1, 1]), log-size (standardised), cos and sin of the symmetry-reduced rotation

Inside = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (u, v) in the object's frame -> bool mask


def _polygon(n: int) -> Inside:
    """Regular n-gon with circumradius 1."""
    half = np.pi / n
    return lambda u, v: np.hypot(u, v) * np.cos((np.arctan2(v, u) % (2 * half)) - half) <= np.cos(half)


def _star(n: int, inner: float) -> Inside:
    """n-pointed star: radius 1 at the tips, `inner` between them, straight-ish edges."""
    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        t = (np.arctan2(v, u) % (2 * np.pi / n)) / (2 * np.pi / n)  # 0 at a tip, 0.5 between tips
        return np.hypot(u, v) <= 1 - (1 - inner) * (1 - np.abs(1 - 2 * t))

    return inside


# name -> (inside test, order of rotational symmetry; 0 = any rotation is the same shape)
SHAPES: dict[str, tuple[Inside, int]] = {
    "triangle": (_polygon(3), 3),
    "pentagon": (_polygon(5), 5),
    "hexagon": (_polygon(6), 6),
    "star4": (_star(4, 0.38), 4),
    "star5": (_star(5, 0.45), 5),
    "star8": (_star(8, 0.6), 8),
    "plus": (lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1)), 4),
    "ring": (lambda u, v: (np.hypot(u, v) <= 1) & (np.hypot(u, v) >= 0.55), 0),
    "crescent": (lambda u, v: (np.hypot(u, v) <= 1) & (np.hypot(u - 0.55, v) >= 0.8), 1),
    "ell": (lambda u, v: ((np.abs(u + 0.55) <= 0.35) & (np.abs(v) <= 1)) | ((np.abs(v - 0.65) <= 0.35) & (np.abs(u) <= 0.9)), 1),
    "tee": (lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v - 0.1) <= 0.9)) | ((np.abs(v + 0.75) <= 0.3) & (np.abs(u) <= 1)), 1),
    "arrow": (lambda u, v: ((v <= -0.1) & (np.abs(u) <= 0.85 * (v + 1.0))) | ((v > -0.15) & (v <= 1) & (np.abs(u) <= 0.25)), 1),
    "half_disc": (lambda u, v: (np.hypot(u, v) <= 1) & (v >= -0.2), 1),
    "hourglass": (lambda u, v: (np.abs(v) <= 1) & (np.abs(u) <= 0.15 + 0.75 * np.abs(v)), 2),
    "diamond_bar": (lambda u, v: np.abs(u) / 1.0 + np.abs(v) / 0.4 <= 1, 2),
    "key": (lambda u, v: (np.hypot(u + 0.5, v) <= 0.5) | ((np.abs(v) <= 0.16) & (u >= -0.2) & (u <= 1)) | ((u >= 0.55) & (u <= 0.75) & (v >= 0) & (v <= 0.45)), 1),
}

TEXTURES = ("flat", "gradient", "stripes", "checker", "blobs", "grain", "dots", "waves")


@dataclass(frozen=True)
class SceneConfig:
    """The pretraining data. Every field changes the images; all are recorded with the weights."""

    image_size: int = 32  # rendered directly at the model's input size
    supersample: int = 2  # per side, for anti-aliased edges
    max_objects: int = 8  # 1 .. max_objects objects per image
    main_radius: tuple[float, float] = (4.0, 10.0)  # pixels; the main object is the largest
    other_radius: tuple[float, float] = (2.5, 4.5)
    p_gray: float = 0.2  # grayscale images, as many downstream tasks are
    p_lowres: float = 0.15  # render at 1/2 resolution and upsample: blurry inputs exist too
    noise: float = 0.04  # max std of additive pixel noise (fraction of the 0-255 range)

    @property
    def num_classes(self) -> int:
        """Classes of the timm head: the main object's shape."""
        return len(SHAPES)

    @property
    def num_counts(self) -> int:
        return self.max_objects

    @property
    def num_textures(self) -> int:
        return len(TEXTURES)

    @property
    def num_segments(self) -> int:
        """Labels of the segment map: each texture, then each shape."""
        return len(TEXTURES) + len(SHAPES)


# ----------------------------------------------------------------------------- drawing

def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] -> RGB (..., 3)."""
    h, s, v = np.broadcast_arrays(np.asarray(h, float) % 1.0, np.asarray(s, float), np.asarray(v, float))
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.stack([np.choose(i, [v, q, p, p, t, v]), np.choose(i, [t, v, v, q, p, p]),
                     np.choose(i, [p, p, t, v, v, q])], axis=-1)


def _value_noise(rng: np.random.Generator, n: int, size: int, cells: np.ndarray) -> np.ndarray:
    """Smooth noise in [0, 1], (n, size, size), with cells[i] features across image i."""
    out = np.empty((n, size, size))
    pix = (np.arange(size) + 0.5) / size
    for i in range(n):
        c = int(cells[i])
        grid = rng.random((c + 1, c + 1))
        t = pix * c
        j = np.minimum(t.astype(int), c - 1)
        f = t - j
        f = f * f * (3 - 2 * f)
        rows = grid[j] * (1 - f)[:, None] + grid[j + 1] * f[:, None]
        out[i] = rows[:, j] * (1 - f)[None] + rows[:, j + 1] * f[None]
    return out


def _textures(rng: np.random.Generator, kind: np.ndarray, size: int) -> np.ndarray:
    """Background intensity patterns in [0, 1], (n, size, size), one of TEXTURES per image."""
    n = len(kind)
    pix = np.arange(size) + 0.5
    theta = rng.uniform(0, np.pi, n)[:, None, None]
    along = pix[None, None, :] * np.cos(theta) + pix[None, :, None] * np.sin(theta)
    across = -pix[None, None, :] * np.sin(theta) + pix[None, :, None] * np.cos(theta)
    period = rng.uniform(3.0, 9.0, n)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    pattern = {
        "flat": np.full((n, size, size), 0.5),
        "gradient": np.clip(along / size * rng.uniform(0.5, 1.0, n)[:, None, None], 0, 1),
        "stripes": (np.sin(2 * np.pi * along / period + phase) > 0).astype(float),
        "checker": ((np.floor(along / period * 1.4) + np.floor(across / period * 1.4)) % 2),
        "blobs": _value_noise(rng, n, size, rng.integers(2, 5, n)),
        "grain": _value_noise(rng, n, size, rng.integers(10, 17, n)),
        "dots": (np.hypot((along / period) % 1 - 0.5, (across / period) % 1 - 0.5) < 0.25).astype(float),
        "waves": 0.5 + 0.5 * np.sin(2 * np.pi * along / (2 * period) + 2.0 * np.sin(2 * np.pi * across / (3 * period))),
    }
    names = np.array(TEXTURES)[kind]
    return np.stack([pattern[name][i] for i, name in enumerate(names)])


def _place(rng: np.random.Generator, radii: np.ndarray, size: int, tries: int = 30) -> np.ndarray:
    """Centres (k, 2) for discs of `radii` (largest first) inside the image, not overlapping; a disc that
    does not fit after `tries` gets NaN (the caller drops it)."""
    out = np.full((len(radii), 2), np.nan)
    for k, r in enumerate(radii):
        cand = rng.uniform(r, size - r, (tries, 2))
        ok = np.ones(tries, bool)
        for j in range(k):
            ok &= np.hypot(*(cand - out[j]).T) >= r + radii[j] + 1.0
        if ok.any():
            out[k] = cand[np.argmax(ok)]
    return out


class SceneTask:
    """Deterministic rendering of image batches and their targets."""

    def __init__(self, cfg: SceneConfig) -> None:
        self.cfg = cfg
        self.shapes = list(SHAPES.values())

    def batch(self, seed: int, index: int, size: int) -> dict[str, np.ndarray]:
        """Batch `index` of the image stream `seed`.

        Returns:
            image: (B, H, W, 3) uint8; label: (B,) int64 shape of the main object; count: (B,) int64
            number of objects minus one; texture: (B,) int64; pose: (B, 5) float32 of the main object
            (x, y in [-1, 1] image coordinates with y down, standardised log-radius, cos and sin of
            symmetry-order x rotation); pose_mask: (B, 5) float32, 0 where undefined (a ring's rotation);
            segment: (B, H, W) uint8, what covers each pixel: texture index, or num_textures + shape index.
        """
        cfg = self.cfg
        rng = np.random.default_rng([seed, index, size])
        h, ss = cfg.image_size, cfg.supersample
        sub = (np.arange(h * ss) + 0.5) / ss  # sub-pixel centres in pixel units

        texture = rng.integers(0, len(TEXTURES), size)
        pattern = _textures(rng, texture, h)
        bg_a, bg_b = _hsv(rng.random((2, size)), rng.uniform(0, 0.8, (2, size)), rng.uniform(0.1, 0.95, (2, size)))
        img = bg_a[:, None, None] * (1 - pattern[..., None]) + bg_b[:, None, None] * pattern[..., None]

        # What covers each pixel: the background's texture (0 .. T-1) or an object's shape (T + shape).
        segment = np.broadcast_to(texture[:, None, None], (size, h, h)).astype(np.uint8).copy()
        label = rng.integers(0, len(SHAPES), size)
        wanted = rng.integers(1, cfg.max_objects + 1, size)
        count = np.zeros(size, np.int64)
        pose = np.zeros((size, NUM_POSE), np.float32)
        mask = np.ones((size, NUM_POSE), np.float32)
        lo, hi = np.log(cfg.main_radius)
        for i in range(size):
            radii = np.concatenate([[np.exp(rng.uniform(lo, hi))], rng.uniform(*cfg.other_radius, wanted[i] - 1)])
            centres = _place(rng, radii, h)
            keep = ~np.isnan(centres[:, 0])
            radii, centres = radii[keep], centres[keep]
            kinds = np.concatenate([[label[i]], rng.integers(0, len(SHAPES), len(radii) - 1)])
            angles = rng.uniform(0, 2 * np.pi, len(radii))
            colours = _hsv(rng.random(len(radii)), rng.uniform(0, 1, len(radii)), rng.uniform(0.05, 1, len(radii)))
            # The main object must stand out from its background: push its brightness away from it.
            bg = img[i].mean()
            gap = colours[0].mean() - bg
            if abs(gap) < 0.3:
                colours[0] = np.clip(colours[0] + (np.sign(gap) or 1.0) * (0.3 - abs(gap)), 0, 1)
            for k in range(len(radii))[::-1]:  # small ones first, the main object on top
                self._draw(img[i], segment[i], sub, centres[k], radii[k], angles[k], kinds[k], colours[k])
            count[i] = len(radii) - 1
            order = self.shapes[label[i]][1]
            x, y = centres[0] / h * 2 - 1
            pose[i] = (x, y, (np.log(radii[0]) - (lo + hi) / 2) / ((hi - lo) / 2),
                       np.cos(order * angles[0]), np.sin(order * angles[0]))
            if order == 0:
                mask[i, 3:] = 0

        img = self._degrade(img, rng)
        return dict(
            image=np.round(img * 255).astype(np.uint8),
            label=label.astype(np.int64),
            count=count,
            texture=texture.astype(np.int64),
            pose=pose,
            pose_mask=mask,
            segment=segment,
        )

    def _draw(self, img: np.ndarray, segment: np.ndarray, sub: np.ndarray, centre: np.ndarray, r: float,
              angle: float, kind: int, colour: np.ndarray) -> None:
        """Alpha-blend one anti-aliased object onto an (H, W, 3) image in place, touching only its bounding
        box, and mark the pixels it mostly covers in the (H, W) segment map."""
        h, ss = self.cfg.image_size, self.cfg.supersample
        cx, cy = centre
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, h)
        dy = sub[y0 * ss: y1 * ss, None] - cy
        dx = sub[None, x0 * ss: x1 * ss] - cx
        c, s = np.cos(angle), np.sin(angle)
        u, v = (dx * c + dy * s) / r, (-dx * s + dy * c) / r
        inside = self.shapes[kind][0](u, v).astype(float)
        cover = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean((1, 3))[..., None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - cover) + colour * cover
        segment[y0:y1, x0:x1][cover[..., 0] >= 0.5] = len(TEXTURES) + kind

    def _degrade(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Grayscale, low resolution and pixel noise on random images of the batch."""
        cfg = self.cfg
        size, h = img.shape[:2]
        gray = rng.random(size) < cfg.p_gray
        img = np.where(gray[:, None, None, None], img.mean(-1, keepdims=True), img)
        low = rng.random(size) < cfg.p_lowres
        if low.any() and h % 2 == 0:
            small = img[low].reshape(-1, h // 2, 2, h // 2, 2, 3).mean((2, 4))
            img[low] = small.repeat(2, 1).repeat(2, 2)
        sigma = rng.uniform(0, cfg.noise, (size, 1, 1, 1))
        return np.clip(img + sigma * rng.standard_normal(img.shape), 0, 1)
