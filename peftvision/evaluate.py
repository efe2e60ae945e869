"""Metrics through HF `evaluate`, from modules shipped inside the package (works offline)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

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
