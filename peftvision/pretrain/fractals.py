"""Formula-driven pretraining images: IFS fractals with random colour, pose and clutter.

In the spirit of FractalDB (Kataoka et al., "Pre-training without Natural Images", ACCV 2020): a class
is an iterated function system -- 2 to 4 random contractive affine maps -- rendered with the chaos
game. An instance perturbs the class's coefficients a little and draws the attractor with a random
scale, rotation, mirror, position, colour, background, density and resolution, among 0-2 smaller
fractals of other classes. Besides the class of the main fractal, each image carries the attributes a
vision backbone should encode: where the main fractal is, how large and how rotated, and how many
fractals there are. The pretraining task predicts all of them (see `peftvision.pretrain.run`).

Nothing here is shared with the built-in evaluation suite (digits, Fashion-MNIST, sprite and
scene-like tasks): the images contain no sprites, glyphs or photos, only fractals.

Everything is numpy and deterministic: batch `i` of a `FractalTask` is a pure function of
(config, seed, i), whichever process renders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

NUM_POSE = 5  # x, y, log-scale, cos(angle), sin(angle) of the main fractal


@dataclass(frozen=True)
class FractalConfig:
    """The pretraining data. Every field changes the images; all are recorded with the weights."""

    num_classes: int = 256  # FractalDB uses 1k classes; 256 fit the ~200k images of a 30-minute run
    image_size: int = 32  # rendered directly at the model's input size
    class_seed: int = 0  # which fractals exist (the classes), independent of the image stream
    min_maps: int = 2  # FractalDB samples 2-8 maps; more maps give dust-like attractors at 32x32
    max_maps: int = 4
    max_singular: float = 0.85  # each map contracts: the chaos game converges within a few steps
    min_fill: float = 0.12  # reject near-degenerate systems (a line, a point) by their pixel coverage
    jitter: float = 0.08  # relative per-instance noise on the coefficients: intra-class variation
    chains: int = 64  # chaos-game points run in parallel per fractal ...
    steps: int = 28  # ... for this many steps, of which the first `burn_in` are dropped
    burn_in: int = 6
    scale: tuple[float, float] = (0.45, 1.0)  # main fractal's half-extent, as a fraction of the image's
    max_rotation: float = 180.0  # degrees either way; FractalDB itself does not rotate
    p_mirror: float = 0.5
    max_distractors: int = 2  # smaller fractals of random classes drawn behind the main one
    distractor_scale: tuple[float, float] = (0.15, 0.4)
    p_gray: float = 0.2  # grayscale images, as many downstream tasks are
    p_lowres: float = 0.25  # render at 1/2 or 1/4 resolution and upsample: blurry inputs exist too
    noise: float = 0.04  # max std of additive pixel noise (fraction of the 0-255 range)

    @property
    def num_counts(self) -> int:
        return self.max_distractors + 1


# ----------------------------------------------------------------------------- chaos game

def _chaos_game(
    coeffs: np.ndarray, probs: np.ndarray, rng: np.random.Generator, chains: int, steps: int, burn_in: int
) -> np.ndarray:
    """Points on the attractors of a batch of IFS.

    Args:
        coeffs: (B, M, 6) maps `(a, b, c, d, e, f)`: x' = a x + b y + e, y' = c x + d y + f.
        probs: (B, M) map probabilities (rows sum to 1; padded maps have 0).

    Returns:
        (B, chains * (steps - burn_in), 2) points.
    """
    b = coeffs.shape[0]
    cum = np.cumsum(probs, axis=1)
    cum[:, -1] = 1.0 + 1e-9  # float rounding must never select a padded map
    rows = np.arange(b)[:, None]
    pts = np.zeros((b, chains, 2))
    out = np.empty((b, chains, steps - burn_in, 2))
    u = rng.random((steps, b, chains))
    for t in range(steps):
        idx = (u[t][..., None] >= cum[:, None, :]).sum(-1)  # (B, chains) map index
        c = coeffs[rows, idx]  # (B, chains, 6)
        x, y = pts[..., 0], pts[..., 1]
        pts = np.stack((c[..., 0] * x + c[..., 1] * y + c[..., 4], c[..., 2] * x + c[..., 3] * y + c[..., 5]), -1)
        if t >= burn_in:
            out[:, :, t - burn_in] = pts
    return out.reshape(b, -1, 2)


def _normalise(pts: np.ndarray) -> np.ndarray:
    """Centre each point cloud on its bounding box and scale its larger half-extent to 1."""
    lo, hi = pts.min(1, keepdims=True), pts.max(1, keepdims=True)
    half = np.maximum((hi - lo).max(-1, keepdims=True) / 2, 1e-6)
    return (pts - (lo + hi) / 2) / half


def _sample_system(rng: np.random.Generator, cfg: FractalConfig) -> np.ndarray:
    """One contractive IFS: (max_maps, 6) coefficients, unused maps all zero."""
    n = int(rng.integers(cfg.min_maps, cfg.max_maps + 1))
    maps = np.zeros((cfg.max_maps, 6))
    i = 0
    while i < n:
        m = rng.uniform(-1, 1, 6)
        if np.linalg.svd(m[:4].reshape(2, 2), compute_uv=False)[0] < cfg.max_singular:
            maps[i] = m
            i += 1
    return maps


def _map_probs(coeffs: np.ndarray) -> np.ndarray:
    """FractalDB's choice: a map is used in proportion to the area it preserves, |det A|."""
    det = np.abs(coeffs[..., 0] * coeffs[..., 3] - coeffs[..., 1] * coeffs[..., 2])
    used = np.any(coeffs != 0, axis=-1)
    w = np.where(used, det + 0.02, 0.0)
    return w / w.sum(-1, keepdims=True)


def _fill(pts: np.ndarray, size: int) -> np.ndarray:
    """Fraction of a size x size grid covered by each normalised point cloud."""
    ij = np.clip(((pts + 1) / 2 * size).astype(int), 0, size - 1)
    flat = ij[..., 1] * size + ij[..., 0] + np.arange(pts.shape[0])[:, None] * size * size
    hits = np.bincount(flat.reshape(-1), minlength=pts.shape[0] * size * size).reshape(pts.shape[0], -1)
    return (hits > 0).mean(1)


# ----------------------------------------------------------------------------- the task

class FractalTask:
    """The classes (IFS systems) of a config, and deterministic rendering of image batches."""

    def __init__(self, cfg: FractalConfig) -> None:
        self.cfg = cfg

    @cached_property
    def systems(self) -> np.ndarray:
        """(num_classes, max_maps, 6): class c is drawn from its own seed, so classes are stable
        when num_classes grows; a system is redrawn until its attractor covers enough pixels."""
        cfg = self.cfg
        out = np.empty((cfg.num_classes, cfg.max_maps, 6))
        for c in range(cfg.num_classes):
            rng = np.random.default_rng([cfg.class_seed, 7919, c])
            while True:
                cand = _sample_system(rng, cfg)[None]
                pts = _chaos_game(cand, _map_probs(cand), rng, 256, 24, 6)
                if _fill(_normalise(pts), cfg.image_size)[0] >= cfg.min_fill:
                    out[c] = cand[0]
                    break
        return out

    def batch(self, seed: int, index: int, size: int) -> dict[str, np.ndarray]:
        """Batch `index` of the image stream `seed`.

        Returns:
            image: (B, H, W, 3) uint8; label: (B,) int64 class of the main fractal;
            count: (B,) int64 number of fractals minus one; pose: (B, 5) float32 x, y (in [-1, 1],
            image coordinates, y down), log-scale (standardised), cos and sin of the rotation.
        """
        cfg = self.cfg
        rng = np.random.default_rng([seed, index, size])
        h = cfg.image_size
        n_obj = 1 + cfg.max_distractors
        label = rng.integers(0, cfg.num_classes, size)
        n_dis = rng.integers(0, cfg.max_distractors + 1, size)

        # Objects, main last (drawn on top): (B, n_obj) classes, presence, pose.
        classes = rng.integers(0, cfg.num_classes, (size, n_obj))
        classes[:, -1] = label
        present = np.arange(n_obj)[None, :] >= (cfg.max_distractors - n_dis)[:, None]
        lo_s, hi_s = cfg.distractor_scale
        scale = rng.uniform(lo_s, hi_s, (size, n_obj))
        scale[:, -1] = np.exp(rng.uniform(np.log(cfg.scale[0]), np.log(cfg.scale[1]), size))
        angle = np.deg2rad(rng.uniform(-cfg.max_rotation, cfg.max_rotation, (size, n_obj)))
        mirror = rng.random((size, n_obj)) < cfg.p_mirror
        centre = rng.uniform(-1, 1, (size, n_obj, 2)) * (1 - scale)[..., None]

        # Points of every object, then pose: mirror, rotate, scale, translate.
        coeffs = self.systems[classes].reshape(size * n_obj, cfg.max_maps, 6)
        coeffs = coeffs * (1 + cfg.jitter * rng.uniform(-1, 1, coeffs.shape))
        pts = _normalise(_chaos_game(coeffs, _map_probs(coeffs), rng, cfg.chains, cfg.steps, cfg.burn_in))
        pts = pts.reshape(size, n_obj, -1, 2)
        pts[..., 0] = np.where(mirror[..., None], -pts[..., 0], pts[..., 0])
        cos, sin = np.cos(angle)[..., None], np.sin(angle)[..., None]
        x = (cos * pts[..., 0] - sin * pts[..., 1]) * scale[..., None] + centre[..., 0:1]
        y = (sin * pts[..., 0] + cos * pts[..., 1]) * scale[..., None] + centre[..., 1:2]

        # Density at 2x resolution, averaged down: anti-aliased coverage in [0, 1] per object.
        s2 = 2 * h
        ix = np.clip(((x + 1) / 2 * s2).astype(int), 0, s2 - 1)
        iy = np.clip(((y + 1) / 2 * s2).astype(int), 0, s2 - 1)
        flat = (np.arange(size * n_obj).reshape(size, n_obj, 1) * s2 + iy) * s2 + ix
        dens = np.bincount(flat.reshape(-1), minlength=size * n_obj * s2 * s2).reshape(size, n_obj, s2, s2)
        gain = rng.uniform(0.3, 1.5, (size, n_obj, 1, 1))  # sparse dust ... solid shapes
        alpha = np.clip(dens * gain, 0, 1).reshape(size, n_obj, h, 2, h, 2).mean((3, 5))
        alpha *= present[..., None, None]

        # Colours: a background gradient, then each object over it in its own colour.
        bg0, bg1 = rng.random((2, size, 3))
        direction = rng.uniform(0, 2 * np.pi, size)
        ramp = np.linspace(-0.5, 0.5, h)
        g = (np.cos(direction)[:, None, None] * ramp[None, None, :] + np.sin(direction)[:, None, None] * ramp[None, :, None])
        g = g * rng.uniform(0, 1, (size, 1, 1)) + 0.5
        img = bg0[:, None, None] * (1 - g[..., None]) + bg1[:, None, None] * g[..., None]  # (B, H, W, 3)
        fg = rng.random((size, n_obj, 3))
        # Keep the main fractal visible: push its colour away from the mean background brightness.
        bg_lum = img.mean((1, 2, 3))
        main_lum = fg[:, -1].mean(-1)
        push = np.where(main_lum > bg_lum, 1.0, -1.0) * np.maximum(0, 0.35 - np.abs(main_lum - bg_lum))
        fg[:, -1] = np.clip(fg[:, -1] + push[:, None], 0, 1)
        for k in range(n_obj):
            a = alpha[:, k, :, :, None]
            img = img * (1 - a) + fg[:, k, None, None, :] * a

        img = self._degrade(img, rng)
        pose = np.stack(
            (
                centre[:, -1, 0],
                centre[:, -1, 1],
                (np.log(scale[:, -1]) - np.log(cfg.scale).mean()) / (np.ptp(np.log(cfg.scale)) / 2 + 1e-9),
                np.cos(angle[:, -1]),
                np.sin(angle[:, -1]),
            ),
            -1,
        )
        return dict(
            image=np.round(img * 255).astype(np.uint8),
            label=label.astype(np.int64),
            count=n_dis.astype(np.int64),
            pose=pose.astype(np.float32),
        )

    def _degrade(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Grayscale, low resolution and pixel noise on random images of the batch."""
        cfg = self.cfg
        size, h = img.shape[:2]
        gray = rng.random(size) < cfg.p_gray
        img = np.where(gray[:, None, None, None], img.mean(-1, keepdims=True), img)
        factor = np.where(rng.random(size) < cfg.p_lowres, rng.choice([2, 4], size), 1)
        for f in (2, 4):
            sel = factor == f
            if sel.any() and h % f == 0:
                img[sel] = _upsample(img[sel].reshape(-1, h // f, f, h // f, f, 3).mean((2, 4)), h)
        sigma = rng.uniform(0, cfg.noise, (size, 1, 1, 1))
        img = img + sigma * rng.standard_normal(img.shape)
        return np.clip(img, 0, 1)


def _upsample(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (align_corners=False) upsampling of (B, h, h, C) images to size x size."""
    h = img.shape[1]
    pos = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, h - 1)
    w = pos - i0
    m = np.zeros((size, h))
    m[np.arange(size), i0] += 1 - w
    m[np.arange(size), i1] += w
    x = img.transpose(0, 3, 1, 2)  # (B, C, h, h)
    return (m @ x @ m.T).transpose(0, 2, 3, 1)
