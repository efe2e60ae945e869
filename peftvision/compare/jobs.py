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
from ..training.config import REPORT_TO, TrainConfig, option


def _names(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


ENGINES = ("local", "ray")
RAY_FILES = ("auto", "shared", "return")


@dataclass
class CompareConfig:
    """A comparison's settings; each field is also its `peftvision compare --flag` (`add_config_flags`)."""

    methods: tuple[str, ...] = option(tuple, "comma-separated method names (default: every registered method)",
                                      parse=_names)
    tasks: str = option("builtin:all", "builtin:all, vtab:all, or SPEC,SPEC,...")
    model: str = option("", "timm model name (default: peftvision's embedded backbone)")
    checkpoint: str | None = option(None, "local weights file for --model")
    seeds: int = option(1, "seeds per (method, task)")
    output: str = option("runs/compare", "comparison directory (rerun to resume)")
    workers: int = option(1, "runs in parallel (processes; the cores are split between them)")
    search: bool = option(False, "pick lr / weight decay per method on train800 -> val200")
    epochs: int = option(2, "epochs per run: the default comparison (every method x 8 built-in tasks) takes "
                            "about an hour on 2 CPU cores")
    batch_size: int = option(64, "per process; 64 is the VTAB-1k setting")
    num_workers: int = option(0, "DataLoader workers per run (runs are already parallel)")
    max_test: int | None = option(None, "cap each task's test set")
    quiet: bool = option(False, "no progress line or table")
    report_to: str = option("none", "experiment tracker: one run per (method, task, seed), tagged with them",
                            choices=REPORT_TO)
    engine: str = option("local", "local: --workers processes on this machine; ray: one Ray task per run "
                                  "(pip install 'peftvision[ray]')", choices=ENGINES)
    ray_address: str | None = option(None, "a running Ray cluster: auto, or HOST:PORT (unset: start one on this machine)")
    run_cpus: float | None = option(None, "CPUs per Ray run, also its torch threads (unset: 1; with GPUs, a GPU's "
                                          "share of its node)")
    run_gpus: float | None = option(None, "GPUs per Ray run (unset: 1 if the cluster has GPUs, else 0)")
    ray_files: str = option("auto", "shared: workers write the run directories; return: they send them back; "
                                    "auto: each run checks", choices=RAY_FILES)

    def train_config(self, **job: Any) -> TrainConfig:
        """A run's TrainConfig: the settings this config shares with TrainConfig by name, then `job`'s."""
        shared = {f.name for f in dataclasses.fields(TrainConfig)} & {f.name for f in dataclasses.fields(self)}
        return TrainConfig(**{k: getattr(self, k) for k in shared - set(job)}, **job)


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
        return cc.train_config(
            method=self.method, dataset=self.task, output=self.output, lr=self.lr, weight_decay=self.weight_decay,
            seed=self.seed, train_split="train800" if search else "train800val200",
            val_split="val200" if search else None, test_split=None if search else "test", quiet=True,
            warmup_epochs=cc.epochs / 10,  # the literature's 10 of 100 epochs
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
