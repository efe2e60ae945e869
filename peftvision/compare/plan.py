"""`compare`: every method on every task under one protocol, resumable, with tables and plots.

VTAB-1k protocol per task: optionally (`search=True`) pick lr and weight decay per method from a small
grid by training on train800 and validating on val200; then train on train800val200 and report top-1
on test. Every (method, task, seed) is an ordinary `finetune` run directory under `runs/`, so any
result can be inspected, evaluated, merged or exported. Running the same comparison again skips
finished runs and resumes interrupted ones; a failing run is recorded and the others go on.

This module plans the jobs (`jobs.py`) and hands them to an engine (`local.py`, or `ray.py` on a
cluster): jobs in, rows out, with the progress told as each run finishes.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..methods import default_lr, get_method
from ..training.config import TrainConfig
from ..ui import RunsProgress
from .jobs import ENGINES, RAY_FILES, CompareConfig, Job, Then, task_dir

LR_GRID = (1e-2, 3e-3, 1e-3, 1e-4)
WD_GRID = (1e-4, 1e-2)


def check_engine(cc: CompareConfig) -> None:
    """Flags of the other engine are an error rather than silently ignored; a missing Ray is one line."""
    if cc.engine not in ENGINES:
        raise ConfigError(f"unknown engine {cc.engine!r}; choose from: {', '.join(ENGINES)}")
    given = {"--ray-address": cc.ray_address is not None, "--run-cpus": cc.run_cpus is not None,
             "--run-gpus": cc.run_gpus is not None, "--ray-files": cc.ray_files != "auto"}
    ray_flags = [flag for flag, on in given.items() if on]
    if cc.engine == "local" and ray_flags:
        raise ConfigError(f"{', '.join(ray_flags)} only apply to --engine ray")
    if cc.engine == "ray":
        if cc.workers != 1:
            raise ConfigError("--workers is the local engine's; with --engine ray, --run-cpus sets each run's share")
        if cc.ray_files not in RAY_FILES:
            raise ConfigError(f"unknown --ray-files {cc.ray_files!r}; choose from: {', '.join(RAY_FILES)}")
        if (cc.run_cpus is not None and cc.run_cpus <= 0) or (cc.run_gpus is not None and cc.run_gpus < 0):
            raise ConfigError("--run-cpus must be > 0 and --run-gpus >= 0")
        from .ray import import_ray

        import_ray()


def _execute(jobs: list[Job], cc: CompareConfig, progress: RunsProgress, then: Then) -> list[dict[str, Any]]:
    """Run `jobs` and whatever `then` adds as rows come back; rows in the order they finished."""
    if cc.engine == "ray":
        from .ray import execute

        return execute(jobs, cc, progress, then)
    from .local import execute as execute_local

    return execute_local(jobs, cc, progress, then)


def _grid(cc: CompareConfig, method: str) -> list[tuple[float, float]]:
    """The (lr, wd) points searched for `method`: one for a head-only method (its probe picks its own
    L2 and ignores both), else LR_GRID x WD_GRID."""
    if get_method(method).head_only:
        return [(default_lr(method, cc.model), TrainConfig.weight_decay)]
    return [(lr, wd) for lr in LR_GRID for wd in WD_GRID]


def _search_jobs(cc: CompareConfig, tasks: list[str], root: Path) -> list[Job]:
    return [
        Job("search", m, t, 0, lr, wd, str(root / "search" / task_dir(t) / m / f"lr{lr:g}-wd{wd:g}"))
        for t in tasks for m in cc.methods for lr, wd in _grid(cc, m)
    ]


def _pick(search_rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[float, float]]:
    """Best (lr, wd) per (method, task) by val200 top-1; ties go to the first in grid order."""
    best: dict[tuple[str, str], tuple[float, float, float]] = {}
    for r in search_rows:
        if r.get("status") == "failed" or r.get("best_val_top1") is None:
            continue
        key = (r["method"], r["task"])
        if key not in best or r["best_val_top1"] > best[key][0]:
            best[key] = (r["best_val_top1"], r["lr"], r["weight_decay"])
    return {k: (v[1], v[2]) for k, v in best.items()}


def compare(cc: CompareConfig) -> dict[str, Any]:
    """Run the comparison and write results.csv/json, summary.md and the plots into `cc.output`."""
    from ..backbones.weights import DEFAULT_MODEL
    from ..data import list_tasks
    from ..methods import list_methods

    cc = dataclasses.replace(cc, methods=tuple(cc.methods) or tuple(list_methods()))
    unknown = [m for m in cc.methods if m not in list_methods()]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(list_methods())}")
    if cc.seeds < 1 or cc.workers < 1:
        raise ConfigError("--seeds and --workers must be >= 1")
    check_engine(cc)
    cc = dataclasses.replace(cc, model=cc.model or DEFAULT_MODEL)
    tasks = list_tasks(cc.tasks)
    root = Path(cc.output)
    root.mkdir(parents=True, exist_ok=True)

    first, then = _plan(cc, tasks, root)
    order = {(t, m): i for i, (t, m) in enumerate((t, m) for t in tasks for m in cc.methods)}
    total = len(first) + len(order) * cc.seeds if cc.search else len(first)
    with RunsProgress(total, enabled=not cc.quiet) as progress:
        rows = _execute(first, cc, progress, then)
    final = sorted((r for r in rows if r["kind"] == "final"), key=lambda r: (order[r["task"], r["method"]], r["seed"]))
    from .report import write_report

    return write_report(final, cc, tasks, root)


def _plan(cc: CompareConfig, tasks: list[str], root: Path) -> tuple[list[Job], Then]:
    """The jobs to start with, and what each finished row unlocks: with a search, a (method, task)'s
    final runs start as soon as its own grid is done (no barrier waiting for every grid)."""
    from ..methods import default_lr

    def finals(m: str, t: str, lr_wd: tuple[float, float] | None) -> list[Job]:
        lr, wd = lr_wd or (default_lr(m, cc.model), TrainConfig.weight_decay)  # a grid that all failed: defaults
        return [Job("final", m, t, s, lr, wd, str(root / "runs" / task_dir(t) / m / f"seed{s}")) for s in range(cc.seeds)]

    if not cc.search:
        return [j for t in tasks for m in cc.methods for j in finals(m, t, None)], lambda row: []
    grid = _search_jobs(cc, tasks, root)
    left = Counter((j.method, j.task) for j in grid)
    tried: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def then(row: dict[str, Any]) -> list[Job]:
        if row["kind"] != "search":
            return []
        key = (row["method"], row["task"])
        tried.setdefault(key, []).append(row)
        left[key] -= 1
        return [] if left[key] else finals(*key, _pick(tried[key]).get(key))

    return grid, then
