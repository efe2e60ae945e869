"""A linear probe on frozen features: the head as the solution of an L2-regularised logistic regression.

What the linear-probe literature does (CLIP's protocol): one pass computes the features the head sees,
then a full-batch L-BFGS fit of a multinomial logistic regression, its L2 strength picked on held-out
features. A head fitted this way is the `linear` method's whole training (the objective is convex: no
epochs needed), and the starting head of every other method with `head_init="probe"` (LP-FT, Kumar et
al. 2022: a head that already fits keeps the first fine-tuning steps from distorting the features).

The L2 strength is chosen by held-out log loss (smoother than accuracy on a few dozen images): on the
validation features when the run has them, else by stratified k-fold on the training features.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

# L2 strengths tried, per image of the mean loss, on standardised features: from a head that can
# barely move (1) to an almost unregularised one (1e-6)
L2_GRID = tuple(10.0 ** (-k / 2) for k in range(0, 13))
MAX_FOLDS = 5


@dataclass(frozen=True)
class ProbeFit:
    """A fitted head (on raw features) and how its L2 strength was chosen."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    l2: float
    chosen_on: str  # "val (N images)" or "K-fold on train (N images)"
    held_out_loss: float
    held_out_top1: float


def head_linear(model: nn.Module, head_names: list[str] | tuple[str, ...]) -> nn.Linear:
    """The Linear that maps features to logits: the last Linear among the head modules."""
    linears = [m for name in head_names for m in model.get_submodule(name).modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"the head ({', '.join(head_names)}) has no Linear layer to fit")
    return linears[-1]


@torch.no_grad()
def extract_features(
    model: nn.Module, head: nn.Linear, loader: Any, accelerator: Any = None, on_batch: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), labels (N,)) of every image of `loader`: what `head` reads, captured by a hook
    on its input (so any pooling, norm or prompt handling before it is the model's own), in eval mode."""
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().float()))
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, y in loader:
            if accelerator is None:
                images = images.to(next(model.parameters()).device)
            captured.clear()
            model(images)
            f = captured[-1].reshape(len(y), -1)
            if accelerator is not None:
                f, y = accelerator.gather_for_metrics((f, y))
            feats.append(f.cpu())
            labels.append(y.cpu())
            if on_batch is not None:
                on_batch()
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
         start: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features x: mean cross-entropy + l2/2 ||W||^2."""
    w = (start[0].clone() if start else torch.zeros(num_classes, x.shape[1], dtype=x.dtype)).requires_grad_(True)
    b = (start[1].clone() if start else torch.zeros(num_classes, dtype=x.dtype)).requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _path(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fits for every L2 of the grid, strongest first, each warm-started from the previous one."""
    fits, start = [], None
    for l2 in L2_GRID:
        start = _fit(x, y, num_classes, l2, start)
        fits.append(start)
    return fits


def _scores(fit: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    logits = x @ fit[0].T + fit[1]
    return float(nn.functional.cross_entropy(logits, y, reduction="sum")), int((logits.argmax(1) == y).sum())


def _folds(y: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """Stratified fold index of every sample (each class dealt round-robin in a seeded order)."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(y)
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold[idx] = torch.arange(len(idx)) % k
    return [fold == i for i in range(k)]


def fit_probe(
    train: tuple[torch.Tensor, torch.Tensor], num_classes: int, val: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
) -> ProbeFit:
    """Fit the head on `train` features, its L2 strength chosen on `val` (or by k-fold on train)."""
    x, y = train[0].double(), train[1]
    mu = x.mean(0)
    sd = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(mu)
    z = (x - mu) / sd
    path = _path(z, y, num_classes)
    loss = torch.zeros(len(L2_GRID), dtype=torch.float64)
    correct = torch.zeros(len(L2_GRID), dtype=torch.float64)
    if val is not None and len(val[1]):
        zv, yv = (val[0].double() - mu) / sd, val[1]
        for i, fit in enumerate(path):
            loss[i], correct[i] = _scores(fit, zv, yv)
        n_held, chosen_on = len(yv), f"val ({len(yv)} images)"
    else:
        k = max(2, min(MAX_FOLDS, int(torch.bincount(y).min())))
        for held in _folds(y, k, seed):
            for i, fit in enumerate(_path(z[~held], y[~held], num_classes)):
                s = _scores(fit, z[held], y[held])
                loss[i] += s[0]
                correct[i] += s[1]
        n_held, chosen_on = len(y), f"{k}-fold on train ({len(y)} images)"
    best = int(torch.argmin(loss))  # ties: the stronger L2 (earlier in the grid)
    w, b = path[best]
    weight = w / sd  # back to raw features: z @ w.T + b == x @ (w / sd).T + (b - (mu / sd) @ w.T)
    bias = b - (mu / sd) @ w.T
    return ProbeFit(weight.float(), bias.float(), L2_GRID[best], chosen_on,
                    float(loss[best]) / max(n_held, 1), 100.0 * float(correct[best]) / max(n_held, 1))


def set_head(head: nn.Linear, fit: ProbeFit) -> None:
    with torch.no_grad():
        head.weight.copy_(fit.weight.to(head.weight))
        if head.bias is not None:
            head.bias.copy_(fit.bias.to(head.bias))
        elif fit.bias.abs().max() > 0:
            raise ValueError("the head has no bias to hold the probe's")


def scale_head(model: nn.Module, scale: float) -> None:
    """Multiply the head's logits by `scale` (weights and bias): the same argmax, a softer start."""
    from ..methods.freeze import get_state

    with torch.no_grad():
        for p in head_linear(model, get_state(model).backbone.head_names).parameters():
            p.mul_(scale)


def describe_fit(fit: ProbeFit) -> str:
    return (f"linear probe: L2 {fit.l2:.0e} chosen on {fit.chosen_on} (held-out top-1 {fit.held_out_top1:.1f}%, "
            f"loss {fit.held_out_loss:.3f})")



# ----------------------------------------------------------------------------- in a run

def split_features(
    model: nn.Module, head: nn.Linear, task: Any, split: str, transform: Any, *, batch_size: int, num_workers: int,
    accelerator: Any, model_key: dict[str, Any] | None, shown: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of a split's images as `head` reads them; through the on-disk cache when
    `model_key` describes the model (None: the model's features are not the base's, computed live)."""
    from ..data import build_loader
    from ..data.task import Split, TaskDataset
    from ..ui import progress_bar
    from .features import cached_features, feature_key

    part = task.split(split)

    def compute(rows: np.ndarray) -> torch.Tensor:
        dataset = TaskDataset(Split(part.source, rows, np.zeros(len(rows), np.int64)), transform)
        loader = accelerator.prepare(build_loader(dataset, batch_size=batch_size, num_workers=num_workers))
        note = ", cached for later runs" if model_key is not None else ""
        with progress_bar(f"features of {len(rows):,} {split} images{note}", len(loader), enabled=shown) as tick:
            return extract_features(model, head, loader, accelerator, on_batch=tick)[0]

    key = feature_key(model_key, part.source) if model_key is not None else None
    feats = cached_features(key, part.indices, compute, write=accelerator.is_main_process)
    accelerator.wait_for_everyone()  # the cache file is complete before any process reads it again
    return feats, torch.from_numpy(part.labels.copy()).long()


def base_model_key(model: nn.Module, state: Any, transform: Any) -> dict[str, Any]:
    """What the base's head-input features depend on (see features.py): weights, architecture, preprocessing,
    and the decoding code itself."""
    from ..backbones.backbone import model_spec
    from ..data import images

    spec = model_spec(model)
    decoder = hashlib.sha256(Path(images.__file__).read_bytes()).hexdigest()[:16]
    return {"weights": state.base_fingerprint, "architecture": state.architecture_signature, "name": spec.name,
            "kwargs": spec.kwargs, "transform": repr(transform), "decoder": decoder}


def probe_head(model: nn.Module, task: Any, cfg: Any, resize: str, accelerator: Any, cache: bool,
               with_test: bool = False) -> dict[str, Any]:
    """Fit the head of an injected model as a linear probe on the frozen features of its training images
    (L2 picked on the val images, else by k-fold on train) and put it in the model. With `cache`, the
    features come from (and go to) the on-disk cache; `with_test` adds the test split's (a probe-only
    run is tested on them). Returns what was chosen, and the features."""
    from accelerate.utils import broadcast

    from ..data import make_transform
    from ..methods.freeze import get_state

    t0 = time.perf_counter()
    state = get_state(model)
    head = head_linear(model, state.backbone.head_names)
    transform = make_transform(model, train=False, resize=resize)
    key = base_model_key(model, state, transform) if cache else None
    features = {
        role: split_features(model, head, task, split, transform, batch_size=cfg.batch_size,
                             num_workers=cfg.num_workers, accelerator=accelerator, model_key=key,
                             shown=accelerator.is_main_process and not cfg.quiet)
        for role, split in (("train", cfg.train_split), ("val", cfg.val_split), ("test", cfg.test_split))
        if split and (role != "test" or with_test)
    }
    fit = fit_probe(features["train"], task.num_classes, features.get("val"), seed=cfg.seed)
    set_head(head, fit)
    for p in head.parameters():  # every process fitted the same; rank 0's is the one all keep
        p.data.copy_(broadcast(p.data.contiguous(), from_process=0))
    return {"l2": fit.l2, "chosen_on": fit.chosen_on, "held_out_top1": fit.held_out_top1,
            "held_out_loss": fit.held_out_loss, "seconds": time.perf_counter() - t0, "about": describe_fit(fit),
            "cached": cache, "features": features}


def head_metrics(head: nn.Linear, features: tuple[torch.Tensor, torch.Tensor], num_classes: int) -> dict[str, float]:
    """What `evaluate_model` reports, from features through the head alone (the model's own output when
    only the head differs from the base)."""
    from .evaluate import classification_metrics, topk_predictions

    x, y = features
    with torch.no_grad():
        logits = head(x.to(head.weight)).float()
    result = classification_metrics(topk_predictions(logits), y, num_classes)
    result["loss"] = float(nn.functional.cross_entropy(logits, y))
    result["images"] = int(len(y))
    return result
