"""Frozen features, computed once: what a model's head reads, cached on disk per image.

A linear probe (the `linear` method, and the head every LP-FT run starts from) reads only what the
frozen backbone gives the head. Without train-time augmentation that is the same every time an image
is seen, so it is computed once per (base weights, model, eval transform, image) and reused across
epochs, grid points, seeds and `compare` runs. Entries are keyed per source of images (an image
folder, a built-in task, an hf: dataset) and hold features per row of that source, so runs whose
splits are different draws of the same pool (other seeds, VTAB-1k's 800/200) share them.

Any change to what the features depend on changes the key: the base weights' fingerprint, the
architecture and its kwargs, the resolved preprocessing (size, mean, std, interpolation, crop), and
the source's files (path, size and modification time of every one; a .npy's; an hf: dataset's own
fingerprint). Only models whose injected method leaves the base's output unchanged at init
(`Method.starts_as_base`) can use base features; others are computed live. The cache lives under
`$PEFTVISION_CACHE/features/` (default ~/.cache/peftvision), at most `$PEFTVISION_FEATURE_CACHE_GB`
(default 4) GB: the least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

FORMAT_VERSION = 1
DEFAULT_CAP_GB = 4.0


def cache_dir() -> Path:
    from ..data.hub import cache_root

    return cache_root() / "features"


def source_identity(source: Any) -> str | None:
    """A string that changes whenever the images of `source` may have changed; None: cannot tell (no caching)."""
    h = hashlib.sha256()
    paths = getattr(source, "paths", None)
    if isinstance(paths, list):  # image files
        for p in paths:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "files:" + h.hexdigest()
    path = getattr(source, "path", None)
    if isinstance(path, str) and os.path.isfile(path):  # a .npy array
        st = os.stat(path)
        return f"array:{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    dataset = getattr(source, "dataset", None)
    fingerprint = getattr(dataset, "_fingerprint", None)
    if isinstance(fingerprint, str):  # an hf: dataset
        return f"hf:{fingerprint}:{getattr(source, 'column', '')}"
    return None


def feature_key(model_key: dict[str, Any], source: Any) -> str | None:
    """The cache key of one source's features under one model + preprocessing (None: not cacheable)."""
    identity = source_identity(source)
    if identity is None:
        return None
    blob = json.dumps({"v": FORMAT_VERSION, "model": model_key, "source": identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def _cap_bytes() -> int:
    try:
        gb = float(os.environ.get("PEFTVISION_FEATURE_CACHE_GB", DEFAULT_CAP_GB))
    except ValueError:
        gb = DEFAULT_CAP_GB
    return int(gb * 1e9)


def _size_and_age(p: Path) -> tuple[int, float] | None:
    try:
        st = p.stat()
    except OSError:  # another process evicted or replaced it meanwhile
        return None
    return st.st_size, st.st_mtime


def _evict(root: Path, keep: Path) -> None:
    """Remove the least recently used entries until the cache fits its cap (never `keep`). Other
    processes may fill or evict the same cache at once: a file that vanished is simply not counted."""
    entries = [(p, s) for p in root.glob("*.safetensors") if p != keep and (s := _size_and_age(p)) is not None]
    entries.sort(key=lambda e: e[1][1])
    kept = _size_and_age(keep)
    total = sum(s[0] for _, s in entries) + (kept[0] if kept else 0)
    for p, (size, _) in entries:
        if total <= _cap_bytes():
            break
        total -= size
        p.unlink(missing_ok=True)


def _read(path: Path) -> tuple[np.ndarray, torch.Tensor] | None:
    """(rows, features) of a cache file, or None if it is missing or unreadable (then it is rebuilt)."""
    from safetensors.torch import load_file

    try:
        data = load_file(str(path))
        os.utime(path)  # recently used
        return data["rows"].numpy(), data["features"]
    except Exception:  # noqa: BLE001 -- a damaged cache entry is recomputed, never an error
        return None


def cached_features(
    key: str | None,
    rows: np.ndarray,
    compute: Callable[[np.ndarray], torch.Tensor],
    write: bool = True,
) -> torch.Tensor:
    """Features of `rows` (positions in one source), in that order: read from the cache where present,
    `compute(missing rows)` for the rest, which are added to the cache (`write`: the main process only).

    `key` None: no caching, everything is computed.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if key is None:
        return compute(rows)
    from ..files import save_tensors

    path = cache_dir() / f"{key}.safetensors"
    have = _read(path) if path.is_file() else None
    known_rows, known = have if have is not None else (np.zeros(0, np.int64), None)
    missing = np.setdiff1d(np.unique(rows), known_rows)
    if len(missing):
        fresh = compute(missing)
        all_rows = np.concatenate([known_rows, missing])
        all_feats = fresh if known is None else torch.cat([known, fresh.to(known.dtype)])
        if write:
            save_tensors({"rows": torch.from_numpy(all_rows), "features": all_feats}, path,
                         {"format": "peftvision-features", "written": time.strftime("%Y-%m-%d %H:%M:%S")})
            _evict(path.parent, keep=path)
        known_rows, known = all_rows, all_feats
    order = np.argsort(known_rows)
    position = order[np.searchsorted(known_rows, rows, sorter=order)]
    return known[torch.from_numpy(position)]
