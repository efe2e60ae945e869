"""The jobs of a comparison: its config, one run (`Job`), and running one job in this process.

Every (method, task, seed) -- and every grid point of a search -- is a `Job`: an ordinary `finetune`
run directory. `run_job` runs, resumes or skips one and never raises, whichever engine calls it
(`local.py` here, `ray.py` on a cluster); `plan.py` decides which jobs there are.
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import Interrupted, PeftVisionError
from ..training.config import TrainConfig


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


def task_dir(task: str) -> str:
    return task.replace(":", "-").replace("/", "_")


def run_job(job: Job, cc: CompareConfig, threads: int) -> dict[str, Any]:
    """Run (or resume, or skip) one job in this process; never raises."""
    import torch

    torch.set_num_threads(threads)
    from ..training.finetune import finetune

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
