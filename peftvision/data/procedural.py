"""The six procedurally generated built-in tasks (numpy only, deterministic from a seed).

dSprites-like shapes (`shape_loc`, `shape_ori`), CLEVR-like scenes (`count`, `closest_dist`) and
specialized-like textures (`cells`, `landcover`); see `builtin.py` for the suite and its cache.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .suite import Arrays, register_task

S = 32  # side of the generated images
SS = 2  # supersampling per side for anti-aliased shape edges
N_TRAIN, N_TEST = 2000, 1000  # generated tasks: a pool larger than 1,000 so that the seed matters


# ----------------------------------------------------------------------------- drawing helpers

_SUB = (np.arange(S * SS) + 0.5) / SS  # sub-pixel centres, in pixel units
_YS, _XS = _SUB[:, None], _SUB[None, :]  # (S*SS, 1), (1, S*SS)
_PIX = np.arange(S) + 0.5
_YP, _XP = _PIX[:, None], _PIX[None, :]


def _pool(cover: np.ndarray) -> np.ndarray:
    """(N, S*SS, S*SS) sub-pixel coverage -> (N, S, S) anti-aliased coverage."""
    return cover.reshape(len(cover), S, SS, S, SS).mean(axis=(2, 4))


def _labels(rng: np.random.Generator, k: int) -> np.ndarray:
    """Balanced labels for the training pool, then for the test set (each shuffled)."""
    return np.concatenate([rng.permutation(np.arange(N_TRAIN) % k), rng.permutation(np.arange(N_TEST) % k)])


def _split(x: np.ndarray, y: np.ndarray) -> Arrays:
    x = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    return {"train_x": x[:N_TRAIN], "train_y": y[:N_TRAIN], "test_x": x[N_TRAIN:], "test_y": y[N_TRAIN:]}


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] -> RGB (..., 3)."""
    h, s, v = np.broadcast_arrays(np.asarray(h, float) % 1.0, np.asarray(s, float), np.asarray(v, float))
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1], (n, S, S), with `cells` features across the image."""
    grid = rng.random((n, cells + 1, cells + 1))
    t = (_PIX / S) * cells
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    f = f * f * (3 - 2 * f)
    rows = grid[:, i, :] * (1 - f)[None, :, None] + grid[:, i + 1, :] * f[None, :, None]
    return rows[:, :, i] * (1 - f)[None, None, :] + rows[:, :, i + 1] * f[None, None, :]


def _paint(canvas: np.ndarray, cover: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Alpha-blend `colour` ((N, 3) or (N, S, S, 3)) over canvas (N, S, S, 3) with coverage (N, S, S)."""
    colour = colour[:, None, None, :] if colour.ndim == 2 else colour
    return canvas * (1 - cover[..., None]) + colour * cover[..., None]


def _camera(rng: np.random.Generator, img: np.ndarray, noise: float) -> np.ndarray:
    """Per-image brightness, colour cast and sensor noise, so that no class is told by mean colour alone."""
    n = len(img)
    img = img * rng.uniform(0.85, 1.15, (n, 1, 1, 1)) + rng.normal(0, 0.03, (n, 1, 1, 3))
    return img + rng.normal(0, noise, img.shape)


# ----------------------------------------------------------------------------- dSprites-like shapes

def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = u * 1.15, -v * 1.15 + 0.15
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "square": lambda u, v: np.maximum(abs(u), abs(v)) <= 0.85,
    "ellipse": lambda u, v: u * u + (v / 0.5) ** 2 <= 1,
    "heart": _heart,
    # No rotational symmetry (mirror only): orientation is defined over the full circle.
    "wedge": lambda u, v: (v <= 0.9) & (abs(u) <= 0.7 * (v + 1.1) / 2.0),
    "teardrop": lambda u, v: (u * u + (v - 0.3) ** 2 <= 0.36) | ((v >= -1.1) & (v <= 0.3) & (abs(u) <= 0.6 * (v + 1.1) / 1.4)),
}


def _shapes(kinds: list[str], kind: np.ndarray, cx, cy, scale, angle) -> np.ndarray:
    """Coverage (N, S, S) of one shape per image: kinds[kind[i]] at (cx, cy), half-size `scale` px, rotated."""
    cover = np.zeros((len(kind), S * SS, S * SS), dtype=bool)
    for k, shape in enumerate(kinds):
        sel = np.flatnonzero(kind == k)
        if len(sel) == 0:
            continue
        dx, dy = _XS[None] - cx[sel, None, None], _YS[None] - cy[sel, None, None]
        c, s = np.cos(angle[sel])[:, None, None], np.sin(angle[sel])[:, None, None]
        u, v = (dx * c + dy * s) / scale[sel, None, None], (-dx * s + dy * c) / scale[sel, None, None]
        cover[sel] = _SHAPES[shape](u, v)
    return _pool(cover.astype(np.float32))


def _shape_images(rng, kinds, kind, cx, cy, scale, angle) -> np.ndarray:
    n = len(kind)
    canvas = np.broadcast_to(rng.uniform(0.0, 0.3, (n, 1, 1, 1)), (n, S, S, 3))
    colour = _hsv(rng.random(n), rng.uniform(0, 0.7, n), rng.uniform(0.7, 1.0, n))
    cover = np.concatenate([_shapes(kinds, kind[i:i + 500], cx[i:i + 500], cy[i:i + 500], scale[i:i + 500], angle[i:i + 500])
                            for i in range(0, n, 500)])
    return _camera(rng, _paint(canvas, cover, colour), noise=0.04)


@register_task("shape_loc", "structured", [f"x{k}" for k in range(8)])
def _shape_loc(rng: np.random.Generator) -> Arrays:
    """dSprites-like square / ellipse / heart, any size, angle and height: which of 8 columns holds its centre."""
    y = _labels(rng, 8)
    n = len(y)
    lo, hi = 4.0, 28.0
    cx = lo + (y + rng.random(n)) * (hi - lo) / 8
    cy, scale = rng.uniform(lo, hi, n), rng.uniform(2.5, 5.0, n)
    kind, angle = rng.integers(0, 3, n), rng.uniform(0, 2 * np.pi, n)
    return _split(_shape_images(rng, ["square", "ellipse", "heart"], kind, cx, cy, scale, angle), y)


@register_task("shape_ori", "structured", [f"{45 * k}-{45 * (k + 1)} deg" for k in range(8)])
def _shape_ori(rng: np.random.Generator) -> Arrays:
    """Heart / wedge / teardrop at any place and size: which 45-degree sector its rotation falls in."""
    y = _labels(rng, 8)
    n = len(y)
    angle = (y + rng.random(n)) * (2 * np.pi / 8)
    cx, cy, scale = rng.uniform(10, 22, n), rng.uniform(10, 22, n), rng.uniform(4.5, 7.0, n)
    kind = rng.integers(0, 3, n)
    return _split(_shape_images(rng, ["heart", "wedge", "teardrop"], kind, cx, cy, scale, angle), y)


# ----------------------------------------------------------------------------- CLEVR-like scenes

_CLEVR_COLOURS = np.array([  # CLEVR's colours but gray, which vanishes on a gray backdrop at 32 px
    [0.68, 0.14, 0.14], [0.16, 0.29, 0.84], [0.11, 0.41, 0.08],
    [0.51, 0.29, 0.1], [0.5, 0.15, 0.75], [0.16, 0.82, 0.82], [1.0, 0.93, 0.2],
])


def _window(cx: float, cy: float, reach: float) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Pixels within `reach` of (cx, cy): their slices and sub-pixel coordinates relative to the centre."""
    y0, y1 = max(int(cy - reach) - 1, 0), min(int(cy + reach) + 2, S)
    x0, x1 = max(int(cx - reach) - 1, 0), min(int(cx + reach) + 2, S)
    return (slice(y0, y1), slice(x0, x1)), _SUB[y0 * SS: y1 * SS, None] - cy, _SUB[None, x0 * SS: x1 * SS] - cx


def _pool1(cover: np.ndarray) -> np.ndarray:
    """(h*SS, w*SS) -> (h, w)."""
    h, w = cover.shape
    return cover.reshape(h // SS, SS, w // SS, SS).mean(axis=(1, 3))


def _object(img: np.ndarray, rng: np.random.Generator, cx: float, cy: float, r: float) -> None:
    """Paint a shaded sphere or a flat-topped cube (in place) on one (S, S, 3) image."""
    colour = _CLEVR_COLOURS[rng.integers(len(_CLEVR_COLOURS))] * rng.uniform(0.8, 1.1)
    win, dy, dx = _window(cx, cy, r)
    if rng.random() < 0.5:  # sphere: lit from the top left
        inside = dx * dx + dy * dy <= r * r
        shade = 1.0 + 0.35 * np.clip(-(dx + dy) / (1.5 * r), -1, 1)
    else:  # cube seen from the front: a square with a lighter top face
        inside = np.maximum(abs(dx), abs(dy)) <= 0.85 * r
        shade = np.where(dy < -0.35 * r, 1.25, 0.95)
    cover = _pool1(inside.astype(np.float32))
    tone = _pool1(inside * shade) / np.maximum(cover, 1e-6)
    img[win] = img[win] * (1 - cover[..., None]) + (colour * tone[..., None]) * cover[..., None]


def _place(rng: np.random.Generator, radii: np.ndarray, margin: float = 1.0) -> np.ndarray:
    """Centres for discs of `radii` inside the image, none overlapping (retried until they fit)."""
    while True:
        centres: list[np.ndarray] = []
        for r in radii:
            for _ in range(200):
                c = rng.uniform(r + 0.5, S - r - 0.5, 2)
                if all(np.hypot(*(c - o)) >= r + ro + margin for o, ro in zip(centres, radii)):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == len(radii):
            return np.array(centres)


def _backdrop(rng: np.random.Generator, n: int) -> np.ndarray:
    """Neutral gray studio backgrounds with a soft vertical gradient, (n, S, S, 3)."""
    top = rng.uniform(0.45, 0.7, n)[:, None, None, None]
    slope = rng.uniform(-0.15, 0.05, n)[:, None, None, None]
    return np.broadcast_to(top + slope * (_YP / S)[None, :, :, None], (n, S, S, 3)).copy()


@register_task("count", "structured", [str(k) for k in range(3, 11)])
def _count(rng: np.random.Generator) -> Arrays:
    """3 to 10 spheres and cubes of CLEVR's colours, never overlapping: how many (label = count - 3)."""
    y = _labels(rng, 8)
    img = _backdrop(rng, len(y))
    for i, label in enumerate(y):
        radii = rng.uniform(1.6, 2.6, label + 3)
        for (cx, cy), r in zip(_place(rng, radii), radii):
            _object(img[i], rng, cx, cy, r)
    return _split(_camera(rng, img, noise=0.02), y)


# Depth bins of the nearest object, nearer bins narrower as in CLEVR-dist; 6 classes.
_DEPTH_EDGES = np.array([1.6, 2.1, 2.7, 3.5, 4.6, 6.0, 8.0])
_HORIZON, _FOCAL = 6.0, 28.0  # pixels: horizon row, focal length (camera 1 unit above the ground)


@register_task("closest_dist", "structured", [f"{a:g}-{b:g}" for a, b in zip(_DEPTH_EDGES[:-1], _DEPTH_EDGES[1:])])
def _closest_dist(rng: np.random.Generator) -> Arrays:
    """1-4 objects standing on a ground plane in perspective: depth bin of the nearest one."""
    y = _labels(rng, 6)
    n = len(y)
    sky = _backdrop(rng, n)
    ground = rng.uniform(0.3, 0.5, n)[:, None, None, None] + 0.1 * (_YP / S)[None, :, :, None]
    img = np.where((_YP < _HORIZON)[None, :, :, None], sky, ground)
    for i, label in enumerate(y):
        nearest = rng.uniform(_DEPTH_EDGES[label], _DEPTH_EDGES[label + 1])
        depths = np.concatenate([[nearest], rng.uniform(nearest + 0.3, 9.0, rng.integers(0, 4))])
        for z in np.sort(depths)[::-1]:  # far to near: nearer objects occlude
            r = _FOCAL * rng.uniform(0.3, 0.5) / z  # apparent radius, px (object size varies too)
            x = S / 2 + rng.uniform(-1, 1) * (S / 2 - 2)
            ground_row = _HORIZON + _FOCAL / z  # where the object touches the ground
            _object(img[i], rng, x, ground_row - r, r)
    return _split(_camera(rng, img, noise=0.02), y)


# ----------------------------------------------------------------------------- specialized-like

def _ellipses(img: np.ndarray, centres, radii, angles, colours, wobble=None) -> None:
    """Paint filled ellipses (a, b radii; optional wavy outline) in place on one (S, S, 3) image."""
    for k, ((cx, cy), (a, b), t, col) in enumerate(zip(centres, radii, angles, colours)):
        win, dy, dx = _window(cx, cy, 1.5 * max(a, b))
        u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
        rad = np.hypot(u / a, v / b)
        if wobble is not None:  # irregular nucleus outline: radius varies with angle
            phi = np.arctan2(v, u)
            rad = rad / (1 + wobble[k][0] * np.sin(3 * phi + wobble[k][1]) + wobble[k][2] * np.sin(5 * phi + wobble[k][3]))
        cover = _pool1((rad <= 1).astype(np.float32))[..., None]
        img[win] = img[win] * (1 - cover) + np.asarray(col) * cover


def _atypical(rng: np.random.Generator, img: np.ndarray, centres: np.ndarray, hue: float) -> None:
    """Tumour-like nuclei: large, irregular, pale (open chromatin) with a dark nucleolus; not darker
    than normal nuclei, so that size and shape, not a dark pixel, tell them apart."""
    m = len(centres)
    r = rng.uniform(2.2, 3.2, m)
    colours = _hsv(np.full(m, hue), rng.uniform(0.3, 0.5, m), rng.uniform(0.45, 0.62, m))
    wobble = np.stack([rng.uniform(0.1, 0.25, m), rng.uniform(0, 6.3, m), rng.uniform(0.05, 0.12, m), rng.uniform(0, 6.3, m)], 1)
    _ellipses(img, centres, np.stack([r, r * rng.uniform(0.75, 1.0, m)], 1), rng.uniform(0, np.pi, m), colours, wobble)
    dots = centres + rng.uniform(-0.8, 0.8, (m, 2))
    dark = _hsv(np.full(m, hue), np.full(m, 0.6), rng.uniform(0.25, 0.4, m))
    _ellipses(img, dots, np.full((m, 2), 0.7), np.zeros(m), dark)


def _outside_centre(rng: np.random.Generator, m: int, box: float) -> np.ndarray:
    """m centres whose nucleus (radius <= 3.2 px) lies wholly outside the box |x - 16|, |y - 16| <= box."""
    out = []
    while len(out) < m:
        c = rng.uniform(0, S, 2)
        if np.max(np.abs(c - S / 2)) >= box + 3.3:
            out.append(c)
    return np.array(out)


def _small_nuclei(rng: np.random.Generator, img: np.ndarray, centres: np.ndarray, hue: float) -> None:
    m = len(centres)
    radii = np.stack([rng.uniform(0.9, 1.6, m), rng.uniform(0.7, 1.2, m)], 1)
    colours = _hsv(np.full(m, hue), rng.uniform(0.4, 0.65, m), rng.uniform(0.3, 0.5, m))
    _ellipses(img, centres, radii, rng.uniform(0, np.pi, m), colours)


@register_task("cells", "specialized", ["normal", "tumor"])
def _cells(rng: np.random.Generator) -> Arrays:
    """Stained tissue: is there a large, irregular nucleus in the central 12x12 px (PatchCamelyon-like)?"""
    y = _labels(rng, 2)
    n = len(y)
    shift = rng.normal(0, 0.03, n)  # stain batch: both dyes drift together
    eosin = _hsv(0.93 + shift, rng.uniform(0.2, 0.4, n), rng.uniform(0.8, 0.95, n))
    texture = 0.6 * _noise(rng, n, 4) + 0.4 * _noise(rng, n, 10) - 0.5
    img = eosin[:, None, None, :] * (1 + 0.25 * texture[..., None])
    box = 6.0
    for i in range(n):
        hue = 0.75 + shift[i]
        _small_nuclei(rng, img[i], rng.uniform(0, S, (rng.integers(8, 19), 2)), hue)
        if rng.random() < 0.5:  # a dense cluster of small nuclei in the centre, in either class
            _small_nuclei(rng, img[i], S / 2 + rng.normal(0, 3, (rng.integers(4, 9), 2)), hue)
        if rng.random() < 0.5:  # large nuclei outside the centre, in either class: location matters
            _atypical(rng, img[i], _outside_centre(rng, rng.integers(1, 4), box), hue)
        if y[i] == 1:
            _atypical(rng, img[i], rng.uniform(S / 2 - box + 1, S / 2 + box - 1, (rng.integers(1, 3), 2)), hue)
    return _split(_camera(rng, img, noise=0.02), y)


def _vegetation(rng: np.random.Generator, n: int, v=(0.3, 0.5)) -> np.ndarray:
    base = _hsv(rng.uniform(0.2, 0.32, n), rng.uniform(0.35, 0.7, n), rng.uniform(*v, n))
    return base[:, None, None, :] * (1 + 0.25 * (_noise(rng, n, 4) - 0.5))[..., None]


def _rotated(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates along / across a random direction per image, (n, S, S) each."""
    t = rng.uniform(0, np.pi, n)[:, None, None]
    x, y = _XP[None] - S / 2, _YP[None] - S / 2
    return x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)


def _band(d: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Soft coverage of |d| <= width / 2 (1 px ramp)."""
    return np.clip(width[:, None, None] / 2 - np.abs(d) + 0.5, 0, 1)


def _annual_crop(rng, n):
    along, across = _rotated(rng, n)
    period = rng.uniform(2.5, 5.0, n)[:, None, None]
    stripes = (np.sin(2 * np.pi * along / period) > rng.uniform(-0.4, 0.4, n)[:, None, None]).astype(float)
    crop = _hsv(rng.uniform(0.12, 0.3, n), rng.uniform(0.4, 0.8, n), rng.uniform(0.45, 0.75, n))
    soil = _hsv(rng.uniform(0.06, 0.1, n), rng.uniform(0.3, 0.6, n), rng.uniform(0.35, 0.6, n))
    img = _paint(np.broadcast_to(soil[:, None, None, :], (n, S, S, 3)), stripes, crop)
    second = across > rng.uniform(-10, 10, n)[:, None, None]  # a second field with another crop
    other = _hsv(rng.uniform(0.1, 0.3, n), rng.uniform(0.3, 0.8, n), rng.uniform(0.4, 0.8, n))
    return _paint(img, second * (0.5 + 0.5 * (np.sin(2 * np.pi * across / 3.0) > 0)), other)


def _forest(rng, n):
    base = _hsv(rng.uniform(0.22, 0.36, n), rng.uniform(0.5, 0.8, n), rng.uniform(0.18, 0.32, n))
    crowns = 0.55 * _noise(rng, n, 14) + 0.45 * _noise(rng, n, 8)
    return base[:, None, None, :] * (0.55 + 0.9 * crowns[..., None])


def _highway(rng, n):
    img = _vegetation(rng, n, v=(0.35, 0.6))
    along, across = _rotated(rng, n)
    road = _band(across - rng.uniform(-8, 8, n)[:, None, None], rng.uniform(1.5, 3.0, n))
    asphalt = _hsv(rng.uniform(0, 1, n), rng.uniform(0, 0.1, n), rng.uniform(0.45, 0.7, n))
    return _paint(img, road, asphalt)


def _pasture(rng, n):
    img = _vegetation(rng, n, v=(0.45, 0.68))
    bushes = (_noise(rng, n, 12) > 0.82).astype(float) * 0.6
    return _paint(img, bushes, _hsv(0.28, 0.6, rng.uniform(0.2, 0.35, n)))


def _permanent_crop(rng, n):
    along, across = _rotated(rng, n)
    period = rng.uniform(3.0, 4.5, n)[:, None, None]
    du = (along / period) % 1 - 0.5
    dv = (across / period) % 1 - 0.5
    trees = np.clip((0.3 - np.hypot(du, dv)) * period * 1.2, 0, 1)  # dots ~0.6 px radius + soft edge
    soil = _hsv(rng.uniform(0.08, 0.2, n), rng.uniform(0.25, 0.5, n), rng.uniform(0.45, 0.7, n))
    ground = soil[:, None, None, :] * (1 + 0.15 * (_noise(rng, n, 3) - 0.5))[..., None]
    return _paint(ground, trees, _hsv(rng.uniform(0.22, 0.33, n), rng.uniform(0.5, 0.8, n), rng.uniform(0.2, 0.4, n)))


def _residential(rng, n):
    img = _vegetation(rng, n, v=(0.35, 0.55))
    along, across = _rotated(rng, n)
    block = rng.uniform(6.0, 9.0, n)[:, None, None]
    pu = (along + rng.uniform(0, 9, n)[:, None, None]) % block
    pv = (across + rng.uniform(0, 9, n)[:, None, None]) % block
    street = ((pu < 1.2) | (pv < 1.2)).astype(float)
    house = ((pu > 2.2) & (pu < block - 1.2) & (pv > 2.2) & (pv < block - 2.0)).astype(float)
    roof = _hsv(rng.choice([0.02, 0.05, 0.0], n), rng.uniform(0.0, 0.6, n), rng.uniform(0.45, 0.75, n))
    img = _paint(img, street, _hsv(0, 0, rng.uniform(0.5, 0.7, n)))
    return _paint(img, house, roof)


def _water(rng, n):
    water = _hsv(rng.uniform(0.5, 0.62, n), rng.uniform(0.45, 0.8, n), rng.uniform(0.25, 0.5, n))
    return water[:, None, None, :] * (1 + 0.12 * (_noise(rng, n, 3) - 0.5))[..., None], water


def _river(rng, n):
    img = _vegetation(rng, n)
    along, across = _rotated(rng, n)
    meander = rng.uniform(1, 5, n)[:, None, None] * np.sin(2 * np.pi * along / rng.uniform(12, 30, n)[:, None, None] + rng.uniform(0, 6.3, n)[:, None, None])
    river = _band(across - rng.uniform(-6, 6, n)[:, None, None] - meander, rng.uniform(2.0, 4.5, n))
    _, colour = _water(rng, n)
    return _paint(img, river, colour)


def _sea_lake(rng, n):
    img, _ = _water(rng, n)
    along, across = _rotated(rng, n)  # half the tiles show a shore on one side
    shore = np.clip(across - rng.uniform(6, 20, n)[:, None, None] + 3 * _noise(rng, n, 4), 0, 1)
    shore *= (rng.random(n) < 0.5)[:, None, None]
    return _paint(img, shore, _vegetation(rng, n))


_LANDCOVER = {
    "annual_crop": _annual_crop, "forest": _forest, "highway": _highway, "pasture": _pasture,
    "permanent_crop": _permanent_crop, "residential": _residential, "river": _river, "sea_lake": _sea_lake,
}


@register_task("landcover", "specialized", list(_LANDCOVER))
def _landcover(rng: np.random.Generator) -> Arrays:
    """Synthetic 32x32 aerial tiles of 8 land-cover classes with varied colour, haze and noise (EuroSAT-like)."""
    y = _labels(rng, len(_LANDCOVER))
    img = np.zeros((len(y), S, S, 3))
    for k, draw in enumerate(_LANDCOVER.values()):
        sel = np.flatnonzero(y == k)
        img[sel] = draw(rng, len(sel))
    haze = rng.uniform(0, 0.2, (len(y), 1, 1, 1))
    img = img * (1 - haze) + haze * 0.8
    return _split(_camera(rng, img, noise=0.025), y)
