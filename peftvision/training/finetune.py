"""`finetune`: config -> data -> backbone -> inject -> train -> test -> files. The CLI and `compare` call it.

Output directory of a run:
    adapter_config.json, adapter.safetensors   the best-on-validation adapter (peftvision's format)
    README.md         the model card (Hugging Face Hub front matter; `peftvision push` uploads it)
    metrics.json      method, model, dataset, splits, parameter counts, best val / test accuracy, speed, memory
    history.csv       per epoch: train loss, val loss, val top-1, lr, seconds
    curves.png        loss and accuracy curves
    config.yaml       the resolved config (re-run it with --recipe)
    log.jsonl         one JSON object per event, for scripts
    tensorboard/, wandb/   with --report-to (accelerate's trackers)
    checkpoint/       the full training state of the last finished epoch (for --resume)
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, Interrupted, PeftVisionError
from .config import TrainConfig, resolve_config
from .loop import LoopState


class _Log:
    """JSON lines in the run directory (main process only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, event: str, **data: Any) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), "event": event, **data}, default=str) + "\n")


def finetune(
    cfg: TrainConfig,
    resume: bool = False,
    on_epoch_end: Callable[[LoopState], None] | None = None,
    tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one fine-tuning job end to end and return its metrics (also written to metrics.json).

    `tags` name the run in experiment trackers (`compare` passes method, task, seed)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from ..files import write_yaml
    from .loop import check_optimizer
    from .report import reset_peak_memory
    from .tracking import log_dir, start_trackers, trackers

    cfg = resolve_config(cfg)
    report_to = trackers(cfg.report_to)  # before any work: a missing tracker or optimizer is one line
    check_optimizer(cfg.optimizer)
    output = Path(cfg.output)
    if resume and not (output / "checkpoint").is_dir():
        raise PeftVisionError(f"nothing to resume in {output}: it has no checkpoint/")
    if not resume and (output / "checkpoint").exists():
        raise PeftVisionError(
            f"{output} already holds a run; continue it with --resume {output}, or choose another --output"
        )
    if not resume and any((output / name).exists() for name in ("metrics.json", "adapter_config.json")):
        raise PeftVisionError(f"{output} already holds a finished run; choose another --output")  # e.g. a probe: no checkpoint/

    reset_peak_memory()
    _release_precision(cfg.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, log_with=report_to or None,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(log_dir(output))),
    )
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    if main:
        output.mkdir(parents=True, exist_ok=True)
        write_yaml(output / "config.yaml", dataclasses.asdict(cfg))
    start_trackers(accelerator, cfg, output, tags)
    try:
        return _run(cfg, accelerator, output, resume, on_epoch_end)
    finally:
        accelerator.end_training()  # flush and close the trackers, also after an error or Ctrl-C


def _release_precision(mixed_precision: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    mixed precision ("restart your runtime"): a script, notebook or benchmark that runs fp32 and then bf16
    in one process would die there. The precision is per run, so a state left by an earlier run with
    another precision is dropped (the process group, PartialState, is kept)."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _run(
    cfg: TrainConfig, accelerator: Any, output: Path, resume: bool, on_epoch_end: Callable[[LoopState], None] | None,
) -> dict[str, Any]:
    """finetune's body once the accelerator and the trackers run."""
    from ..adapters.io import save_adapter
    from ..backbones.backbone import create_model
    from ..data import load_task, run_loaders
    from ..methods import get_method
    from ..methods.freeze import get_state, param_report
    from ..methods.inject import enable_grad_checkpointing, inject
    from ..ui import Progress
    from .probe import probe_head, scale_head
    from .loop import train
    from .report import write_history
    from .selection import choose_selection

    main = accelerator.is_main_process
    log = _Log(output / "log.jsonl" if main else None)
    log("start", resume=resume, config=dataclasses.asdict(cfg), processes=accelerator.num_processes)

    # ---- data, backbone, method
    task = load_task(cfg.dataset, seed=cfg.seed, max_test=cfg.max_test)
    selection = choose_selection(task, cfg.train_split, cfg.val_split, cfg.keep)
    cfg = dataclasses.replace(cfg, train_split=selection.train_split, val_split=selection.val_split, keep=selection.keep)
    model = create_model(cfg.model, pretrained=True, checkpoint=cfg.checkpoint, num_classes=task.num_classes)
    inject(model, cfg.method, **cfg.options)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    resize = cfg.resize or task.resize
    state = get_state(model)
    state.class_names, state.resize = list(task.class_names), resize  # saved with the adapter
    report = param_report(model)
    loaders = run_loaders(
        task, model, train_split=cfg.train_split, val_split=cfg.val_split, test_split=cfg.test_split,
        batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed, resize=resize, augment=cfg.augment,
    )
    splits = {role: (name, task.about(name)) for role, name in
              (("train", cfg.train_split), ("val", cfg.val_split), ("test", cfg.test_split)) if name}
    log("data", task=repr(task), resize=resize, splits=splits, notes=list(task.notes), selection=selection.why)

    # ---- the head's start: a linear probe on the frozen features (LP-FT), or timm's random init
    head_only = len(state.trainable_names) == len(state.head_names)  # nothing but the head trains
    probe_first = head_only or get_method(cfg.method).probe_head  # the method says whether LP-FT is its default
    # a head-only run with --augment trains its epochs by SGD on augmented images: a probe fitted once on
    # un-augmented features would ignore the flag (with other methods the probe is only the start)
    probe_first = probe_first and not (head_only and cfg.augment)
    head_init = cfg.head_init if cfg.head_init != "auto" else ("probe" if probe_first else "random")
    # the head's lr: the method's own after a probe start (Method.probe_head_lr_ratio; 0 keeps the probe's head), else the run's
    head_lr_ratio = cfg.head_lr_ratio if cfg.head_lr_ratio is not None else (
        get_method(cfg.method).probe_head_lr_ratio if head_init == "probe" else 1.0)
    if head_only and head_init != "probe" and head_lr_ratio == 0:
        raise ConfigError(f"--head-lr-ratio 0 leaves nothing to train: {cfg.method} trains only the head")
    # a softened probe start (--probe-head-scale): the same predictions, smaller logits; a probe-only run's head is the fit itself
    head_scale = cfg.probe_head_scale if head_init == "probe" and not head_only else 1.0
    cfg = dataclasses.replace(cfg, head_lr_ratio=head_lr_ratio)
    probe: dict[str, Any] = {"init": head_init, "lr_ratio": head_lr_ratio}
    if head_scale != 1:
        probe["scale"] = head_scale
    features: dict[str, Any] = {}
    # the method's data-aware step (a no-op for most; a resumed run has it in its checkpoint). A method
    # that changes the base's outputs from the start (prompts) prepares first, so the probe sees the
    # features training starts from; one that leaves them unchanged (GPS) prepares with the probe's head.
    prepare_first = not get_method(cfg.method).starts_as_base(state.config)
    if prepare_first and not resume:
        log("prepare", seconds=_prepare(model, loaders.train, accelerator))
    if head_init == "probe" and not resume:
        # base features are the model's own where the method leaves the base unchanged at init: cacheable
        cache = cfg.feature_cache == "disk" and (head_only or get_method(cfg.method).starts_as_base(state.config))
        probe.update(probe_head(model, task, cfg, resize, accelerator, cache, with_test=head_only))
        features = probe.pop("features")
        if head_scale != 1:
            scale_head(model, head_scale)
        log("probe", **probe)
    if head_only and head_init == "probe":  # a convex problem solved: there is nothing left to train
        return _finish(cfg, accelerator, output, task, model, loaders, selection, splits, report, probe,
                       _probe_loop(model, task, accelerator, output, probe, features), log, features)
    if not prepare_first and not resume:
        log("prepare", seconds=_prepare(model, loaders.train, accelerator))

    # ---- train, keeping the best adapter on disk as it happens
    progress = Progress(cfg.epochs, enabled=main and not cfg.quiet)

    def epoch_end(loop: LoopState) -> None:
        progress.end_epoch(loop.history[-1])
        log("epoch", **loop.history[-1])
        if main:
            write_history(output / "history.csv", loop.history)
        if on_epoch_end is not None:
            on_epoch_end(loop)

    try:
        with progress:
            model, loop = train(model, loaders, cfg, output, accelerator, task.num_classes, resume,
                                on_best=lambda m: save_adapter(m, output), on_epoch_end=epoch_end, progress=progress)
    except KeyboardInterrupt:
        log("interrupted")
        raise Interrupted(
            f"interrupted; the last finished epoch is saved: continue with "
            f"`peftvision finetune --resume {output}`"
        ) from None
    except PeftVisionError as e:
        log("error", message=str(e))
        raise

    return _finish(cfg, accelerator, output, task, model, loaders, selection, splits, report, probe, loop, log)


def _finish(cfg: TrainConfig, accelerator: Any, output: Path, task: Any, model: Any, loaders: Any, selection: Any,
            splits: dict, report: Any, probe: dict[str, Any], loop: LoopState, log: _Log,
            features: dict[str, Any] | None = None) -> dict[str, Any]:
    """Test the kept adapter and write the run's files (every process reads the adapter the main process wrote)."""
    from ..adapters.format import WEIGHTS_NAME
    from ..adapters.io import load_best
    from ..files import write_json
    from ..methods.freeze import get_state
    from ..ui import print_summary, progress_bar
    from .evaluate import evaluate_model
    from .report import peak_memory_mb, plot_curves, write_history

    main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    load_best(model, output)
    test: dict[str, float] = {}
    if features and "test" in features:  # a probe-only run: the head on the test images' frozen features
        from .probe import head_linear, head_metrics

        test = head_metrics(head_linear(model, get_state(model).backbone.head_names), features["test"], task.num_classes)
    elif loaders.test is not None:
        test_loader = accelerator.prepare(loaders.test)
        with progress_bar(f"testing on {len(task.split(cfg.test_split)):,} images", len(test_loader),
                          enabled=main and not cfg.quiet) as tick:
            test = evaluate_model(accelerator.prepare(model), test_loader, task.num_classes, accelerator, on_batch=tick)
    metrics = {
        "method": cfg.method,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "task_group": getattr(task, "group", None),
        "seed": cfg.seed,
        "lr": cfg.lr,
        "epochs_run": loop.epoch,
        "best_epoch": loop.best_epoch,
        "selection": {"keep": selection.keep, "why": selection.why},
        "head_init": probe,
        "trainable_params": report.trainable,
        "method_params": report.method_params,
        "total_params": report.total,
        "trainable_percent": report.percent,
        "adapter_bytes": (output / WEIGHTS_NAME).stat().st_size,
        "best_val_top1": loop.best_top1 if loop.best_top1 >= 0 else None,
        "splits": {role: {"split": name, "images": len(task.split(name)), "about": about}
                   for role, (name, about) in splits.items()},
        "resize": get_state(model).resize,
        "test_top1": test.get("top1"),
        "test_top5": test.get("top5"),
        "test_mean_per_class_accuracy": test.get("mean_per_class_accuracy"),
        "train_seconds": loop.train_seconds,
        "images_per_second": loop.images_seen / max(loop.train_seconds, 1e-9),
        "peak_memory_mb": peak_memory_mb(),
        "processes": accelerator.num_processes,
    }
    accelerator.log({f"test/{k}": v for k, v in test.items()}, step=loop.step)
    if main:
        write_json(output / "metrics.json", metrics)
        write_history(output / "history.csv", loop.history)
        plot_curves(output / "curves.png", loop.history, f"{cfg.method} on {cfg.dataset} ({cfg.model})")
        from ..adapters.card import finetune_command, write_card

        write_card(output, metrics=metrics, command=finetune_command(cfg))  # README.md, now with the results
        if not cfg.quiet:
            print_summary(metrics, output)
    log("done", **metrics)
    accelerator.wait_for_everyone()
    return metrics


def _prepare(model: Any, loader: Any, accelerator: Any) -> float:
    """`Method.prepare` on the training batches, once before training; every process keeps the main
    process's result (its state tensors and trainable parameters), so DDP replicas agree. Returns the
    seconds it took."""
    import torch
    from accelerate.utils import broadcast

    from ..methods.inject import prepare, state_tensors

    def batches() -> Any:  # a generator function: the loader is only iterated if the method reads it
        for images, labels in loader:
            yield images.to(accelerator.device), labels.to(accelerator.device)

    t0 = time.perf_counter()
    prepare(model.to(accelerator.device), batches())
    if accelerator.num_processes > 1:
        with torch.no_grad():
            for tensor in [*state_tensors(model).values(), *(p for p in model.parameters() if p.requires_grad)]:
                tensor.copy_(broadcast(tensor.contiguous(), from_process=0))
    return time.perf_counter() - t0


def _probe_loop(model: Any, task: Any, accelerator: Any, output: Path, probe: dict[str, Any],
                features: dict[str, Any]) -> LoopState:
    """The loop's state for a run whose whole training was the probe: one record, the adapter saved."""
    from ..adapters.io import save_adapter
    from ..methods.freeze import get_state
    from .probe import head_linear, head_metrics

    if "seconds" not in probe:
        raise PeftVisionError(f"nothing to resume in {output}: a linear probe has no epochs; run it again")
    record: dict[str, Any] = {"epoch": 0, "train_loss": float("nan"), "lr": 0.0, "seconds": probe["seconds"]}
    state = LoopState(train_seconds=probe["seconds"], history=[record])
    if "val" in features:
        head = head_linear(model, get_state(model).backbone.head_names)
        val = head_metrics(head, features["val"], task.num_classes)
        record.update(val_loss=val["loss"], val_top1=val["top1"])
        state.best_top1 = val["top1"]
    state.best_epoch = 0
    if accelerator.is_main_process:
        save_adapter(model, output)
    return state
