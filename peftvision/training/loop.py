"""The training loop: accelerate, best-on-validation, exact resume, no method-specific branches.

The loop only sees a model whose trainable parameters are already chosen (by `inject`), data loaders
and a config. It runs the same in one process and under `accelerate launch` / torchrun (DDP); only the
main process writes files.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data import RunLoaders
from ..errors import ConfigError, TrainingDiverged
from ..methods.inject import lr_multipliers, state_tensors
from ..ui import GracefulInterrupt
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .evaluate import evaluate_model


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer factory, so every timm optimizer name and its defaults work as timm users know them.

    It takes only trainable tensors and keeps weight decay off 1-d tensors, biases and the model's own
    `no_weight_decay()` list (position embeddings, class token); `cfg.layer_decay` scales block i's lr by
    decay^(depth - i) through timm's `group_matcher`, the head and anything outside the blocks at full lr.
    A method's own lr multipliers (`Method.lr_multipliers`, e.g. LoRA+) multiply on top, per parameter, and
    `cfg.head_lr_ratio` on the head (None counts as 1; `finetune` resolves it for the method).
    """
    from timm.optim import create_optimizer_v2

    if cfg.lr is None:
        raise ConfigError("lr is unset: resolve the config first (peftvision.training.finetune.resolve_config fills the method's)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters: inject a method first")
    multipliers = lr_multipliers(model, 1.0 if cfg.head_lr_ratio is None else cfg.head_lr_ratio)
    try:
        return create_optimizer_v2(
            _scaled_groups(model, cfg, multipliers) if multipliers else model, opt=cfg.optimizer, lr=cfg.lr,
            weight_decay=cfg.weight_decay, momentum=cfg.momentum, layer_decay=cfg.layer_decay,
        )
    except ValueError as e:  # timm's "optimizer not found"
        raise ConfigError(f"--optimizer {cfg.optimizer}: {e}") from None


def _scaled_groups(model: nn.Module, cfg: TrainConfig, multipliers: dict[str, float]) -> list[dict[str, Any]]:
    """timm's own parameter groups (weight decay, layer decay), each split by the method's lr multipliers,
    which go into the group's `lr_scale`: timm's scheduler applies it at every step, as for layer decay."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_decay = getattr(model, "no_weight_decay", lambda: set())()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                                          no_weight_decay_list=no_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=cfg.weight_decay, no_weight_decay_list=no_decay)
    factor = {id(p): multipliers[n] for n, p in model.named_parameters() if n in multipliers}
    split: list[dict[str, Any]] = []
    for group in groups:
        by_factor: dict[float, list[nn.Parameter]] = {}
        for p in group["params"]:
            by_factor.setdefault(factor.get(id(p), 1.0), []).append(p)
        split += [{**group, "params": ps, "lr_scale": group.get("lr_scale", 1.0) * f} for f, ps in by_factor.items()]
    return split


def check_optimizer(name: str) -> None:
    """Fail before any data is loaded when timm has no optimizer of that name."""
    from timm.optim import list_optimizers

    if name.lower().split("_")[-1] not in list_optimizers():  # "lookahead_adamw" is timm's wrapper syntax
        raise ConfigError(f"unknown optimizer {name!r}; timm has: {', '.join(list_optimizers())}")


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> Any:
    """timm's cosine schedule per optimizer step: linear warm-up, then cosine decay to 0.

    Stepped with `step_update(steps_done)`; it also applies each group's `lr_scale` (layer decay).
    Warm-up starts at lr/warmup_steps rather than 0 so that the first step is not wasted.
    """
    from timm.scheduler import CosineLRScheduler

    base = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    return CosineLRScheduler(
        optimizer, t_initial=max(2, total_steps - warmup_steps),  # 1 warns; same lrs for the steps run
        lr_min=0.0, warmup_t=warmup_steps,
        warmup_lr_init=base / warmup_steps if warmup_steps else 0.0, warmup_prefix=True, t_in_epochs=False,
    )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The base lr now: a group's lr over its `lr_scale` (layer decay scales groups down, a method's lr
    multipliers up or down), so it is the schedule's value whatever the groups."""
    return max(g["lr"] / g["lr_scale"] if g.get("lr_scale") else g["lr"] for g in optimizer.param_groups)


@dataclass
class LoopState:
    """What the loop carries from epoch to epoch; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    best_top1: float = -1.0  # val top-1 of the kept epoch (-1: no validation)
    best_epoch: int = -1  # the kept epoch (best on val, or the last)
    bad_epochs: int = 0
    train_seconds: float = 0.0
    images_seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def train(
    model: nn.Module,
    loaders: RunLoaders,
    cfg: TrainConfig,
    output: Path,
    accelerator: Any,
    num_classes: int,
    resume: bool = False,
    on_best: Callable[[nn.Module], None] | None = None,
    on_epoch_end: Callable[[LoopState], None] | None = None,
    progress: Any = None,
) -> tuple[nn.Module, LoopState]:
    """Train `model` (already injected) for `cfg.epochs`, checkpointing every epoch to `output/checkpoint`.

    `on_best(model)` is called on the main process for every epoch whose adapter is to be kept: when
    validation improves with `cfg.keep == "best"`, every epoch otherwise (the last one wins); that is where
    the caller saves the adapter (`cfg.keep` resolved by `choose_selection`; "auto" counts as "last").
    Returns the unwrapped model as it is after the last epoch, and the loop state (history, kept epoch,
    timings).
    """
    optimizer = build_optimizer(model, cfg)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params.update(state_tensors(model))  # the method's untrained state (GPS's selection): a resume needs it
    ddp_model, optimizer, train_loader = accelerator.prepare(model, optimizer, loaders.train)
    val_loader = accelerator.prepare(loaders.val) if loaders.val is not None else None
    # the schedule counts this process's optimizer steps (its shard of the data), so it is the same
    # with 1 or N processes; timm's scheduler is stepped by hand, not through accelerate's wrapper
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    scheduler = build_scheduler(optimizer, int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)

    ckpt_dir = output / "checkpoint"
    state = LoopState(**load_checkpoint(ckpt_dir, params, optimizer, scheduler)) if resume else LoopState()
    scheduler.step_update(state.step)

    def checkpoint() -> None:
        if accelerator.is_main_process:
            save_checkpoint(ckpt_dir, params, optimizer, scheduler, dataclasses.asdict(state))
        accelerator.wait_for_everyone()

    if not resume:
        checkpoint()  # from the first step on, Ctrl-C leaves something to resume
    with GracefulInterrupt() as interrupt:
        while state.epoch < cfg.epochs:
            # ---- train one epoch
            ddp_model.train()
            # accelerate's prepared loader re-sets its sampler's epoch from its own counter at every
            # iteration; set that counter, or a resumed run would replay epoch 0's order
            (train_loader if hasattr(train_loader, "set_epoch") else loaders.sampler).set_epoch(state.epoch)
            t0, seen, loss_sum, batches = time.perf_counter(), 0, 0.0, 0
            if progress is not None:
                progress.start_epoch(state.epoch, len(train_loader))
            for images, labels in train_loader:
                with accelerator.accumulate(ddp_model):
                    with accelerator.autocast():
                        loss = nn.functional.cross_entropy(ddp_model(images), labels, label_smoothing=cfg.label_smoothing)
                    if not torch.isfinite(loss.detach()):
                        raise TrainingDiverged(
                            f"loss became {loss.item()} in epoch {state.epoch + 1}; the last good checkpoint "
                            f"(after epoch {state.epoch}) is in {ckpt_dir}: lower the learning rate (--lr, now "
                            f"{cfg.lr:g}) or keep --clip-grad, then start again"
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.clip_grad:
                        accelerator.clip_grad_norm_(ddp_model.parameters(), cfg.clip_grad)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        state.step += 1
                        scheduler.step_update(state.step)
                        accelerator.log({"train/loss": loss.item(), "train/lr": current_lr(optimizer)}, step=state.step)
                    optimizer.zero_grad(set_to_none=True)
                seen += labels.shape[0] * accelerator.num_processes
                loss_sum += loss.item()
                batches += 1
                if progress is not None:
                    progress.advance(loss.item(), seen / max(time.perf_counter() - t0, 1e-9))
                if interrupt.requested:
                    raise KeyboardInterrupt
            seconds = time.perf_counter() - t0
            state.train_seconds += seconds
            state.images_seen += seen

            # ---- validate, keep the best
            record: dict[str, Any] = {
                "epoch": state.epoch + 1,
                "train_loss": loss_sum / max(batches, 1),
                "lr": current_lr(optimizer),
                "seconds": seconds,
            }
            improved = True  # no validation, or the last epoch is kept: keep the latest
            if val_loader is not None:
                with (progress.step("validating", len(val_loader)) if progress is not None else nullcontext(None)) as tick:
                    val = evaluate_model(ddp_model, val_loader, num_classes, accelerator, on_batch=tick)
                record.update(val_loss=val["loss"], val_top1=val["top1"])
                best_so_far = max((h["val_top1"] for h in state.history if "val_top1" in h), default=-1.0)
                improved = val["top1"] > best_so_far if cfg.keep == "best" else True
                state.bad_epochs = 0 if val["top1"] > best_so_far else state.bad_epochs + 1  # --patience
                accelerator.log({"val/loss": val["loss"], "val/top1": val["top1"]}, step=state.step)
            accelerator.log({"train/epoch_loss": record["train_loss"], "epoch": state.epoch + 1}, step=state.step)
            state.epoch += 1
            state.history.append(record)
            if improved:  # the adapter to keep: best on val (keep=best) or the latest
                state.best_top1, state.best_epoch = record.get("val_top1", -1.0), state.epoch
                if accelerator.is_main_process and on_best is not None:
                    on_best(accelerator.unwrap_model(ddp_model))
            checkpoint()
            if on_epoch_end is not None:
                on_epoch_end(state)
            if cfg.patience and state.bad_epochs >= cfg.patience:
                break
    return accelerator.unwrap_model(ddp_model), state
