"""`finetune`: config -> backbone -> inject -> data -> train -> test -> files. The CLI and `compare` call it.

Output directory of a run:
    adapter_config.json, adapter.safetensors   the best-on-validation adapter (peftvision's format)
    metrics.json      method, model, dataset, parameter counts, best val / test accuracy, speed, memory
    history.csv       per epoch: train loss, val loss, val top-1, lr, seconds
    curves.png        loss and accuracy curves
    config.yaml       the resolved config (re-run it with --recipe)
    log.jsonl         one JSON object per event, for scripts
    checkpoint/       the full training state of the last finished epoch (for --resume)
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ConfigError, Interrupted, PeftVisionError
from .config import TrainConfig
from .train import LoopState


def default_model() -> str:
    from .weights import DEFAULT_MODEL

    return DEFAULT_MODEL


def default_dataset() -> str:
    from .data import DEFAULT_TASK

    return DEFAULT_TASK


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on what is installed or on the method (model, task, output, lr)."""
    from .methods import default_lr

    model = cfg.model or default_model()
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.method, model)
    dataset = cfg.dataset or default_dataset()
    output = cfg.output or str(Path("runs") / f"{cfg.method}-{dataset.split(':')[-1].replace('/', '_')}")
    # no model selection: the val slice has no use, so train on it too
    train_split = "trainval" if cfg.val_split is None and cfg.train_split == "train" else cfg.train_split
    return dataclasses.replace(cfg, model=model, dataset=dataset, output=output, lr=lr, train_split=train_split)


class _Log:
    """JSON lines in the run directory (main process only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, event: str, **data: Any) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), "event": event, **data}, default=str) + "\n")


def _build_loaders(cfg: TrainConfig, model: torch.nn.Module, task: Any, resize: str) -> dict[str, Any]:
    from .data import build_loader, make_transform
    from .train import EpochSampler

    eval_tf = make_transform(model, train=False, resize=resize)
    train_tf = make_transform(model, train=True) if cfg.augment else eval_tf
    train_ds = task.dataset(cfg.train_split, train_tf)
    sampler = EpochSampler(len(train_ds), cfg.seed)
    loaders: dict[str, Any] = {
        "train": torch.utils.data.DataLoader(
            train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
            persistent_workers=False, drop_last=False,
        ),
        "train_sampler": sampler,
    }
    if cfg.val_split:
        loaders["val"] = build_loader(task.dataset(cfg.val_split, eval_tf), batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    if cfg.test_split:
        test_ds = task.dataset(cfg.test_split, eval_tf)
        loaders["test"] = build_loader(test_ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    return loaders


def finetune(
    cfg: TrainConfig,
    resume: bool = False,
    on_epoch_end: Callable[[LoopState], None] | None = None,
) -> dict[str, Any]:
    """Run one fine-tuning job end to end and return its metrics (also written to metrics.json)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .backbone import create_model
    from .data import load_task
    from .export import load_tensors
    from .freeze import get_state, param_report
    from .injection import enable_grad_checkpointing, inject
    from .train import evaluate_model, peak_memory_mb, plot_curves, reset_peak_memory, train, write_history, write_json
    from .ui import Progress, print_summary

    cfg = resolve_config(cfg)
    output = Path(cfg.output)
    if resume and not (output / "checkpoint").is_dir():
        raise PeftVisionError(f"nothing to resume in {output}: it has no checkpoint/")
    if not resume and (output / "checkpoint").exists():
        raise PeftVisionError(
            f"{output} already holds a run; continue it with --resume {output}, or choose another --output"
        )

    reset_peak_memory()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    if main:
        output.mkdir(parents=True, exist_ok=True)
        _write_yaml(output / "config.yaml", dataclasses.asdict(cfg))
    log = _Log(output / "log.jsonl" if main else None)
    log("start", resume=resume, config=dataclasses.asdict(cfg), processes=accelerator.num_processes)

    task = load_task(cfg.dataset, seed=cfg.seed, max_test=cfg.max_test)
    model = create_model(cfg.model, pretrained=True, checkpoint=cfg.checkpoint, num_classes=task.num_classes)
    inject(model, cfg.method, **cfg.options)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    resize = cfg.resize or task.resize
    get_state(model).class_names = list(task.class_names)
    get_state(model).resize = resize  # saved with the adapter: eval, predict and merge preprocess the same
    report = param_report(model)
    loaders = _build_loaders(cfg, model, task, resize)
    splits = {role: (name, task.about(name)) for role, name in
              (("train", cfg.train_split), ("val", cfg.val_split), ("test", cfg.test_split)) if name}
    log("data", task=repr(task), resize=resize, splits=splits, notes=list(task.notes))

    progress = Progress(cfg.epochs, enabled=main and not cfg.quiet)

    def epoch_end(state: LoopState) -> None:
        progress.end_epoch(state.history[-1])
        log("epoch", **state.history[-1])
        if main:
            write_history(output / "history.csv", state.history)
        if on_epoch_end is not None:
            on_epoch_end(state)

    try:
        with progress:
            model, state = train(model, loaders, cfg, output, accelerator, task.num_classes, resume, epoch_end, progress)
    except KeyboardInterrupt:
        log("interrupted")
        raise Interrupted(
            f"interrupted; the last finished epoch is saved: continue with "
            f"`peftvision finetune --resume {output}`"
        ) from None
    except PeftVisionError as e:
        log("error", message=str(e))
        raise

    # ---- test with the best adapter
    best = load_tensors(output / "adapter.safetensors")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in best:
                p.copy_(best[name].to(p.device, p.dtype))
    test: dict[str, float] = {}
    if "test" in loaders:
        test = evaluate_model(accelerator.prepare(model), accelerator.prepare(loaders["test"]), accelerator, task.num_classes)
    metrics = {
        "method": cfg.method,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "task_group": getattr(task, "group", None),
        "seed": cfg.seed,
        "lr": cfg.lr,
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "trainable_params": report.trainable,
        "method_params": report.method_params,
        "total_params": report.total,
        "trainable_percent": report.percent,
        "adapter_bytes": (output / "adapter.safetensors").stat().st_size,
        "best_val_top1": state.best_top1 if state.best_top1 >= 0 else None,
        "splits": {role: {"split": name, "images": len(task.split(name)), "about": about}
                   for role, (name, about) in splits.items()},
        "resize": resize,
        "test_top1": test.get("top1"),
        "test_top5": test.get("top5"),
        "test_mean_per_class_accuracy": test.get("mean_per_class_accuracy"),
        "train_seconds": state.train_seconds,
        "images_per_second": state.images_seen / max(state.train_seconds, 1e-9),
        "peak_memory_mb": peak_memory_mb(),
        "processes": accelerator.num_processes,
    }
    if main:
        write_json(output / "metrics.json", metrics)
        write_history(output / "history.csv", state.history)
        plot_curves(output / "curves.png", state.history, f"{cfg.method} on {cfg.dataset} ({cfg.model})")
        if not cfg.quiet:
            print_summary(metrics, output)
    log("done", **metrics)
    accelerator.wait_for_everyone()
    return metrics


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    from .export import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def read_run_config(output: str | Path) -> TrainConfig:
    """The resolved config a run saved in its directory (to resume it)."""
    import yaml

    path = Path(output) / "config.yaml"
    if not path.is_file():
        raise PeftVisionError(f"nothing to resume in {output}: no config.yaml there")
    try:
        return TrainConfig.from_dict(yaml.safe_load(path.read_text()))
    except yaml.YAMLError:
        raise PeftVisionError(f"{path} is damaged; cannot resume") from None


def load_recipe(path: str) -> dict[str, Any]:
    """A recipe YAML: the same keys as TrainConfig (and `options` for the method)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of config keys")
    return data
