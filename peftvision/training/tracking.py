"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through accelerate's own tracker API.

accelerate owns the trackers (`Accelerator(log_with=...)`, `init_trackers`, `log`, `end_training`):
it starts them on the main process only, so a DDP run logs once. This module only turns
`--report-to` into that call, fails early with one line when a tracker is not installed (accelerate
would drop it with a warning), and flattens our config into values every tracker accepts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PeftVisionError
from .config import TrainConfig


class TrackerError(PeftVisionError):
    """An experiment tracker could not start."""


# tracker -> (module it needs, extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
PROJECT = "peftvision"  # the wandb project / mlflow experiment, unless the user's environment names one


def trackers(report_to: str) -> list[str]:
    """The trackers `--report-to` asks for; one clear line if one is not installed."""
    if report_to in ("", "none", None):
        return []
    if report_to == "all":
        return [name for name, (module, _) in TRACKERS.items() if importlib.util.find_spec(module) is not None]
    if report_to not in TRACKERS:
        raise ConfigError(f"unknown tracker {report_to!r}; choose from: none, {', '.join(TRACKERS)}, all")
    module, extra = TRACKERS[report_to]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"--report-to {report_to} needs {module}: pip install \"peftvision[{extra}]\"")
    return [report_to]


def flat_config(cfg: TrainConfig, tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's config as flat scalars (TensorBoard's hparams take nothing else): options.r, tag.task."""
    values: dict[str, Any] = {}
    for key, value in dataclasses.asdict(cfg).items():
        if isinstance(value, dict):
            values.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            values[key] = value
    values.update({f"tag.{k}": v for k, v in (tags or {}).items()})
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def start_trackers(accelerator: Any, cfg: TrainConfig, output: Path, tags: dict[str, Any] | None = None) -> None:
    """Start the run's trackers; TensorBoard writes under OUTPUT/tensorboard, one run per directory."""
    if not accelerator.log_with:
        return
    name = "-".join(str(v) for v in (tags or {}).values()) or output.name
    string_tags = {k: str(v) for k, v in (tags or {}).items()}
    init_kwargs = {
        "tensorboard": {},
        "wandb": {"name": name, "dir": str(output), "tags": list(string_tags.values()) or None,
                  "group": string_tags.get("comparison")},
        "mlflow": {"run_name": name, "tags": string_tags or None},
    }
    project = os.environ.get("WANDB_PROJECT") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
    try:
        accelerator.init_trackers(project, config=flat_config(cfg, tags), init_kwargs=init_kwargs)
    except Exception as e:  # noqa: BLE001 - each tracker raises its own types (no login, bad URI, ...)
        names = ", ".join(str(t) for t in accelerator.log_with)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrackerError(f"--report-to {names}: the tracker did not start ({first}); fix its setup "
                           f"(login, WANDB_MODE=offline, MLFLOW_TRACKING_URI) or use --report-to none") from None


def log_dir(output: Path) -> Path:
    """Where TensorBoard's event files go (accelerate adds the project name below it)."""
    return output / "tensorboard"
