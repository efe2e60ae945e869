"""Dataset spec strings: `builtin:<task>`, `vtab:<task>`, `imagefolder:<path>`, `hf:<repo or dir>[:<config>]`."""

from __future__ import annotations

import os
from typing import Any

from ..errors import DataError
from .protocol import check_max_test
from .task import GROUPS, Task

KINDS = ("builtin", "vtab", "imagefolder", "hf")
_USAGE = "builtin:<task>, vtab:<task>, imagefolder:<path> or hf:<repo_id or save_to_disk dir>[:<config>]"


def _parse(spec: str) -> tuple[str, str]:
    kind, sep, rest = spec.strip().partition(":")
    if not sep or kind not in KINDS:
        raise DataError(f"unknown dataset spec {spec!r}: expected {_USAGE}")
    if not rest:
        raise DataError(f"dataset spec {spec!r} names no task: expected {_USAGE}")
    return kind, rest


def load_task(
    spec: str,
    *,
    seed: int = 0,
    max_test: int | None = None,
    vtab_root: str | os.PathLike | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    group: str | None = None,
) -> Task:
    """Resolve one spec to a task with the VTAB-1k splits (train800, val200, train800val200, test).

    Args:
        spec: e.g. "builtin:digits", "vtab:cifar", "imagefolder:~/pets", "hf:user/name:config".
        seed: picks the 1,000 training images where the source does not fix them; tests never move.
        max_test: keep a fixed stratified subset of at most this many test images.
        vtab_root: folder of the VTAB-1k tasks (default: $PEFTVISION_VTAB_ROOT).
        image_column, label_column: hf: columns, when auto-detection picks the wrong ones.
        group: VTAB group of an hf: / imagefolder: task (default natural), for per-group averages.
    """
    kind, rest = _parse(spec)
    check_max_test(max_test)
    if rest in ("all", *GROUPS) and kind in ("builtin", "vtab"):
        raise DataError(f"{spec} names several tasks; load them one at a time (list_tasks({spec!r}) expands it)")
    if group is not None and group not in GROUPS:
        raise DataError(f"unknown group {group!r}; groups: {', '.join(GROUPS)}")
    if group is not None and kind in ("builtin", "vtab"):
        raise DataError(f"{kind}: tasks have a fixed group; group= applies to hf: and imagefolder:")
    if (image_column or label_column) and kind != "hf":
        raise DataError("image_column / label_column apply to hf: specs only")

    if kind == "builtin":
        from .builtin import load_builtin

        return load_builtin(rest, seed=seed, max_test=max_test)
    if kind == "vtab":
        from .vtab import load_vtab

        return load_vtab(rest, root=vtab_root, max_test=max_test)
    if kind == "imagefolder":
        from .folders import load_imagefolder

        return load_imagefolder(rest, seed=seed, max_test=max_test, group=group or "natural")  # type: ignore[arg-type]
    from .hub import load_hf

    return load_hf(
        rest, seed=seed, max_test=max_test, image_column=image_column, label_column=label_column,
        group=group or "natural",  # type: ignore[arg-type]
    )


def list_tasks(spec: str) -> list[str]:
    """Expand a spec into single-task specs, in order, without loading any data.

    `builtin:all` / `vtab:all` name a whole suite, `builtin:structured` / `vtab:natural` one group, and
    a comma list names several (`vtab:cifar,dtd,builtin:count`: a bare name keeps the previous kind).
    Built-in tasks this machine cannot build are left out with a one-line log warning.
    """
    from .builtin import SUITE, builtin_tasks
    from .vtab import VTAB_TASKS, vtab_tasks

    out: list[str] = []
    kind: str | None = None
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        head, sep, rest = item.partition(":")
        if sep and head in KINDS:
            kind, name = _parse(item)
        elif kind is None:
            raise DataError(f"unknown dataset spec {item!r}: expected {_USAGE}")
        else:
            name = item
        if kind == "builtin" and (name == "all" or name in GROUPS):
            out += [f"builtin:{t}" for t in builtin_tasks(None if name == "all" else name)]
        elif kind == "vtab" and (name == "all" or name in GROUPS):
            out += [f"vtab:{t}" for t in vtab_tasks(None if name == "all" else name)]
        elif kind == "builtin" and name not in SUITE:
            raise DataError(f"unknown built-in task {name!r}; tasks: {', '.join(SUITE)} (or builtin:all)")
        elif kind == "vtab" and name not in VTAB_TASKS:
            raise DataError(f"unknown VTAB-1k task {name!r}; tasks: {', '.join(VTAB_TASKS)} (or vtab:all)")
        else:
            out.append(f"{kind}:{name}")
    if not out:
        raise DataError(f"dataset spec {spec!r} names no task")
    return list(dict.fromkeys(out))  # duplicates once, first place kept


def summarize_task(task: Task) -> dict[str, Any]:
    """A JSON-able summary of a task (for logs and run directories)."""
    return {
        "name": task.name, "group": task.group, "num_classes": task.num_classes,
        "class_names": list(task.class_names), "sizes": task.sizes(), "notes": list(task.notes),
    }
