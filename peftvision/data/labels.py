"""A classifier's answer as people and programs read it: the top-k classes, named, with probabilities.

One formatter behind `peftvision predict` (a line per image), `explain` (a figure's title and its
line) and `serve` (JSON), so the three agree on names, order and rounding.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def top_k(probs: torch.Tensor, names: Sequence[str] | None, k: int) -> list[dict[str, Any]]:
    """The k most probable classes of one image's (K,) probabilities, best first, as
    {"label", "index", "score"}; a class without a name is labelled by its index."""
    top = probs.float().topk(min(k, probs.numel()))
    label = lambda i: names[i] if names and i < len(names) else str(i)  # noqa: E731
    return [{"label": label(i), "index": i, "score": p} for p, i in zip(top.values.tolist(), top.indices.tolist())]


def format_top_k(predictions: list[dict[str, Any]]) -> str:
    """"robin 0.912, jay 0.051": `top_k`'s answer on one line."""
    return ", ".join(f"{p['label']} {p['score']:.3f}" for p in predictions)
