"""A task: labelled images split by the VTAB-1k protocol, whatever the source.

`Task` holds, per split, which rows of which image source belong to it and their labels; `Task.dataset`
turns one split into a torch Dataset. Sources differ only in how they fill this in (see `protocol.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch

from ..errors import DataError
from .images import ImageSource

Group = Literal["natural", "specialized", "structured"]
GROUPS: tuple[Group, ...] = ("natural", "specialized", "structured")  # VTAB's three task groups

# The user's data (train / val for model selection / trainval = both / test) and the VTAB-1k protocol
# (train on train800, pick hyper-parameters on val200, retrain on the union, report test); protocol.py.
SPLITS = ("train", "val", "trainval", "test", "train800", "val200", "train800val200")
Resize = Literal["crop", "squash"]


@dataclass(frozen=True)
class Split:
    """Rows `indices` of `source`, with their labels (0 .. num_classes-1)."""

    source: ImageSource
    indices: np.ndarray  # (N,) int64 rows of source
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.indices)

    def check(self) -> None:
        """Read every image's header (~0.1 ms each): fail at load, naming the file, rather than in a
        DataLoader worker an hour into training."""
        for i in self.indices:
            self.source.check(int(i))


@dataclass(frozen=True)
class Task:
    """One image classification task under the VTAB-1k protocol.

    Attributes:
        name: the spec it was loaded from ("builtin:digits", "vtab:cifar", ...).
        group: VTAB group, for per-group averages.
        class_names: one per class, index = label.
        splits: "train800", "val200", "train800val200", "test".
        notes: human-readable deviations from the protocol (a scaled-down pool, a held-out test set, ...).
        meta: the same facts for programs (pool sizes, seed, "scaled_down", "about" per split, ...).
        resize: how evaluation preprocessing fits an image to the model: "crop" (the model's own eval
            transform: resize, then centre crop; natural photos) or "squash" (the whole image resized
            to the input size: VTAB-1k's rule, for tasks about where things are).
    """

    name: str
    group: Group
    class_names: tuple[str, ...]
    splits: Mapping[str, Split]
    notes: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    resize: Resize = "squash"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}

    def split(self, name: str) -> Split:
        try:
            return self.splits[name]
        except KeyError:
            raise DataError(f"{self.name} has no split {name!r}; splits: {', '.join(self.splits)}") from None

    def about(self, split: str) -> str:
        """Which images a split holds, in words, for run summaries: "val/ (no test split: it is reported)"."""
        self.split(split)
        return (self.meta.get("about_splits") or {}).get(split, split)

    def labels(self, split: str) -> np.ndarray:
        return self.split(split).labels.copy()

    def indices(self, split: str) -> np.ndarray:
        """Source rows of a split: what makes two draws the same draw."""
        return self.split(split).indices.copy()

    def dataset(self, split: str, transform: Callable[[Any], Any] | None = None) -> TaskDataset:
        """A torch Dataset of (transform(RGB image), label); the PIL image itself when transform is None."""
        return TaskDataset(self.split(split), transform)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes().items())
        return f"Task({self.name!r}, group={self.group}, classes={self.num_classes}, {sizes})"


class TaskDataset(torch.utils.data.Dataset):
    """One split; decoding and the transform run in `__getitem__`, i.e. in DataLoader workers."""

    def __init__(self, split: Split, transform: Callable[[Any], Any] | None = None) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, k: int) -> tuple[Any, int]:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        image = self.split.source.load(int(self.split.indices[k]))
        return (self.transform(image) if self.transform is not None else image), int(self.split.labels[k])

    @property
    def labels(self) -> np.ndarray:
        return self.split.labels
