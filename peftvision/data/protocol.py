"""How a task's splits are drawn from whatever pools a source has.

Two families of splits, both always present:

- The user's data, all of it (`train`, `val`, `trainval`, `test`): what `finetune` uses by default
  on `imagefolder:` and `hf:` sources.
  1. test: the source's test pool; without one, its validation pool (`train/` + `val/` folders report
     on `val/`, as torchvision's ImageFolder layout and the PyTorch transfer-learning tutorial do);
     without either, a fixed stratified hold-out of 20 % of the training pool.
  2. val (model selection): the source's validation pool when it also has a test pool; otherwise a
     stratified 10 % slice of the training pool drawn with the run's seed. `train` is the rest.
  3. trainval: train + val, every image that is not test.
- The VTAB-1k protocol (`train800`, `val200`, `train800val200`, `test`): 1,000 images of `trainval`
  drawn with the run's seed, split 800 / 200 (a smaller pool is used whole and split 80 / 20; the
  notes say so). `compare` uses these on every source. Built-in and `vtab:` tasks are benchmark tasks
  whose `train` / `val` / `trainval` *are* train800 / val200 / train800val200.

All draws are stratified by class, with numpy Generators, so they are reproducible. Test sets and
hold-outs use a fixed seed, never the run's: runs with different seeds are scored on the same
images. `max_test` keeps a fixed stratified subset of the test set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .images import ImageSource
from .task import Split

TRAIN, VAL = 800, 200
TEST_SEED = 0x7E57  # fixed: hold-outs and test caps must not move with the run's seed
HOLD_OUT = 0.2  # test share held out of a source that has neither a test nor a validation split
VAL_STREAM = 0xCA4E  # the carve's own random stream: the VTAB-1k draws stay what they were
VAL_FRACTION = 0.1  # model-selection slice carved from the training pool (more would cost training images)


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
    """Fixed (train, test) positions in the VTAB-1k manner (built-in tasks): the training side keeps
    at most 1,000 images and at least 80 %."""
    n = len(labels)
    n_test = max(round(0.2 * n), n - (TRAIN + VAL))
    test = stratified_choice(labels, n_test, np.random.default_rng(TEST_SEED))
    train = np.setdiff1d(np.arange(n), test)
    return train, np.sort(test)


def _subset(pool: Pool, positions: np.ndarray) -> Pool:
    return Pool(pool.source, pool.rows[positions], pool.labels[positions])


def protocol_splits(
    train: Pool,
    test: Pool | None,
    *,
    seed: int,
    val: Pool | None = None,
    max_test: int | None = None,
    name: str = "",
    names: dict[str, str] | None = None,
) -> tuple[dict[str, Split], list[str], dict]:
    """Every split of a task (see the module docstring), notes for people and meta for programs.

    Args:
        train, val, test: the source's pools; `val` must share `train`'s source (trainval is their union).
        names: how to call each pool in descriptions ({"train": "train/", "val": "val/", ...}).
    """
    names = {"train": "the training pool", "val": "the validation pool", "test": "the test pool", **(names or {})}
    notes: list[str] = []
    about: dict[str, str] = {}
    meta: dict = {"seed": seed}
    if val is not None and len(val) == 0:
        val = None
    if test is None and val is not None:  # train/ + val/: val/ is what the user reports on
        test, val = val, None
        about["test"] = f"{names['val']} (there is no test split, so it is what is reported)"
        meta["test_from_val"] = True
    elif test is None:
        if len(train) < 3:
            raise DataError(f"{name}: only {len(train)} labelled images; need at least 3 (train, val, test)")
        n_test = max(1, round(HOLD_OUT * len(train)))
        te = np.sort(stratified_choice(train.labels, n_test, np.random.default_rng(TEST_SEED)))
        tr = np.setdiff1d(np.arange(len(train)), te)
        about["test"] = f"held out of {names['train']}: {HOLD_OUT:.0%} per class, the same for every seed"
        train, test = _subset(train, tr), _subset(train, te)
        meta["test_held_out"] = True
    else:
        about["test"] = names["test"]
    if len(train) < 2:
        raise DataError(f"{name}: only {len(train)} training images; need at least 2 (train and val)")
    if len(test) == 0:
        raise DataError(f"{name}: the test split is empty")

    # trainval: every image that is not test
    if val is not None:
        if val.source is not train.source:
            raise ValueError("val and train pools must share one source")
        trainval = Pool(train.source, np.concatenate([train.rows, val.rows]), np.concatenate([train.labels, val.labels]))
    else:
        trainval = train

    # ---- the VTAB-1k protocol: 1,000 images of trainval, 800 / 200
    rng = np.random.default_rng(seed)
    n = min(TRAIN + VAL, len(trainval))
    n_vtab_val = max(1, round(n * VAL / (TRAIN + VAL)))
    chosen = stratified_choice(trainval.labels, n, rng)
    vtab_val = stratified_choice(trainval.labels[chosen], n_vtab_val, rng)
    is_val = np.zeros(n, dtype=bool)
    is_val[vtab_val] = True
    if n < TRAIN + VAL:
        notes.append(f"VTAB-1k splits: only {len(trainval)} training images, train800/val200 scaled down to "
                     f"{n - n_vtab_val}/{n_vtab_val}")
    meta.update(train_pool=len(trainval), scaled_down=n < TRAIN + VAL)

    # ---- the user's data: train / val / trainval
    if val is not None:
        user = {"train": train.take(np.arange(len(train))), "val": val.take(np.arange(len(val)))}
        about.update(train=names["train"], val=names["val"])
        meta["val_carved"] = False
    else:
        n_val = max(1, round(VAL_FRACTION * len(train)))
        carved = stratified_choice(train.labels, n_val, np.random.default_rng([seed, VAL_STREAM]))
        in_val = np.zeros(len(train), dtype=bool)
        in_val[carved] = True
        user = {"train": train.take(np.flatnonzero(~in_val)), "val": train.take(np.sort(carved))}
        about.update(train=f"{names['train']} except the val slice",
                     val=f"{VAL_FRACTION:.0%} of {names['train']} per class, drawn with the run's seed")
        meta["val_carved"] = True  # the val slice costs training images: the selection policy weighs that
    user["trainval"] = trainval.take(np.arange(len(trainval)))
    about["trainval"] = "train + val: every image that is not test"

    test_positions = np.random.default_rng(TEST_SEED).permutation(len(test))
    if max_test is not None and len(test) > max_test:
        test_positions = stratified_choice(test.labels, max_test, np.random.default_rng(TEST_SEED))
        notes.append(f"test capped at {max_test} of {len(test)} images (stratified, fixed)")
        about["test"] += f", capped at {max_test} (stratified, fixed)"
    meta.update(test_pool=len(test))

    splits = {
        **user,
        "train800": trainval.take(chosen[~is_val]),
        "val200": trainval.take(chosen[is_val]),
        "train800val200": trainval.take(chosen),
        "test": test.take(test_positions),
    }
    meta["about_splits"] = about
    return splits, notes, meta


def benchmark_aliases(splits: dict[str, Split], meta: dict) -> None:
    """Benchmark tasks (built-in, vtab:) are VTAB-1k tasks: train / val / trainval are its splits."""
    for alias, split in (("train", "train800"), ("val", "val200"), ("trainval", "train800val200")):
        splits[alias] = splits[split]
    meta["val_carved"] = False  # val200 is the protocol's own
    meta["about_splits"] = {"train": "train800 (VTAB-1k)", "val": "val200 (VTAB-1k)",
                     "trainval": "train800val200 (VTAB-1k)", "test": meta.get("about_splits", {}).get("test", "the test set")}


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
    return splits, notes, {"fixed_splits": True, "test_pool": len(test), "val_carved": False}
