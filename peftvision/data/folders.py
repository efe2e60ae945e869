"""`imagefolder:<dir>`: `dir/{train,val,test}/<class>/...` or `dir/<class>/...`, as torchvision's ImageFolder.

Only folder names decide splits and classes. HF `datasets`' folder loader is not used here: it also
infers splits from *file* names (1,000 photos named like `bullet_train.jpg`, `valley.jpg` loaded as one
image) and does not follow split folders that are symbolic links. We walk the tree ourselves
(following links), so the labels are the class folder names in sorted order, as in torchvision.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from .images import IMAGE_EXTENSIONS, FileSource
from .protocol import Pool, protocol_splits
from .task import Group, Task

VAL_NAMES = ("validation", "valid", "val", "dev")
SPLIT_DIRS = ("train", "test", *VAL_NAMES)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))  # is_dir follows links


def _images_under(folder: Path) -> list[str]:
    """Image files anywhere below `folder`, links followed, hidden files and folders skipped, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _split_folders(root: Path, name: str) -> dict[str, Path]:
    """{"train": ..., "val": ..., "test": ...} for the split folders present; {} for a folder of classes."""
    found: dict[str, Path] = {}
    for d in _visible_dirs(root):
        role = "val" if d.name.lower() in VAL_NAMES else d.name.lower() if d.name.lower() in SPLIT_DIRS else None
        if role is None:
            continue
        if role in found:
            raise DataError(f"{name} has two validation folders ({found[role].name}/, {d.name}/); keep one")
        found[role] = d
    if found and "train" not in found:
        raise DataError(f"{name} has split folders ({', '.join(p.name for p in found.values())}) but no train/")
    return found


def _classes(folder: Path, name: str) -> dict[str, list[str]]:
    """{class folder name: its image files}, with the layout checked."""
    loose = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if loose:
        raise DataError(
            f"{name}: images directly in {folder} (e.g. {loose[0]}); put them in one folder per class: "
            f"{folder}/<class>/{loose[0]}"
        )
    classes = {d.name: _images_under(d) for d in _visible_dirs(folder)}
    if not classes:
        raise DataError(f"{name}: {folder} has no class folders; expected {folder}/<class>/*.jpg|png")
    for cls, files in classes.items():
        if not files:
            raise DataError(f"{name}: empty class folder {folder / cls}; add images or remove the folder")
    return classes


def load_imagefolder(path: str, *, seed: int, max_test: int | None = None, group: Group = "natural") -> Task:
    """`path/<split>/<class>/*` (splits train, val, test) or `path/<class>/*` as a task (see protocol.py)."""
    name = f"imagefolder:{path}"
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{name}: no such folder")
    split_dirs = _split_folders(root, name)
    per_split = {role: _classes(d, name) for role, d in split_dirs.items()} or {"train": _classes(root, name)}
    class_names = tuple(per_split["train"])
    for role, classes in per_split.items():
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise DataError(
                f"{name}: {split_dirs[role].name}/ has class folder(s) {', '.join(unknown)} that train/ lacks; "
                f"every class needs training images"
            )
    paths: list[str] = []
    labels: list[int] = []
    rows: dict[str, np.ndarray] = {}
    for role, classes in per_split.items():
        start = len(paths)
        for label, cls in enumerate(class_names):
            files = classes.get(cls, [])
            paths += files
            labels += [label] * len(files)
        rows[role] = np.arange(start, len(paths), dtype=np.int64)
    source = FileSource(paths)
    all_labels = np.asarray(labels, dtype=np.int64)
    pools = {role: Pool(source, r, all_labels[r]) for role, r in rows.items()}
    names = {role: f"{split_dirs[role].name}/" if split_dirs else "the class folders" for role in pools}
    splits, notes, meta = protocol_splits(
        pools["train"], pools.get("test"), val=pools.get("val"), seed=seed, max_test=max_test, name=name, names=names,
    )
    if not split_dirs:
        notes.insert(0, "no split folders: test held out of the class folders")
    splits["trainval"].check()
    meta.update(root=str(root), split_folders=sorted(d.name for d in split_dirs.values()))
    return Task(name, group, class_names, splits, tuple(notes), meta, resize="crop")
