"""Model selection: which epoch a run keeps, and which images decide it.

Keeping the best epoch on a validation set only helps when that set can tell epochs apart. On a few
dozen images one image moves top-1 by several points, more than late epochs differ by, so "best" is
noise; and when the set is carved out of the user's training images it also costs them training
data. Below `MIN_SELECTION_IMAGES` validation images a run therefore trains on every training image
and keeps its last epoch (what VTAB-1k's final runs do: train800val200, last epoch), which a cosine
schedule that ends at lr 0 makes a sound choice. Measured on a matrix of real photo sets from 60 to
800 training images (benchmarks/real_regimes.py, benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Smallest validation set whose best epoch is kept. At 200 images one image is 0.5 points and the
# standard error of a top-1 near 85% is 2.5 points; below it, selection picked noise in our matrix.
MIN_SELECTION_IMAGES = 200
KEEP = ("auto", "best", "last")


@dataclass(frozen=True)
class Selection:
    """What a run trains on, what it validates on each epoch, which epoch it keeps, and why."""

    train_split: str
    val_split: str | None
    keep: str  # "best" (on val_split) or "last"
    why: str  # one line for the summary and metrics.json


def choose_selection(task: Any, train_split: str, val_split: str | None, keep: str = "auto") -> Selection:
    """Resolve `val_split="auto"` and `keep="auto"` for `task` (the explicit values pass through).

    auto val: the source's own validation images (a `val/` folder, an hf: validation split, VTAB-1k's
    val200) are always evaluated; a slice carved from the training images only when it would hold at
    least MIN_SELECTION_IMAGES, else no validation and every training image trains. auto keep: the best
    epoch when the validation set has at least MIN_SELECTION_IMAGES images, else the last.
    """
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
    carved = bool(task.meta.get("val_carved"))
    if val_split == "auto":
        n_slice = len(task.split("val"))
        if carved and n_slice < MIN_SELECTION_IMAGES:
            train_split = "trainval" if train_split == "train" else train_split
            return Selection(
                train_split, None, "last",
                f"no validation folder, and a {n_slice}-image slice of the training images is too few to pick an "
                f"epoch on (< {MIN_SELECTION_IMAGES}): trained on all {len(task.split(train_split))}, last epoch kept",
            )
        val_split = "val"
    if val_split is None:
        return Selection(train_split, None, "last", "no validation split: the last epoch is kept")
    n_val = len(task.split(val_split))
    if keep == "auto":
        keep = "best" if n_val >= MIN_SELECTION_IMAGES else "last"
        why = (f"best epoch on {n_val} validation images" if keep == "best" else
               f"last epoch kept: {n_val} validation images are too few to pick an epoch on "
               f"(< {MIN_SELECTION_IMAGES}); val is still reported each epoch")
    else:
        why = f"{keep} epoch kept (--keep {keep}), val on {n_val} images"
    return Selection(train_split, val_split, keep, why)
