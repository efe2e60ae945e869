"""`vtab:<task>`: the 19 VTAB-1k tasks as the PETL papers' code lays them out on disk.

`<root>/<task>/{train800,val200,train800val200,test}.txt`, one `images/<split>/<idx>.jpg <label>` per
line, paths relative to `<root>/<task>/` (what NOAH's `data/vtab-source/get_vtab1k.py` writes). The
splits are the files: the seed does not change them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from .images import FileSource
from .protocol import benchmark_aliases, fixed_splits
from .task import Group, Split, Task

ROOT_ENV = "PEFTVISION_VTAB_ROOT"

# task folder -> (group, number of classes), in VTAB's usual order.
VTAB_TASKS: dict[str, tuple[Group, int]] = {
    "caltech101": ("natural", 102),
    "cifar": ("natural", 100),
    "dtd": ("natural", 47),
    "oxford_flowers102": ("natural", 102),
    "oxford_iiit_pet": ("natural", 37),
    "svhn": ("natural", 10),
    "sun397": ("natural", 397),
    "patch_camelyon": ("specialized", 2),
    "eurosat": ("specialized", 10),
    "resisc45": ("specialized", 45),
    "diabetic_retinopathy": ("specialized", 5),
    "clevr_count": ("structured", 8),
    "clevr_dist": ("structured", 6),
    "dmlab": ("structured", 6),
    "kitti": ("structured", 4),
    "dsprites_loc": ("structured", 16),
    "dsprites_ori": ("structured", 16),
    "smallnorb_azi": ("structured", 18),
    "smallnorb_ele": ("structured", 9),
}

# Names where they are short and certain (tfds label order); other tasks use the label index.
_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "svhn": tuple(str(i) for i in range(10)),
    "patch_camelyon": ("no tumor", "tumor"),
    "eurosat": (
        "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
        "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
    ),
    "diabetic_retinopathy": ("no DR", "mild", "moderate", "severe", "proliferative"),
    "clevr_count": tuple(str(n) for n in range(3, 11)),  # label = number of objects - 3
}

HOW_TO_GET = (
    "prepare VTAB-1k with the script of the NOAH repository (github.com/ZhangYuanhan-AI/NOAH, "
    "data/vtab-source/get_vtab1k.py) or V-PETL Bench, then set PEFTVISION_VTAB_ROOT (or pass the root) "
    "to the folder holding <task>/train800.txt"
)


def vtab_tasks(group: str | None = None) -> list[str]:
    """Task folder names, all 19 or those of one group."""
    return [t for t, (g, _) in VTAB_TASKS.items() if group is None or g == group]


def load_vtab(task: str, *, root: str | os.PathLike | None = None, max_test: int | None = None) -> Task:
    """One VTAB-1k task from its four list files."""
    name = f"vtab:{task}"
    if task not in VTAB_TASKS:
        raise DataError(f"unknown VTAB-1k task {task!r}; tasks: {', '.join(VTAB_TASKS)} (or vtab:all)")
    base = _task_dir(task, root)
    group, num_classes = VTAB_TASKS[task]
    lists = {}
    for split in ("train800", "val200", "test"):
        lists[split] = _read_list(base / f"{split}.txt", num_classes)
    union = base / "train800val200.txt"
    if union.is_file():
        lists["train800val200"] = _read_list(union, num_classes)
    else:  # the union is by definition train800 + val200
        lists["train800val200"] = tuple(a + b for a, b in zip(lists["train800"], lists["val200"]))  # type: ignore[assignment]

    splits = {}
    for split, (paths, labels) in lists.items():
        source = FileSource([base / p for p in paths])
        splits[split] = Split(source, np.arange(len(paths), dtype=np.int64), np.asarray(labels, dtype=np.int64))
    splits, notes, meta = fixed_splits(splits, max_test=max_test, name=name)
    for split in ("train800val200", "test"):  # the others are listed in the union (or are the union)
        _check_files(splits[split], base / f"{split}.txt")
    meta.update(root=str(base.parent), about_splits={"test": "test.txt"})
    benchmark_aliases(splits, meta)
    class_names = _CLASS_NAMES.get(task, tuple(str(i) for i in range(num_classes)))
    return Task(name, group, class_names, splits, tuple(notes), meta)


def _task_dir(task: str, root: str | os.PathLike | None) -> Path:
    root = root or os.environ.get(ROOT_ENV)
    if not root:
        raise DataError(f"vtab:{task} needs the VTAB-1k data, and no root is set: {HOW_TO_GET}")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"VTAB-1k root {base} does not exist: {HOW_TO_GET}")
    if not (base / task).is_dir():
        found = [t for t in VTAB_TASKS if (base / t).is_dir()]
        have = f"it has {', '.join(found)}" if found else "it holds no VTAB-1k task"
        raise DataError(f"VTAB-1k task folder {base / task} not found ({have}): {HOW_TO_GET}")
    return base / task


def _read_list(path: Path, num_classes: int) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise DataError(f"{path} not found; a VTAB-1k task folder needs train800.txt, val200.txt and test.txt: {HOW_TO_GET}")
    paths, labels = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{path}:{lineno}: expected '<image path> <label>', got {line.strip()!r}")
            label = int(parts[1])
            if not 0 <= label < num_classes:
                raise DataError(f"{path}:{lineno}: label {label} outside 0..{num_classes - 1} for this task")
            paths.append(parts[0])
            labels.append(label)
    if not paths:
        raise DataError(f"{path} lists no images")
    return paths, labels


def _check_files(split: Split, listed_in: Path) -> None:
    """Missing files fail now (one stat each); the 1,000 training images also get a header check."""
    source = split.source
    assert isinstance(source, FileSource)
    missing = [source.paths[i] for i in split.indices if not os.path.isfile(source.paths[i])]
    if missing:
        raise DataError(
            f"{len(missing)} image files listed in {listed_in} are missing (e.g. {missing[0]}); "
            f"re-run the VTAB-1k preparation"
        )
    if listed_in.stem == "train800val200":
        split.check()
