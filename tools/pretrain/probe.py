"""Linear probes: is a shipped backbone better than the same architecture randomly initialised?

    python -m tools.pretrain.probe [--models pv_vit_tiny_32 pv_swin_tiny_32] [--output benchmarks/linear-probe.md]

VTAB-1k protocol on every built-in task: features are the frozen model's pre-logits
(`forward_head(..., pre_logits=True)`, eval mode, the model's own preprocessing); a multinomial
logistic regression on standardised features picks its L2 strength C on `val200` after training on
`train800`, is refitted on `train800val200` with that C and scored on `test`. The random baseline is
`timm.create_model(name, pretrained=False)` after `torch.manual_seed(seed)`, the same seed protocol
as the pretraining run's initialisation. For a ViT, whose pretraining starts its position table from
2-D sin-cos values, a second control is that random model with those positions: the gain over it is
what the training itself added.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


@torch.no_grad()
def extract_features(model: nn.Module, images: Iterable[torch.Tensor]) -> np.ndarray:
    """Pre-logits features (N, D) of batches of preprocessed images, model frozen in eval mode."""
    model.eval()
    out = [model.forward_head(model.forward_features(x), pre_logits=True).float().numpy() for x in images]
    return np.concatenate(out)


def fit_score(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], c: float) -> float:
    """Accuracy on `test` of a logistic regression fitted on `train` (features standardised on train)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
    clf.fit(*train)
    return float(clf.score(*test))


def probe(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """VTAB-1k linear probe on features of the splits train800, val200, train800val200, test."""
    val = {c: fit_score(splits["train800"], splits["val200"], c) for c in C_GRID}
    best = max(C_GRID, key=lambda c: (val[c], -abs(np.log10(c))))  # ties: the more moderate C
    return dict(C=best, val=val[best], test=fit_score(splits["train800val200"], splits["test"], best))


# ----------------------------------------------------------------------------- models and data

def make_model(name: str, pretrained: bool, seed: int = 0, weights_dir: str | None = None) -> nn.Module:
    """A shipped model with its weights (from `weights_dir` instead, for candidate runs) or random."""
    import timm

    from peftvision.backbones.embedded import register_default_models

    register_default_models()
    torch.manual_seed(seed)
    overlay = dict(file=str(Path(weights_dir) / f"{name}.safetensors")) if pretrained and weights_dir else None
    return timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay)


def task_images(
    spec: str, model: nn.Module, seed: int = 0, batch_size: int = 250
) -> tuple[dict[str, tuple[list[torch.Tensor], np.ndarray]], dict[str, np.ndarray]]:
    """Images of train800val200 and test, preprocessed for `model` through `peftvision.data`, and the
    positions of train800 / val200 inside train800val200 (so each image is encoded once)."""
    from peftvision.data import build_loader, load_task, make_transform

    task = load_task(spec, seed=seed)
    transform = make_transform(model, resize=task.resize)  # the model's own size / mean / std; no augmentation
    images = {}
    for split in ("train800val200", "test"):
        ds = task.dataset(split, transform)
        images[split] = ([x for x, _ in build_loader(ds, batch_size)], np.asarray(ds.labels))
    where = {row: i for i, row in enumerate(task.indices("train800val200"))}
    subsets = {s: np.array([where[row] for row in task.indices(s)]) for s in ("train800", "val200")}
    return images, subsets


def probe_tasks(spec: str = "builtin:all") -> list[tuple[str, str]]:
    """(spec, VTAB group) of every built-in task available on this machine."""
    from peftvision.data import list_tasks as expand
    from peftvision.data.builtin import SUITE

    return [(t, SUITE[t.split(":", 1)[1]].group) for t in expand(spec)]


# ----------------------------------------------------------------------------- the benchmark

def run(
    models: list[str], seed: int = 0, weights_dir: str | None = None, log: Any = print
) -> list[dict[str, Any]]:
    from peftvision.ui import progress_bar

    rows = []
    with progress_bar("linear probes (model x task)", len(models) * len(probe_tasks())) as tick:
        for name in models:
            rows += _probe_model(name, seed, weights_dir, log, tick)
    return rows


def _probe_model(name: str, seed: int, weights_dir: str | None, log: Any, tick: Any) -> list[dict[str, Any]]:
    """Every built-in task on one model: random init (and sin-cos positions) against the shipped weights."""
    from .run import sincos_pos_embed_

    nets = {"random": make_model(name, False, seed)}
    sincos = make_model(name, False, seed)
    if sincos_pos_embed_(sincos):
        nets["random_sincos"] = sincos
    nets["pretrained"] = make_model(name, True, seed, weights_dir)
    rows = []
    for task, group in probe_tasks():
        t0 = time.time()
        images, subsets = task_images(task, nets["pretrained"], seed)
        row: dict[str, Any] = dict(model=name, task=task, group=group)
        for kind, net in nets.items():
            feats = {s: (extract_features(net, x), y) for s, (x, y) in images.items()}
            f, y = feats["train800val200"]
            feats.update({s: (f[i], y[i]) for s, i in subsets.items()})
            row[kind] = probe(feats)
        row["gain"] = row["pretrained"]["test"] - row["random"]["test"]
        log(f"{name} {task}: random {row['random']['test']:.3f} pretrained {row['pretrained']['test']:.3f} "
            f"({time.time() - t0:.0f}s)")
        rows.append(row)
        tick()
    return rows


def to_markdown(rows: list[dict[str, Any]], seed: int) -> str:
    lines = [
        "# Linear probes: shipped weights vs. random initialisation",
        "",
        "Generated by `python -m tools.pretrain.probe` (do not edit by hand). VTAB-1k protocol on every",
        "built-in task: frozen backbone in eval mode, features = pre-logits (`forward_head(x, pre_logits=True)`),",
        "standardised; multinomial logistic regression with C chosen from "
        f"{', '.join(str(c) for c in C_GRID)} on val200",
        "(trained on train800), refitted on train800val200, accuracy on test (%). Random init: same architecture,",
        f"`torch.manual_seed({seed})` then `timm.create_model(name, pretrained=False)`.",
        "",
    ]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        control = "random_sincos" in mine[0]
        head = "| task | group | random init |" + (" random + sin-cos positions |" if control else "")
        lines += [f"## {name}", "", head + " pretrained | gain |", "|---|---|---:|" + ("---:|" if control else "") + "---:|---:|"]
        for r in mine:
            cells = [r["task"], r["group"], f"{100 * r['random']['test']:.1f}"]
            cells += [f"{100 * r['random_sincos']['test']:.1f}"] if control else []
            cells += [f"{100 * r['pretrained']['test']:.1f}", f"{100 * r['gain']:+.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        mean = lambda k: 100 * float(np.mean([r[k]["test"] for r in mine]))  # noqa: E731
        gain = 100 * float(np.mean([r["gain"] for r in mine]))
        cells = ["**mean**", "", f"**{mean('random'):.1f}**"] + ([f"**{mean('random_sincos'):.1f}**"] if control else [])
        cells += [f"**{mean('pretrained'):.1f}**", f"**{gain:+.1f}**"]
        lines += ["| " + " | ".join(cells) + " |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from peftvision.backbones.weights import DEFAULT_MODELS

    p = argparse.ArgumentParser(prog="python -m tools.pretrain.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights-dir", help="probe <dir>/<model>.safetensors instead of the shipped weights")
    p.add_argument("--output", default="benchmarks/linear-probe.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.models, args.seed, args.weights_dir, log=lambda s: print(s, flush=True))
    out = Path(args.output)
    out.write_text(to_markdown(rows, args.seed) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
