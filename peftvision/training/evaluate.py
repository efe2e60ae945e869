"""Metrics through HF `evaluate`, from modules shipped inside the package (works offline)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

METRICS_DIR = Path(__file__).parent / "metrics"


@lru_cache(maxsize=None)
def load_metric(name: str = "classification_accuracy") -> Any:
    """`evaluate.load` on our local module script: no hub access, same API as hub metrics."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def topk_predictions(logits: torch.Tensor, k: int = 5) -> torch.Tensor:
    """(N, C) logits -> (N, min(k, C)) class indices, best first."""
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices


def classification_metrics(topk: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """top1, top5 (when there are >= 5 classes) and mean per-class accuracy, as percentages."""
    metric = load_metric()
    result = metric.compute(predictions=topk.tolist(), references=labels.tolist(), num_classes=num_classes)
    return {k: 100.0 * v for k, v in result.items()}


@torch.no_grad()
def evaluate_model(
    model: nn.Module, loader: Any, num_classes: int, accelerator: Any = None, on_batch: Callable[[], None] | None = None,
) -> dict[str, float]:
    """loss, top1, top5, mean per-class accuracy (%) and the image count over a loader.

    The one evaluator: validation and the final test inside a run (with `accelerator`, whose prepared
    loaders shard the images and whose `gather_for_metrics` collects them across processes, dropping
    the padding of the last batch), `peftvision eval`, and anything else that scores a model.
    """
    model.eval()
    device = next(model.parameters()).device
    all_topk, all_labels, losses = [], [], []
    for images, labels in loader:
        if accelerator is None:
            images, labels = images.to(device), labels.to(device)
        logits = model(images).float()
        loss = nn.functional.cross_entropy(logits, labels, reduction="none")
        topk = topk_predictions(logits)
        if accelerator is not None:
            topk, labels, loss = accelerator.gather_for_metrics((topk, labels, loss))
        if on_batch is not None:
            on_batch()
        all_topk.append(topk.cpu())
        all_labels.append(labels.cpu())
        losses.append(loss.cpu())
    if not all_labels:
        return {"loss": float("nan"), "top1": 0.0, "mean_per_class_accuracy": 0.0, "images": 0}
    result = classification_metrics(torch.cat(all_topk), torch.cat(all_labels), num_classes)
    result["loss"] = float(torch.cat(losses).mean())
    result["images"] = int(sum(len(y) for y in all_labels))
    return result
