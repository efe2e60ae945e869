"""Our `finetune` on a real pretrained backbone and real photos, against plain loops on the same splits.

    python benchmarks/real_backbone.py [--backbone FILE] [--data DIR] [--seeds 0,1,2] [--epochs 3]
        [--batch-size 32] [--runs plain-lora,plain-linear,plain-full,lora,adapter,...] [--output FILE.json]

Defaults: the real ViT-Tiny/16 in ../shared/backbones and the 1,000 photos of
../shared/data/imagenet-sample-coarse4 (four class folders, no split folders). Both sides use the same
200 test photos (peftvision's fixed, seed-independent hold-out of a folder without split folders) and
train on the other 800; every number is top-1 on those 200.

- `plain-lora`: the 40-line loop a user would write with HF PEFT: LoRA r=8 on the fused `qkv`
  (`modules_to_save=["head"]`), AdamW at a constant lr 1e-3, timm's own eval transform, all 800
  training images, the last epoch is tested.
- `plain-linear`: the same loop training only the head; `plain-full`: every weight, lr 1e-4.
- `<method>`: `peftvision.training.finetune` with that method and every default except --epochs and
  --batch-size (the split, the transform, the lr, the schedule and model selection are ours).
- `<method>@<key>=<value>[+...]`: the same with TrainConfig fields or the method's options changed
  (`lora@lr=1e-3`, `lora@lora.r=16+lr=5e-3`, `lora@lora.targets=q/k/v`: `/` stands for a list's comma),
  to measure what one default costs.

Each finished run is appended to the output JSON at once, so an interrupted benchmark resumes where it
stopped; `--summary` prints the table (mean ± std over seeds) from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PEFTVISION_SHARED", ROOT.parent / "shared"))  # a copy of the tree runs too
BACKBONE = SHARED / "backbones" / "vit_tiny_patch16_224.in1k_tin200.safetensors"
DATA = SHARED / "data" / "imagenet-sample-coarse4"
MODEL = "vit_tiny_patch16_224"
# a run with overrides that are today's defaults -> the default's name (the plot draws it as the default)
RAN_BEFORE_DEFAULT = {"lora@lora.targets=q/k/v": "lora", "dora@dora.targets=q/k/v": "dora"}
DEFAULT_RUNS = "plain-lora,plain-linear,plain-full,linear,full,bitfit,lora,adapter,vpt-shallow,vpt-deep"


def class_folder_split(data: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train, test) lists of (path, label) by peftvision's rule for a folder of class folders."""
    import numpy as np

    from peftvision.data import load_task

    task = load_task(f"imagefolder:{data}", seed=0)
    source = task.split("test").source
    pairs = {}
    for name in ("trainval", "test"):
        split = task.split(name)
        pairs[name] = [(source.paths[int(i)], int(y)) for i, y in zip(split.indices, split.labels)]
    assert not set(p for p, _ in pairs["trainval"]) & set(p for p, _ in pairs["test"])
    assert np.bincount([y for _, y in pairs["test"]]).min() > 0
    return pairs["trainval"], pairs["test"], list(task.class_names)


# ----------------------------------------------------------------------------- the plain loop

def plain_loop(kind: str, backbone: Path, train: list, test: list, num_classes: int, epochs: int,
               batch_size: int, seed: int, workers: int) -> dict[str, Any]:
    """What a user writes with timm + HF PEFT in 40 lines; nothing of peftvision is used here."""
    import timm
    import timm.data
    import torch
    from PIL import Image

    torch.manual_seed(seed)
    model = timm.create_model(MODEL, pretrained=True, num_classes=num_classes,
                              pretrained_cfg_overlay=dict(file=str(backbone)))
    lr = 1e-3
    if kind == "plain-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["qkv"], modules_to_save=["head"]))
    elif kind == "plain-linear":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head"))
    elif kind == "plain-full":
        lr = 1e-4
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

    class Files(torch.utils.data.Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            path, label = self.items[i]
            return transform(Image.open(path).convert("RGB")), label

    g = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(Files(train), batch_size=batch_size, shuffle=True, generator=g,
                                               num_workers=workers, persistent_workers=workers > 0)
    test_loader = torch.utils.data.DataLoader(Files(test), batch_size=batch_size, num_workers=workers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += int((model(x).argmax(-1) == y).sum())
    return {"test_top1": 100.0 * correct / len(test), "train_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- our finetune

def ours(run: str, backbone: Path, data: Path, epochs: int, batch_size: int, seed: int) -> dict[str, Any]:
    from peftvision.training.config import build_config
    from peftvision.training.finetune import finetune

    method, _, changes = run.partition("@")
    sets = [item.replace("/", ",") for item in changes.split("+") if item]  # as `finetune --set KEY=VALUE`
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(sets=sets, flags=dict(
            method=method, model=MODEL, checkpoint=str(backbone), dataset=f"imagefolder:{data}",
            epochs=epochs, batch_size=batch_size, seed=seed, output=str(Path(tmp) / "run"), quiet=True,
        ))
        metrics = finetune(cfg)
    keep = ("test_top1", "best_val_top1", "best_epoch", "train_seconds", "lr", "trainable_params", "test_images",
            "train_images", "val_images")
    return {k: metrics.get(k) for k in keep}


# ----------------------------------------------------------------------------- driver

def summary(results: list[dict[str, Any]]) -> str:
    runs = list(dict.fromkeys(r["run"] for r in results))
    lines = ["| run | seeds | test top-1 (mean ± std) | per seed | wall time per run (s) |", "|---|---|---|---|---|"]
    for run in runs:
        rows = [r for r in results if r["run"] == run]
        top1 = [r["test_top1"] for r in rows]
        wall = [r["wall_seconds"] for r in rows]
        std = statistics.stdev(top1) if len(top1) > 1 else 0.0
        lines.append(f"| {run} | {len(rows)} | {statistics.fmean(top1):.1f} ± {std:.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in top1)} | {statistics.fmean(wall):.0f} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Test top-1 (mean ± std over seeds) against the percentage of trainable weights, one point per run
    at default settings (runs with `@` overrides left out); `plain-*` at the count of what they train."""
    import matplotlib

    matplotlib.use("Agg")
    import copy

    import matplotlib.pyplot as plt

    import peftvision as pv
    from peftvision.files import save_png

    base = pv.create_model(MODEL, num_classes=4)
    same_as = {"plain-lora": ("lora", {"targets": ("qkv",)}), "plain-linear": ("linear", {}), "plain-full": ("full", {})}
    fig, ax = plt.subplots(figsize=(8, 5))
    # runs measured before their settings became the default stand for the default and replace its rows
    for run, default in RAN_BEFORE_DEFAULT.items():
        if any(r["run"] == run for r in results):
            results = [dict(r, run=default) if r["run"] == run else r for r in results if r["run"] != default]
    for i, run in enumerate(dict.fromkeys(r["run"] for r in results)):
        if "@" in run:
            continue
        method, options = same_as.get(run, (run, {}))
        percent = pv.param_report(pv.inject(copy.deepcopy(base), method, **options)).percent
        top1 = [r["test_top1"] for r in results if r["run"] == run]
        std = statistics.stdev(top1) if len(top1) > 1 else 0.0
        ax.errorbar(percent, statistics.fmean(top1), yerr=std, fmt="s" if run.startswith("plain-") else "o", capsize=3)
        ax.annotate(run, (percent, statistics.fmean(top1)), textcoords="offset points", xytext=(5, 4 - 10 * (i % 2)), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable weights (% of the model, log scale)")
    ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    ax.set_title(f"{MODEL} (real) on imagenet-sample-coarse4, 3 epochs")
    ax.grid(alpha=0.3)
    save_png(path, fig)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", type=Path, default=BACKBONE)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--runs", default=DEFAULT_RUNS)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop (ours: its default)")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results-real-backbone.json")
    p.add_argument("--summary", nargs="*", metavar="FILE", help="only print the table of --output (or of these files)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="with --summary: also draw accuracy against trainable weights")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results: list[dict[str, Any]] = json.loads(args.output.read_text())["runs"] if args.output.is_file() else []
    if args.summary is not None:
        files = [Path(f) for f in args.summary] or [args.output]
        rows = [r for f in files for r in json.loads(f.read_text())["runs"]]
        print(summary(rows))
        if args.plot:
            plot(rows, args.plot)
        return 0
    if not args.backbone.is_file() or not args.data.is_dir():
        print(f"needs {args.backbone} and {args.data} (../shared)", file=sys.stderr)
        return 2
    import torch

    train, test, classes = class_folder_split(args.data)
    machine = {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    for seed in (int(s) for s in args.seeds.split(",")):
        for run in args.runs.split(","):
            if any(r["run"] == run and r["seed"] == seed and r["epochs"] == args.epochs for r in results):
                continue
            t0 = time.perf_counter()
            if run.startswith("plain-"):
                row = plain_loop(run, args.backbone, train, test, len(classes), args.epochs, args.batch_size, seed, args.workers)
            else:
                row = ours(run, args.backbone, args.data, args.epochs, args.batch_size, seed)
            row.update(run=run, seed=seed, epochs=args.epochs, batch_size=args.batch_size,
                       wall_seconds=time.perf_counter() - t0, **machine)
            results.append(row)
            print(f"{run} seed {seed}: test top-1 {row['test_top1']:.1f}%, {row['wall_seconds']:.0f} s", flush=True)
            tmp = args.output.with_suffix(".tmp")
            tmp.write_text(json.dumps({"train": len(train), "test": len(test), "runs": results}, indent=1) + "\n")
            os.replace(tmp, args.output)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
