"""The registry of built-in tasks: what each is and how to make its arrays (`builtin.py` caches and loads them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .task import Group

Arrays = dict[str, np.ndarray]  # train_x, train_y, test_x, test_y


@dataclass(frozen=True)
class BuiltinTask:
    """One task of the suite: how to make its arrays, and what it needs to exist."""

    name: str
    group: Group
    classes: tuple[str, ...]
    make: Callable[[np.random.Generator], Arrays]
    about: str
    version: int = 1
    requires: Callable[[], str | None] = lambda: None  # reason it cannot be built here, or None


SUITE: dict[str, BuiltinTask] = {}


def register_task(name: str, group: Group, classes: list[str] | tuple[str, ...], version: int = 1, requires=None):
    def register(make: Callable[[np.random.Generator], Arrays]) -> Callable[[np.random.Generator], Arrays]:
        about = (make.__doc__ or "").strip().splitlines()[0]
        SUITE[name] = BuiltinTask(name, group, tuple(classes), make, about, version, requires or (lambda: None))
        return make

    return register
