"""`compare`: every method on every task under one protocol, resumable, with tables and plots.

VTAB-1k protocol per task: optionally (`search=True`) pick lr and weight decay per method from a small
grid by training on train800 and validating on val200; then train on train800val200 and report top-1
on test. Every (method, task, seed) is an ordinary `finetune` run directory under `runs/`, so any
result can be inspected, evaluated, merged or exported. Running the same comparison again skips
finished runs and resumes interrupted ones; a failing run is recorded and the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import ConfigError, Interrupted, PeftVisionError

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
    epochs: int = 2  # the default run (7 methods x 8 built-in tasks) takes ~40 min on 2 CPU cores
    batch_size: int = 64
    num_workers: int = 0  # DataLoader workers per run (runs are already parallel)
    max_test: int | None = None
    quiet: bool = False
    report_to: str = "none"  # one tracker run per (method, task, seed), tagged with them


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
        message = str(e) if isinstance(e, PeftVisionError) else f"{type(e).__name__}: {e}"
        row.update(status="failed", error=message.splitlines()[0] if message else type(e).__name__)
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").write_text(message + "\n\n" + traceback.format_exc())
    return row


def _execute(jobs: list[Job], cc: CompareConfig, log: Any) -> list[dict[str, Any]]:
    threads = max(1, (os.cpu_count() or 1) // max(1, cc.workers))
    rows: list[dict[str, Any]] = []
    if cc.workers <= 1:
        for i, job in enumerate(jobs, 1):
            rows.append(run_job(job, cc, threads))
            log(rows[-1], i, len(jobs))
        return rows
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=cc.workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(run_job, job, cc, threads) for job in jobs]
        for i, fut in enumerate(as_completed(futures), 1):
            rows.append(fut.result())
            log(rows[-1], i, len(jobs))
    by_output = {r["output"]: r for r in rows}
    return [by_output[j.output] for j in jobs]


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
    from .methods import default_lr, list_methods
    from .weights import DEFAULT_MODEL

    cc = dataclasses.replace(cc, methods=tuple(cc.methods) or tuple(list_methods()))
    unknown = [m for m in cc.methods if m not in list_methods()]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(list_methods())}")
    if cc.seeds < 1 or cc.workers < 1:
        raise ConfigError("--seeds and --workers must be >= 1")
    cc = dataclasses.replace(cc, model=cc.model or DEFAULT_MODEL)
    tasks = list_tasks(cc.tasks)
    root = Path(cc.output)
    root.mkdir(parents=True, exist_ok=True)
    log = _progress_logger(cc)

    chosen: dict[tuple[str, str], tuple[float, float]] = {}
    if cc.search:
        chosen = _pick(_execute(_search_jobs(cc, tasks, root), cc, log))
    final = [
        Job("final", m, t, s, *chosen.get((m, t), (default_lr(m, cc.model), TrainConfig.weight_decay)),
            str(root / "runs" / _task_dir(t) / m / f"seed{s}"))
        for t in tasks for m in cc.methods for s in range(cc.seeds)
    ]
    rows = _execute(final, cc, log)
    from .report import write_report

    return write_report(rows, cc, tasks, root)


def _progress_logger(cc: CompareConfig) -> Any:
    from rich.console import Console

    console = Console(stderr=True)

    def log(row: dict[str, Any], i: int, n: int) -> None:
        if cc.quiet:
            return
        what = f"[{i}/{n}] {row['kind']} {row['method']} on {row['task']} (seed {row['seed']}, lr {row['lr']:g})"
        if row["status"] == "failed":
            console.print(f"{what}: [red]failed[/red]: {row['error']}", soft_wrap=True)
        else:
            score = row.get("test_top1") if row["kind"] == "final" else row.get("best_val_top1")
            label = "test" if row["kind"] == "final" else "val"
            console.print(f"{what}: {row['status']}, {label} top-1 {score:.1f}%" if score is not None else f"{what}: {row['status']}",
                          soft_wrap=True)  # one line per run, also in a log file

    return log
