"""`compare`: every method on every task under one protocol, resumable, with tables and plots.

VTAB-1k protocol per task: optionally (`search=True`) pick lr and weight decay per method from a small
grid by training on train800 and validating on val200; then train on train800val200 and report top-1
on test. Every (method, task, seed) is an ordinary `finetune` run directory under `runs/`, so any
result can be inspected, evaluated, merged or exported. Running the same comparison again skips
finished runs and resumes interrupted ones; a failing run is recorded and the others go on.

How runs execute is an engine's business, behind `_execute` (jobs in, rows out, the progress told as
each run finishes): the local one here (this process or `workers` processes), or Ray's in
`ray_engine.py`. Both call `run_job`, which is what makes the guarantees above hold for either.
"""

from __future__ import annotations

import dataclasses
import json
import os
import traceback
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import TrainConfig
from .errors import ConfigError, Interrupted, PeftVisionError
from .ui import RunsProgress

LR_GRID = (1e-2, 3e-3, 1e-3, 1e-4)
WD_GRID = (1e-4, 1e-2)


@dataclass
class CompareConfig:
    methods: tuple[str, ...] = ()  # empty: every registered method, in the registry's order
    tasks: str = "builtin:all"
    model: str = ""  # "" = the default backbone
    checkpoint: str | None = None
    seeds: int = 1
    output: str = "runs/compare"
    workers: int = 1
    search: bool = False
    epochs: int = 2  # the default run (11 methods x 8 built-in tasks) takes ~51 min on 2 CPU cores
    batch_size: int = 64
    num_workers: int = 0  # DataLoader workers per run (runs are already parallel)
    max_test: int | None = None
    quiet: bool = False
    report_to: str = "none"  # one tracker run per (method, task, seed), tagged with them
    engine: str = "local"  # "local": this machine's processes (`workers`); "ray": one Ray task per run
    ray_address: str | None = None  # None: start a local Ray cluster (or use the one already initialised)
    run_cpus: float | None = None  # per Ray run, also its torch threads; None: 1 without GPUs, else a GPU's share
    run_gpus: float | None = None  # per Ray run; None: 1 when the cluster has GPUs, else 0
    ray_files: str = "auto"  # "shared": workers write the run directories; "return": sent back; "auto": per run


ENGINES = ("local", "ray")
RAY_FILES = ("auto", "shared", "return")


def _check_engine(cc: CompareConfig) -> None:
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
        from .ray_engine import import_ray

        import_ray()


@dataclass
class Job:
    """One finetune run of the comparison."""

    kind: str  # "search" or "final"
    method: str
    task: str
    seed: int
    lr: float
    weight_decay: float
    output: str

    def config(self, cc: CompareConfig) -> TrainConfig:
        search = self.kind == "search"
        return TrainConfig(
            method=self.method, model=cc.model, checkpoint=cc.checkpoint, dataset=self.task, output=self.output,
            epochs=cc.epochs, batch_size=cc.batch_size, lr=self.lr, weight_decay=self.weight_decay, seed=self.seed,
            train_split="train800" if search else "train800val200", val_split="val200" if search else None,
            test_split=None if search else "test", num_workers=cc.num_workers, max_test=cc.max_test, quiet=True,
            warmup_epochs=cc.epochs / 10,  # the literature's 10 of 100 epochs
            report_to=cc.report_to,
        )

    def tags(self, cc: CompareConfig) -> dict[str, object]:
        """How trackers name and group this run."""
        return {"comparison": Path(cc.output).name, "kind": self.kind, "method": self.method, "task": self.task,
                "seed": self.seed, **({"lr": self.lr, "wd": self.weight_decay} if self.kind == "search" else {})}


def _task_dir(task: str) -> str:
    return task.replace(":", "-").replace("/", "_")


def run_job(job: Job, cc: CompareConfig, threads: int) -> dict[str, Any]:
    """Run (or resume, or skip) one job in this process; never raises."""
    import torch

    torch.set_num_threads(threads)
    from .finetune import finetune

    out = Path(job.output)
    row: dict[str, Any] = {**dataclasses.asdict(job)}
    try:
        if (out / "metrics.json").is_file():
            metrics, row["status"] = json.loads((out / "metrics.json").read_text()), "done"
        else:
            resume = (out / "checkpoint").is_dir()
            if not resume and out.exists():  # a run that failed before its first checkpoint
                for f in out.iterdir():
                    if f.is_file():
                        f.unlink()
            metrics = finetune(job.config(cc), resume=resume, tags=job.tags(cc))
            row["status"] = "resumed" if resume else "ran"
        row.update(metrics)
        (out / "error.txt").unlink(missing_ok=True)
    except (Interrupted, KeyboardInterrupt):
        raise  # Ctrl-C stops the whole comparison; rerunning it resumes
    except Exception as e:  # noqa: BLE001 - a failed run must not stop the others
        message = (str(e) if isinstance(e, PeftVisionError) else f"{type(e).__name__}: {e}") or type(e).__name__
        return failed_row(job, message, traceback.format_exc())
    return row


def failed_row(job: Job, message: str, details: str) -> dict[str, Any]:
    """A run that failed, whichever engine ran it: its row (the message's first line as `error`) and
    `error.txt` in its directory with the whole message and `details` (the traceback)."""
    out = Path(job.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").write_text(message + "\n\n" + details)
    return {**dataclasses.asdict(job), "status": "failed", "error": message.splitlines()[0]}


Then = Callable[[dict[str, Any]], list[Job]]  # a finished row -> the jobs it unlocks (a grid's final runs)


def _execute(jobs: list[Job], cc: CompareConfig, progress: RunsProgress, then: Then) -> list[dict[str, Any]]:
    """Run `jobs` and whatever `then` adds as rows come back; rows in the order they finished."""
    if cc.engine == "ray":
        from .ray_engine import execute

        return execute(jobs, cc, progress, then)
    return _execute_local(jobs, cc, progress, then)


def _execute_local(jobs: list[Job], cc: CompareConfig, progress: RunsProgress, then: Then) -> list[dict[str, Any]]:
    """In this process, or in `cc.workers` processes splitting the cores between them."""
    threads = max(1, (os.cpu_count() or 1) // max(1, cc.workers))
    progress.slots = cc.workers
    rows: list[dict[str, Any]] = []
    if cc.workers <= 1:
        queue = deque(jobs)
        while queue:
            progress.submitted()
            rows.append(run_job(queue.popleft(), cc, threads))
            progress.finished(rows[-1])
            queue.extend(then(rows[-1]))
        return rows
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=cc.workers, mp_context=mp.get_context("spawn")) as pool:
        def submit(job: Job) -> Future:
            progress.submitted()
            return pool.submit(run_job, job, cc, threads)

        pending = {submit(job) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    rows.append(fut.result())
                    progress.finished(rows[-1])
                    pending |= {submit(job) for job in then(rows[-1])}
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # queued runs never start; running ones stop resumably
            raise
    return rows


def _search_jobs(cc: CompareConfig, tasks: list[str], root: Path) -> list[Job]:
    return [
        Job("search", m, t, 0, lr, wd, str(root / "search" / _task_dir(t) / m / f"lr{lr:g}-wd{wd:g}"))
        for t in tasks for m in cc.methods for lr in LR_GRID for wd in WD_GRID
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
    from .data import list_tasks
    from .methods import list_methods
    from .weights import DEFAULT_MODEL

    cc = dataclasses.replace(cc, methods=tuple(cc.methods) or tuple(list_methods()))
    unknown = [m for m in cc.methods if m not in list_methods()]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(list_methods())}")
    if cc.seeds < 1 or cc.workers < 1:
        raise ConfigError("--seeds and --workers must be >= 1")
    _check_engine(cc)
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
    from .methods import default_lr

    def finals(m: str, t: str, lr_wd: tuple[float, float] | None) -> list[Job]:
        lr, wd = lr_wd or (default_lr(m, cc.model), TrainConfig.weight_decay)  # a grid that all failed: defaults
        return [Job("final", m, t, s, lr, wd, str(root / "runs" / _task_dir(t) / m / f"seed{s}")) for s in range(cc.seeds)]

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
