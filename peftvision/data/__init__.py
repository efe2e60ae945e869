"""Datasets for fine-tuning: one spec string -> a task with the VTAB-1k splits -> torch DataLoaders.

    from peftvision.data import load_task, make_transform, build_loader

    task = load_task("builtin:digits", seed=0)       # also vtab:<task>, imagefolder:<dir>, hf:<repo|dir>
    ds = task.dataset("train", make_transform(model, resize=task.resize))
    loader = build_loader(ds, batch_size=64, shuffle=True, num_workers=2, seed=0)

Layout, in the order data flows: `specs` parses spec strings; `folders`, `hub`, `vtab`, `builtin` are
the sources (`images` decodes their files); `protocol` draws the splits; `task` holds the result;
`transforms` reads preprocessing from the model; `loaders` batches it.
"""

from __future__ import annotations

from .images import decode_image, open_image, to_rgb
from .loaders import EpochSampler, RunLoaders, build_loader, run_loaders
from .specs import KINDS, list_tasks, load_task, summarize_task
from .task import GROUPS, SPLITS, Split, Task, TaskDataset
from .transforms import RESIZE_MODES, input_size, make_transform

# What `peftvision finetune` trains on when no dataset is given: small, real images, bundled with
# scikit-learn, so it works on any install.
DEFAULT_TASK = "builtin:digits"

__all__ = [
    "DEFAULT_TASK", "GROUPS", "KINDS", "RESIZE_MODES", "SPLITS", "EpochSampler", "RunLoaders", "Split", "Task",
    "TaskDataset", "build_loader", "input_size", "list_tasks", "load_task", "make_transform", "open_image", "decode_image",
    "run_loaders", "summarize_task", "to_rgb",
]
