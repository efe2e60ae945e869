"""The VTAB-1k splits, drawn from whatever pools a source has.

Rules, in order (all draws stratified by class, with numpy Generators, so they are reproducible):
  1. Test: the source's test pool; without one, a fixed hold-out from the training pool of
     max(20 %, everything beyond 1,000 images). `max_test` keeps a stratified subset. Test sets use a
     fixed seed, never the run's: runs with different seeds are scored on the same images.
  2. train800val200: 1,000 images of the training pool drawn with the run's seed, split 800 / 200.
     A smaller pool is used whole and split 80 / 20; the task's notes and meta say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .images import ImageSource
from .task import Split

TRAIN, VAL = 800, 200
TEST_SEED = 0x7E57  # fixed: hold-outs and test caps must not move with the run's seed


@dataclass(frozen=True)
class Pool:
    """Candidate images for a role (train or test): rows of `source` and their labels."""

    source: ImageSource
    rows: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> Split:
        return Split(self.source, self.rows[positions], self.labels[positions])


def whole(source: ImageSource, labels: np.ndarray) -> Pool:
    labels = np.asarray(labels, dtype=np.int64)
    return Pool(source, np.arange(len(labels), dtype=np.int64), labels)


def stratified_choice(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` positions into `labels`, each class in proportion to its frequency, in random order."""
    if not 0 <= n <= len(labels):
        raise ValueError(f"cannot draw {n} of {len(labels)}")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = counts * (n / len(labels))
    take = np.floor(quota).astype(np.int64)
    # Largest remainders get the leftover places; ties go to the smaller class index (stable sort).
    take[np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]] += 1
    picked = [rng.permutation(np.flatnonzero(inverse == k))[:t] for k, t in enumerate(take)]
    return rng.permutation(np.concatenate(picked)).astype(np.int64)


def hold_out(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train, test) positions for a source without a test split: the training side keeps at
    most 1,000 images and at least 80 %."""
    n = len(labels)
    n_test = max(round(0.2 * n), n - (TRAIN + VAL))
    test = stratified_choice(labels, n_test, np.random.default_rng(TEST_SEED))
    train = np.setdiff1d(np.arange(n), test)
    return train, np.sort(test)


def protocol_splits(
    train: Pool,
    test: Pool | None,
    *,
    seed: int,
    max_test: int | None = None,
    name: str = "",
) -> tuple[dict[str, Split], list[str], dict]:
    """The four VTAB-1k splits plus notes (for people) and meta (for programs) on what was done."""
    notes: list[str] = []
    meta: dict = {"seed": seed}
    if test is None:
        if len(train) < 3:
            raise DataError(f"{name}: only {len(train)} labelled images; need at least 3 (train, val, test)")
        tr, te = hold_out(train.labels)
        notes.append(f"no test split: {len(te)} of {len(train)} images held out as test (fixed, seed-independent)")
        train, test = Pool(train.source, train.rows[tr], train.labels[tr]), Pool(train.source, train.rows[te], train.labels[te])
        meta["test_held_out"] = True
    if len(train) < 2:
        raise DataError(f"{name}: only {len(train)} training images; need at least 2 (train800 and val200)")
    if len(test) == 0:
        raise DataError(f"{name}: the test split is empty")

    n = min(TRAIN + VAL, len(train))
    n_val = max(1, round(n * VAL / (TRAIN + VAL)))
    rng = np.random.default_rng(seed)
    chosen = stratified_choice(train.labels, n, rng)
    val = stratified_choice(train.labels[chosen], n_val, rng)
    is_val = np.zeros(n, dtype=bool)
    is_val[val] = True
    if n < TRAIN + VAL:
        notes.append(f"only {len(train)} training images: train800/val200 scaled down to {n - n_val}/{n_val}")
    meta.update(train_pool=len(train), scaled_down=n < TRAIN + VAL)

    test_positions = np.random.default_rng(TEST_SEED).permutation(len(test))
    if max_test is not None and len(test) > max_test:
        test_positions = stratified_choice(test.labels, max_test, np.random.default_rng(TEST_SEED))
        notes.append(f"test capped at {max_test} of {len(test)} images (stratified, fixed)")
    meta.update(test_pool=len(test))

    splits = {
        "train800": train.take(chosen[~is_val]),
        "val200": train.take(chosen[is_val]),
        "train800val200": train.take(chosen),
        "test": test.take(test_positions),
    }
    return splits, notes, meta


def check_max_test(max_test: int | None) -> None:
    if max_test is not None and (not isinstance(max_test, int) or max_test < 1):
        raise DataError(f"max_test must be a positive integer, got {max_test!r}")


def fixed_splits(
    splits: dict[str, Split], *, max_test: int | None, name: str
) -> tuple[dict[str, Split], list[str], dict]:
    """Splits a source already fixes (VTAB-1k lists): only the optional test cap applies."""
    notes: list[str] = []
    test = splits["test"]
    if max_test is not None and len(test) > max_test:
        keep = stratified_choice(test.labels, max_test, np.random.default_rng(TEST_SEED))
        splits = {**splits, "test": Split(test.source, test.indices[keep], test.labels[keep])}
        notes.append(f"test capped at {max_test} of {len(test)} images (stratified, fixed)")
    if len(splits["train800val200"]) < TRAIN + VAL:
        notes.append(f"{name}: train800val200 has {len(splits['train800val200'])} images, not 1,000")
    return splits, notes, {"fixed_splits": True, "test_pool": len(test)}
