"""Datasets for fine-tuning: one spec string -> a task with the VTAB-1k splits -> torch DataLoaders.

    from peftvision.data import load_task, make_transform, build_loader

    task = load_task("builtin:digits", seed=0)       # also vtab:<task>, imagefolder:<dir>, hf:<repo|dir>
    ds = task.dataset("train800", make_transform(model))
    loader = build_loader(ds, batch_size=64, shuffle=True, num_workers=2, seed=0)

Layout: `specs` parses spec strings; `hub`, `vtab`, `builtin` are the sources; `protocol` draws the
VTAB-1k splits; `task` holds the result; `images` decodes; `transforms` reads preprocessing from the model.
"""

from __future__ import annotations

from .images import open_image, to_rgb
from .specs import KINDS, describe, list_tasks, load_task
from .task import GROUPS, SPLITS, Split, Task, TaskDataset
from .transforms import build_loader, input_size, make_transform

# What `peftvision finetune` trains on when no dataset is given: small, real images, bundled with
# scikit-learn, so it works on any install.
DEFAULT_TASK = "builtin:digits"

__all__ = [
    "DEFAULT_TASK", "GROUPS", "KINDS", "SPLITS", "Split", "Task", "TaskDataset",
    "build_loader", "describe", "input_size", "list_tasks", "load_task", "make_transform", "open_image", "to_rgb",
]
