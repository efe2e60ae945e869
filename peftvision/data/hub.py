"""`hf:` specs through HF `datasets`.

`hf:<repo_id>[:<config>]` loads a hub dataset (online, or from the local HF cache), and `hf:<dir>` a
directory written by `save_to_disk`. The dataset's own train / validation / test splits become the
task's roles (see protocol.py): train + validation without test reports on validation.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import DataError
from .folders import VAL_NAMES
from .images import HFSource
from .protocol import Pool, protocol_splits, whole
from .task import Group, Task

LABEL_NAMES = ("label", "labels", "fine_label", "class", "target", "y")  # tried in order when no ClassLabel


def cache_root() -> Path:
    """peftvision's cache: $PEFTVISION_CACHE, else ~/.cache/peftvision."""
    return Path(os.environ.get("PEFTVISION_CACHE") or Path.home() / ".cache" / "peftvision").expanduser()


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars from `datasets` while we load (it would print one per split)."""
    from datasets.utils import logging as dlog

    was_enabled = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            dlog.enable_progress_bar()


# ----------------------------------------------------------------------------- hf:


def load_hf(
    ref: str,
    *,
    seed: int,
    max_test: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    group: Group = "natural",
) -> Task:
    """A hub dataset or a `save_to_disk` directory as a VTAB-1k task."""
    name = f"hf:{ref}"
    return _task_from_splits(name, _open_hf(ref), seed, max_test, image_column, label_column, group)


def _open_hf(ref: str) -> dict[str, Any]:
    import datasets

    path = Path(ref).expanduser()
    if path.is_dir():
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        try:
            with _quiet_datasets():
                loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
        except Exception as e:  # noqa: BLE001 - any failure here is a bad dataset directory
            raise DataError(f"cannot load hf:{ref} ({_first_line(e)}): expected a directory written by save_to_disk") from None
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if ref.startswith(("/", "./", "../", "~")):
        raise DataError(f"hf:{ref}: no such directory")
    repo, _, config = ref.partition(":")
    if not repo:
        raise DataError("hf: needs a dataset, e.g. hf:cifar10, hf:user/name:config or hf:<dir made by save_to_disk>")
    try:
        with _quiet_datasets():
            loaded = datasets.load_dataset(repo, config or None)
    except Exception as e:  # noqa: BLE001 - network, missing repo, missing config: all user-facing
        raise DataError(
            f"cannot load hf:{ref} from the Hugging Face hub ({_first_line(e)}); check the name, "
            f"or offline use hf:<dir written by save_to_disk> or imagefolder:<dir>"
        ) from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _pick_columns(features: Any, image_column: str | None, label_column: str | None, name: str) -> tuple[str, str]:
    """The image column (an `Image` feature) and the label column (a ClassLabel, else an int/str column)."""
    import datasets

    columns = ", ".join(features) or "none"
    for given, what in ((image_column, "image_column"), (label_column, "label_column")):
        if given is not None and given not in features:
            raise DataError(f"{name} has no column {given!r} ({what}); columns: {columns}")
    if image_column is None:
        image_column = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
        if image_column is None:
            raise DataError(f"{name} has no image column (columns: {columns}); name one with image_column=...")
    if label_column is None:
        candidates = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        candidates += [c for c in LABEL_NAMES if _is_scalar(features.get(c), ints_only=False)]
        candidates += [c for c, f in features.items() if _is_scalar(f, ints_only=True)]
        label_column = next((c for c in candidates if c != image_column), None)
        if label_column is None:
            raise DataError(
                f"{name} has no label column (a ClassLabel or integer column; columns: {columns}); "
                f"name one with label_column=..."
            )
    return image_column, label_column


def _is_scalar(feature: Any, ints_only: bool) -> bool:
    import datasets

    if not isinstance(feature, datasets.Value):
        return False
    return feature.dtype.startswith(("int", "uint")) or (not ints_only and feature.dtype in ("string", "large_string"))


def _column(ds: Any, column: str) -> np.ndarray:
    """One column as numpy, without decoding the others (reading labels must not decode every image)."""
    if not len(ds):
        return np.zeros(0, dtype=np.int64)
    return np.asarray(ds.select_columns([column]).with_format("numpy")[:][column])


def _class_names(feature: Any, raw: list[np.ndarray], name: str, column: str) -> tuple[tuple[str, ...], list[np.ndarray]]:
    """Class names and labels 0..K-1, from a ClassLabel, or from the values of an int or string column."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names), [r.astype(np.int64) for r in raw]
    values = np.concatenate(raw)
    if values.dtype.kind in "iu":
        values = values[values >= 0]  # -1 marks unlabelled rows (hub test splits)
    if len(values) == 0:
        raise DataError(f"{name}: column {column!r} holds no labels")
    if values.dtype.kind not in "iuUSO":
        raise DataError(f"{name}: label column {column!r} is {values.dtype}, not integers or strings; pass label_column=")
    uniq = np.unique(values)
    if uniq.dtype.kind in "iu" and np.array_equal(uniq, np.arange(len(uniq))):
        return tuple(str(v) for v in uniq), [r.astype(np.int64) for r in raw]
    lookup = {v: i for i, v in enumerate(uniq.tolist())}
    mapped = [np.array([lookup.get(v, -1) for v in r.tolist()], dtype=np.int64) for r in raw]
    return tuple(str(v) for v in uniq), mapped


def _task_from_splits(
    name: str,
    splits: dict[str, Any],
    seed: int,
    max_test: int | None,
    image_column: str | None,
    label_column: str | None,
    group: Group,
    notes: tuple[str, ...] = (),
) -> Task:
    import datasets

    if not splits:
        raise DataError(f"{name} has no splits")
    train_key = "train" if "train" in splits else (next(iter(splits)) if len(splits) == 1 else None)
    if train_key is None:
        raise DataError(f"{name} has splits {', '.join(splits)} but none named train")
    features = splits[train_key].features
    image_column, label_column = _pick_columns(features, image_column, label_column, name)
    val_key = next((k for k in VAL_NAMES if k in splits), None)
    roles = {"train": train_key, "validation": val_key, "test": "test" if "test" in splits else None}
    used = {role: splits[key] for role, key in roles.items() if key is not None}
    for role, ds in used.items():
        missing = [c for c in (image_column, label_column) if c not in ds.features]
        if missing:
            raise DataError(f"{name}: split {roles[role]} has no column {missing[0]!r}")

    class_names, labels = _class_names(
        features[label_column], [_column(ds, label_column) for ds in used.values()], name, label_column
    )
    labels_by_role = dict(zip(used, labels))
    notes = list(notes)
    val = None
    if "validation" in used:  # one source for train + validation: trainval is their union
        train_ds = datasets.concatenate_datasets([used["train"], used["validation"]])
        n_train = len(used["train"])
        both = _labelled(whole(HFSource(train_ds, image_column, f"{name} split {train_key}+{val_key}"),
                               np.concatenate([labels_by_role["train"], labels_by_role["validation"]])))
        in_train = both.rows < n_train
        train = Pool(both.source, both.rows[in_train], both.labels[in_train])
        val = Pool(both.source, both.rows[~in_train], both.labels[~in_train])
    else:
        train = _labelled(whole(HFSource(used["train"], image_column, f"{name} split {train_key}"), labels_by_role["train"]))
    if len(train) == 0:
        raise DataError(f"{name}: the train split has no labelled images")
    test = None
    if "test" in used:
        test = _labelled(whole(HFSource(used["test"], image_column, f"{name} split test"), labels_by_role["test"]))
        if len(test) == 0:
            notes.append("the test split has no labels: it is not used")
            test = None
    split_map, more_notes, meta = protocol_splits(
        train, test, val=val, seed=seed, max_test=max_test, name=name,
        names={"train": f"split {train_key}", "val": f"split {val_key}", "test": "split test"},
    )
    split_map["trainval"].check()
    meta.update(image_column=image_column, label_column=label_column)
    return Task(name, group, class_names, split_map, tuple(notes + more_notes), meta, resize="crop")


def _labelled(pool: Pool) -> Pool:
    keep = pool.labels >= 0
    return pool if keep.all() else Pool(pool.source, pool.rows[keep], pool.labels[keep])
