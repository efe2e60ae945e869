"""The built-in offline task suite (`builtin:<task>`): evaluation data that needs no network.

Two real datasets that ship with installed packages and six procedurally generated ones in the spirit of
VTAB's specialized and structured groups:

| task | group | classes | source |
|---|---|---|---|
| digits | natural | 10 | scikit-learn's bundled `load_digits` (8x8 scans of handwriting, the SVHN analogue) |
| fashion_mnist | natural | 10 | Debian's `dataset-fashion-mnist` (skipped with a reason when absent) |
| landcover | specialized | 8 | synthetic 32x32 aerial tiles (EuroSAT-like) |
| cells | specialized | 2 | synthetic stained tissue: a large irregular nucleus in the centre or not (PatchCamelyon-like) |
| shape_loc | structured | 8 | dSprites-like shapes: binned x position |
| shape_ori | structured | 8 | asymmetric shapes: binned orientation (45 degrees per class) |
| count | structured | 8 | 3-10 objects on a plain background (CLEVR-count-like) |
| closest_dist | structured | 6 | objects on a ground plane in perspective: depth of the nearest (CLEVR-dist-like) |

Each task stores a training pool (>= 1,000) and a test set (>= 500) as uint8 .npy files under
`$PEFTVISION_CACHE/builtin/<task>-v<version>/` (default ~/.cache/peftvision), written once, atomically.
Generation uses numpy only, from a fixed seed per task: the same seed gives the same bytes. Bump a task's
version when its generator changes, so stale caches are not reused.

These generators are evaluation tasks only: data used to pretrain peftvision's default backbones must
come from elsewhere, or the linear-probe comparison would test on the pretraining distribution.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..ui import progress_bar
from .hub import cache_root
from .images import ArraySource
from .protocol import benchmark_aliases, hold_out, protocol_splits, whole
from .suite import SUITE, Arrays, BuiltinTask, register_task
from .task import Task

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")



# ----------------------------------------------------------------------------- suite API


def builtin_tasks(group: str | None = None, *, available_only: bool = True) -> list[str]:
    """Task names of the suite (or of one group); unavailable ones are logged once and left out."""
    names = []
    for name, task in SUITE.items():
        if group is not None and task.group != group:
            continue
        reason = task.requires()
        if reason and available_only:
            log.warning("skipping builtin:%s: %s", name, reason)
            continue
        names.append(name)
    return names


def unavailable(name: str) -> str | None:
    """Why builtin:<name> cannot be built on this machine, or None."""
    return _get(name).requires()


def _get(name: str) -> BuiltinTask:
    if name not in SUITE:
        raise DataError(f"unknown built-in task {name!r}; tasks: {', '.join(SUITE)} (or builtin:all)")
    return SUITE[name]


def generate(name: str, seed: int = 0) -> Arrays:
    """The arrays of a task, uncached. The default seed is the suite's; another seed gives another draw."""
    task = _get(name)
    reason = task.requires()
    if reason:
        raise DataError(f"builtin:{name} is not available: {reason}")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # independent streams per task
    arrays = task.make(rng)
    for key in ("train_x", "test_x"):
        assert arrays[key].dtype == np.uint8, (name, key)
    assert arrays["train_y"].max() < len(task.classes) and arrays["test_y"].max() < len(task.classes), name
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def cache_dir(name: str) -> Path:
    task = _get(name)
    return cache_root() / "builtin" / f"{name}-v{task.version}"


def materialize(name: str) -> Path:
    """The task's cache folder, generated on first use (temp folder + rename: never half-written)."""
    final = cache_dir(name)
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        start = time.perf_counter()
        with progress_bar(f"generating builtin:{name} (first use; cached in {final.parent})"):
            arrays = generate(name)
        seconds = time.perf_counter() - start
        for key, array in arrays.items():
            np.save(tmp / f"{key}.npy", array, allow_pickle=False)
        meta = {"task": name, "version": _get(name).version, "seconds": round(seconds, 2),
                "sizes": {k: list(v.shape) for k, v in arrays.items()}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists() and not (final / "meta.json").is_file():
            shutil.rmtree(final, ignore_errors=True)  # left by an interrupted copy, not by us
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # lost a race against another process: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_builtin(name: str, *, seed: int, max_test: int | None = None) -> Task:
    """builtin:<name> under the VTAB-1k protocol (the seed picks the 1,000 training images)."""
    task = _get(name)
    folder = materialize(name)
    try:
        train = whole(ArraySource(folder / "train_x.npy"), np.load(folder / "train_y.npy"))
        test = whole(ArraySource(folder / "test_x.npy"), np.load(folder / "test_y.npy"))
        len(train.source), len(test.source)
    except (OSError, ValueError) as e:
        raise DataError(f"damaged cache {folder} ({e}); delete the folder and it will be regenerated") from None
    splits, notes, meta = protocol_splits(train, test, seed=seed, max_test=max_test, name=f"builtin:{name}")
    meta["about_splits"] = {"test": "the task's test set"}
    benchmark_aliases(splits, meta)
    meta.update(version=task.version, cache=str(folder), about=task.about)
    return Task(f"builtin:{name}", task.group, task.classes, splits, tuple(notes), meta)


# ----------------------------------------------------------------------------- real data


@register_task("digits", "natural", [str(d) for d in range(10)])
def _digits(rng: np.random.Generator) -> Arrays:
    """scikit-learn's bundled handwritten digits, 8x8 gray, 1,797 images (1,000 train pool, 797 test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = np.rint(data.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    y = data.target.astype(np.int64)
    train, test = hold_out(y)
    return {"train_x": x[train], "train_y": y[train], "test_x": x[test], "test_y": y[test]}


def _fashion_missing() -> str | None:
    files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    if all((FASHION_MNIST_DIR / f).is_file() for f in files):
        return None
    return f"Fashion-MNIST not found in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)"


def _idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): magic, dims, then raw uint8."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@register_task(
    "fashion_mnist", "natural",
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    requires=_fashion_missing,
)
def _fashion_mnist(rng: np.random.Generator) -> Arrays:
    """Fashion-MNIST 28x28 gray: stratified 2,000 of the 60,000 train and 2,000 of the 10,000 test images."""
    from .protocol import stratified_choice

    out: Arrays = {}
    for part, prefix, n in (("train", "train", 2000), ("test", "t10k", 2000)):
        x = _idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
        y = _idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        keep = np.sort(stratified_choice(y, n, rng))
        out[f"{part}_x"], out[f"{part}_y"] = x[keep], y[keep]
    return out


from . import procedural  # noqa: E402,F401  (registers the six procedural tasks, after the real ones)
