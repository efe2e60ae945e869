"""The training loop: accelerate, best-on-validation, exact resume, no method-specific branches.

The loop only sees a model whose trainable parameters are already chosen (by `inject`), data loaders
and a config. It runs the same in one process and under `accelerate launch` / torchrun (DDP); only the
main process writes files.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import RunLoaders
from .errors import ConfigError, TrainingDiverged
from .evaluate import evaluate_model
from .ui import GracefulInterrupt


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Only trainable tensors; decay only matrices (nanoGPT's rule: p.dim() >= 2)."""
    if cfg.lr is None:
        raise ConfigError("lr is unset: resolve the config first (peftvision.finetune.resolve_config fills the method's)")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 0, per optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class LoopState:
    """What the loop carries from epoch to epoch; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    best_top1: float = -1.0
    best_epoch: int = -1
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

    `on_best(model)` is called on the main process whenever validation improves (every epoch without
    validation): that is where the caller keeps the best adapter. Returns the unwrapped model as it is
    after the last epoch, and the loop state (history, best epoch, timings).
    """
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(loaders.train) / cfg.grad_accum)
    scheduler = build_scheduler(optimizer, int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ddp_model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, loaders.train, scheduler)
    val_loader = accelerator.prepare(loaders.val) if loaders.val is not None else None

    ckpt_dir = output / "checkpoint"
    state = LoopState(**load_checkpoint(ckpt_dir, params, optimizer, scheduler)) if resume else LoopState()

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
                        scheduler.step()
                        state.step += 1
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
                "lr": scheduler.get_last_lr()[0],
                "seconds": seconds,
            }
            improved = True  # no validation: keep the latest
            if val_loader is not None:
                val = evaluate_model(ddp_model, val_loader, num_classes, accelerator)
                record.update(val_loss=val["loss"], val_top1=val["top1"])
                improved = val["top1"] > state.best_top1
            state.epoch += 1
            state.history.append(record)
            if improved:
                state.best_top1, state.best_epoch, state.bad_epochs = record.get("val_top1", -1.0), state.epoch, 0
                if accelerator.is_main_process and on_best is not None:
                    on_best(accelerator.unwrap_model(ddp_model))
            else:
                state.bad_epochs += 1
            checkpoint()
            if on_epoch_end is not None:
                on_epoch_end(state)
            if cfg.patience and state.bad_epochs >= cfg.patience:
                break
    return accelerator.unwrap_model(ddp_model), state
