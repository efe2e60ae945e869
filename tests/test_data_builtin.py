"""The built-in offline suite: sizes, determinism to the byte, the on-disk cache, label semantics."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from peftvision.data import builtin, list_tasks, load_task, procedural
from peftvision.errors import DataError

PROCEDURAL = ["shape_loc", "shape_ori", "count", "closest_dist", "cells", "landcover"]


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    # One cache per session, set before any module fixture generates data: built-in tasks are
    # generated once, and never into the user's ~/.cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTVISION_CACHE", str(tmp_path_factory.getbasetemp() / "peftvision-cache"))
        yield


def digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode() + arrays[key].tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", PROCEDURAL)
def test_generation_is_deterministic(name, monkeypatch):
    monkeypatch.setattr(procedural, "N_TRAIN", 24)  # same code path, fewer images: fast
    monkeypatch.setattr(procedural, "N_TEST", 16)
    np.random.seed(123)  # global numpy state must not matter
    first = builtin.generate(name, seed=0)
    np.random.seed(456)
    assert digest(builtin.generate(name, seed=0)) == digest(first)
    assert digest(builtin.generate(name, seed=1)) != digest(first)
    assert first["train_x"].shape == (24, 32, 32, 3) and first["test_x"].shape == (16, 32, 32, 3)
    assert first["train_x"].std() > 10  # something was drawn


@pytest.fixture(scope="module")
def suite() -> dict[str, str]:
    """Every available task, generated once into the test cache (this is the <30 s budget per task)."""
    return {name: str(builtin.materialize(name)) for name in builtin.builtin_tasks()}


def test_suite_sizes_groups_and_times(suite):
    assert {"digits", *PROCEDURAL} <= set(suite)
    groups = {builtin.SUITE[n].group for n in suite}
    assert groups == {"natural", "specialized", "structured"}
    for name, folder in suite.items():
        meta = json.loads(open(f"{folder}/meta.json").read())
        assert meta["seconds"] < 30, (name, meta["seconds"])
        x, y = np.load(f"{folder}/train_x.npy"), np.load(f"{folder}/train_y.npy")
        tx, ty = np.load(f"{folder}/test_x.npy"), np.load(f"{folder}/test_y.npy")
        assert x.dtype == tx.dtype == np.uint8 and len(x) == len(y) >= 1000 and len(tx) == len(ty) >= 500, name
        k = len(builtin.SUITE[name].classes)
        assert set(np.unique(y)) == set(range(k)) == set(np.unique(ty)), name
        assert np.bincount(y).min() >= 0.8 * len(y) / k, name  # balanced enough for accuracy to mean something
        task = load_task(f"builtin:{name}", seed=0, max_test=500)
        assert task.sizes() == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 500,
                                "train": 800, "val": 200, "trainval": 1000}, name
        assert task.num_classes == k and task.name == f"builtin:{name}"


def test_cache_holds_the_generated_bytes(suite):
    fresh = builtin.generate("landcover")
    cached = {k: np.load(f"{suite['landcover']}/{k}.npy") for k in fresh}
    assert digest(cached) == digest(fresh)
    assert builtin.materialize("landcover") == builtin.cache_dir("landcover")  # reused, not regenerated


def test_cache_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTVISION_CACHE", str(tmp_path))
    broken = builtin.cache_dir("digits")
    broken.mkdir(parents=True)
    (broken / "train_x.npy").write_bytes(b"half a file")  # an interrupted copy, no meta.json
    folder = builtin.materialize("digits")
    assert (folder / "meta.json").is_file() and np.load(folder / "train_x.npy").shape == (1000, 8, 8)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folders left behind
    (folder / "test_y.npy").write_bytes(b"junk")
    with pytest.raises(DataError, match="damaged cache .* delete the folder"):
        load_task("builtin:digits")


def test_labels_mean_what_they_say(suite):
    # shape_loc: the brightest blob's column moves right with the label.
    x, y = np.load(f"{suite['shape_loc']}/train_x.npy").astype(float).sum(-1), np.load(f"{suite['shape_loc']}/train_y.npy")
    fg = np.clip(x - np.median(x, axis=(1, 2), keepdims=True) - 60, 0, None)
    centre = (fg.sum(1) * np.arange(32)).sum(1) / fg.sum((1, 2))
    per_class = [centre[y == k].mean() for k in range(8)]
    assert np.all(np.diff(per_class) > 1.5), per_class
    # count: more objects, more pixels away from the backdrop colour.
    x, y = np.load(f"{suite['count']}/train_x.npy").astype(float), np.load(f"{suite['count']}/train_y.npy")
    chroma = (x.max(-1) - x.min(-1) > 60).sum((1, 2))
    per_class = [chroma[y == k].mean() for k in range(8)]
    assert np.all(np.diff(per_class) > 0), per_class


def test_fashion_mnist_when_installed(suite):
    reason = builtin.unavailable("fashion_mnist")
    if reason:
        assert "fashion_mnist" not in suite and "apt-get install dataset-fashion-mnist" in reason
        pytest.skip(reason)
    x = np.load(f"{suite['fashion_mnist']}/train_x.npy")
    assert x.shape == (2000, 28, 28) and "builtin:fashion_mnist" in list_tasks("builtin:natural")
    task = load_task("builtin:fashion_mnist")
    assert task.class_names[9] == "Ankle boot" and task.sizes()["test"] == 2000
