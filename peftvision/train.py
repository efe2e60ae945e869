"""The training loop: accelerate, best-on-validation, exact resume, no method-specific branches.

The loop only sees a model whose trainable parameters are already chosen (by `inject`), data loaders
and a config. It runs the same in one process and under `accelerate launch` / torchrun (DDP); only the
main process writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .config import TrainConfig
from .errors import ConfigError, PeftVisionError


class TrainingDiverged(PeftVisionError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------- optimisation

def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Only trainable tensors; decay only matrices (nanoGPT's rule: p.dim() >= 2)."""
    if cfg.lr is None:
        raise ConfigError("lr is unset: resolve the config first (peftvision.run.resolve_config fills the method's)")
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
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EpochSampler(torch.utils.data.Sampler[int]):
    """A shuffle that depends only on (seed, epoch): every DDP rank and every resumed run agree."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Any, accelerator: Any, num_classes: int) -> dict[str, float]:
    """loss, top1, top5, mean per-class accuracy over a loader (gathered across processes)."""
    from .evaluate import classification_metrics, topk_predictions

    model.eval()
    all_topk, all_labels, losses = [], [], []
    for images, labels in loader:
        logits = model(images).float()
        loss = nn.functional.cross_entropy(logits, labels, reduction="none")
        topk, labels, loss = accelerator.gather_for_metrics((topk_predictions(logits), labels, loss))
        all_topk.append(topk.cpu())
        all_labels.append(labels.cpu())
        losses.append(loss.cpu())
    if not all_labels:
        return {"loss": float("nan"), "top1": 0.0, "mean_per_class_accuracy": 0.0}
    result = classification_metrics(torch.cat(all_topk), torch.cat(all_labels), num_classes)
    result["loss"] = float(torch.cat(losses).mean())
    return result


# ----------------------------------------------------------------------------- the loop

@dataclass
class LoopState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    best_top1: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    train_seconds: float = 0.0
    images_seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or the process's peak RSS on CPU.

    On Linux the peak RSS is read from /proc (VmHWM): `ru_maxrss` survives fork + exec, so a process
    started by a big parent would report the parent's peak.
    """
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def reset_peak_memory() -> None:
    """Start `peak_memory_mb` afresh, so that runs sharing a process (`compare`) each report their own
    peak rather than the largest so far. On Linux, writing 5 to /proc/self/clear_refs resets VmHWM."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak stays process-wide (the largest of the runs so far)


class _GracefulInterrupt:
    """Turn the first Ctrl-C / SIGTERM into a flag checked between steps; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_GracefulInterrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    model: nn.Module,
    loaders: dict[str, Any],
    cfg: TrainConfig,
    output: Path,
    accelerator: Any,
    num_classes: int,
    resume: bool = False,
    on_epoch_end: Callable[[LoopState], None] | None = None,
    progress: Any = None,
) -> tuple[nn.Module, LoopState]:
    """Train `model` (already injected) and keep the best-on-validation adapter in `output`.

    Returns the model with the best adapter loaded, and the loop state (history, timings).
    """
    from .checkpoint import load_checkpoint, save_checkpoint
    from .export import save_adapter

    train_loader = loaders["train"]
    sampler: EpochSampler = loaders["train_sampler"]
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    scheduler = build_scheduler(optimizer, int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ddp_model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {k: accelerator.prepare(v) for k, v in loaders.items() if k in ("val", "test") and v is not None}

    ckpt_dir = output / "checkpoint"
    state = LoopState()
    if resume:
        state = LoopState(**load_checkpoint(ckpt_dir, params, optimizer, scheduler))
    elif accelerator.is_main_process:
        save_checkpoint(ckpt_dir, params, optimizer, scheduler, dataclasses.asdict(state))
    accelerator.wait_for_everyone()

    def checkpoint() -> None:
        if accelerator.is_main_process:
            save_checkpoint(ckpt_dir, params, optimizer, scheduler, dataclasses.asdict(state))
        accelerator.wait_for_everyone()

    with _GracefulInterrupt() as interrupt:
        while state.epoch < cfg.epochs:
            # ---- train one epoch
            ddp_model.train()
            # accelerate's prepared loader re-sets its sampler's epoch from its own counter at every
            # iteration; set that counter, or a resumed run would replay epoch 0's order
            (train_loader if hasattr(train_loader, "set_epoch") else sampler).set_epoch(state.epoch)
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
                    if accelerator.sync_gradients:
                        if cfg.clip_grad:
                            accelerator.clip_grad_norm_(ddp_model.parameters(), cfg.clip_grad)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                        state.step += 1
                    optimizer.zero_grad(set_to_none=True)
                n = labels.shape[0] * accelerator.num_processes
                seen += n
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
            if "val" in eval_loaders:
                val = evaluate_model(ddp_model, eval_loaders["val"], accelerator, num_classes)
                record.update(val_loss=val["loss"], val_top1=val["top1"])
                improved = val["top1"] > state.best_top1
            else:
                improved = True  # no validation: keep the latest
            state.epoch += 1
            if improved:
                state.best_top1 = record.get("val_top1", -1.0)
                state.best_epoch = state.epoch
                state.bad_epochs = 0
                if accelerator.is_main_process:
                    save_adapter(accelerator.unwrap_model(ddp_model), output)
            else:
                state.bad_epochs += 1
            state.history.append(record)
            checkpoint()
            if on_epoch_end is not None:
                on_epoch_end(state)
            if cfg.patience and state.bad_epochs >= cfg.patience:
                break
    return accelerator.unwrap_model(ddp_model), state


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    from .export import atomic_write_text

    columns = ["epoch", "train_loss", "val_loss", "val_top1", "lr", "seconds"]
    lines = [",".join(columns)]
    for row in history:
        lines.append(",".join("" if row.get(c) is None else f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot_curves(path: Path, history: list[dict[str, Any]], title: str) -> None:
    """Loss and accuracy per epoch, as a PNG people can look at."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .export import atomic_write

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    if any("val_loss" in r for r in history):
        ax1.plot(epochs, [r.get("val_loss") for r in history], marker="o", label="val")
        ax2.plot(epochs, [r.get("val_top1") for r in history], marker="o", color="tab:green")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax1.legend()
    ax2.set(xlabel="epoch", ylabel="top-1 (%)", title="validation accuracy")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def write_json(path: Path, data: dict[str, Any]) -> None:
    from .export import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
