"""Defaults on real photos of every size: our finetune against plain loops over a matrix of regimes.

    python benchmarks/real_regimes.py [--regimes all|like-245|NAME,...] [--runs lora,plain-lora,...] [--seeds 0,1,2]
        [--epochs 5] [--batch-size 32] [--curves] [--output FILE.json]
    python benchmarks/real_regimes.py --summary [--output FILE] [--also FILE ...] [--regimes ...] [--runs ...] [--plot PNG]

The real ViT-Tiny/16 and the 1,000 real photos of ../shared (four coarse classes: dog 118, bird 59,
other_animal 221, object 602) are cut into regimes: a task (which classes, balanced or not), a number
of training photos (60 to 800) and a layout (`train/` + `test/`, or `train/` + `val/` + `test/`). Each
task has ONE fixed test set, disjoint from every training photo of every regime of that task, so all
its regimes and runs are scored on the same photos. Regime folders are symbolic links into ../shared
(nothing is copied), built under --work, the same bytes every time (fixed seed).

Runs (every run: --epochs, --batch-size, --seed; nothing else set unless the run says so):
- `<method>`: `peftvision.training.finetune` with every default (split policy, transform, lr, schedule, head).
- `<method>@<key>=<value>[+...]`: the same with TrainConfig fields or method options changed, as
  `finetune --set` (`lora@val_split=val+keep=best`: the selection policy before issue 24).
- `plain-lora`, `plain-linear`, `plain-full`: the plain loops of benchmarks/real_backbone.py (timm + HF
  PEFT, AdamW at a constant lr, the model's eval transform, every photo of train/, the last epoch).
With --curves, every epoch of our runs is also scored on the test set (by the benchmark, through the
loop's epoch callback; the run itself never sees it), which shows what each selection rule would pick.
Each finished run is appended to the output JSON at once: an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_backbone import BACKBONE, DATA, MODEL, plain_loop  # noqa: E402  (the same plain loops)

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(tempfile.gettempdir()) / "peftvision-regimes"
LAYOUT_SEED = 2024  # which photo goes where: fixed, so every run of a regime sees the same folders


@dataclass(frozen=True)
class TaskDef:
    """Classes as {label: [coarse folders]}; a fixed test set of `test` photos (per label, in
    proportion to the pool unless `balanced`)."""

    name: str
    classes: dict[str, tuple[str, ...]]
    test: int
    balanced: bool  # train / val / test drawn with equal counts per label


@dataclass(frozen=True)
class Regime:
    name: str
    task: TaskDef
    train: int
    val: int = 0  # 0: no val/ folder

    def describe(self) -> str:
        layout = f"train/ {self.train} + val/ {self.val}" if self.val else f"train/ {self.train}, no val/"
        kind = "balanced" if self.task.balanced else "unbalanced"
        return f"{self.task.name} ({len(self.task.classes)} classes, {kind}): {layout}, test/ {self.task.test}"


DOG_BIRD = TaskDef("dog-bird", {"bird": ("bird",), "dog": ("dog",)}, test=57, balanced=False)  # 2:1
ANIMAL_OBJECT = TaskDef("animal-object", {"animal": ("bird", "dog", "other_animal"), "object": ("object",)},
                        test=200, balanced=True)
OBJECT_OTHER = TaskDef("object-other", {"object": ("object",), "other_animal": ("other_animal",)},
                       test=200, balanced=False)  # 73:27
COARSE4 = TaskDef("coarse4", {c: (c,) for c in ("bird", "dog", "object", "other_animal")}, test=200, balanced=False)

REGIMES = {r.name: r for r in (
    Regime("dog-bird-60", DOG_BIRD, 60),
    Regime("dog-bird-90+val30", DOG_BIRD, 90, 30),
    Regime("animal-object-120", ANIMAL_OBJECT, 120),
    Regime("animal-object-250+val50", ANIMAL_OBJECT, 250, 50),
    Regime("object-other-250", OBJECT_OTHER, 250),
    Regime("coarse4-120+val40", COARSE4, 120, 40),
    Regime("coarse4-800", COARSE4, 800),
)}
# The shape of the held-out case of issue 24 (245 training photos, 2 classes, no val/, ~150 test photos),
# on tasks the matrix does not hold: a check of the defaults chosen on the matrix, never used to choose
# them (`--regimes like-245`; not in `all`).
ANIMALS_OTHER = TaskDef("animals-other", {"dog_bird": ("bird", "dog"), "other_animal": ("other_animal",)},
                        test=153, balanced=False)  # 177:221, every photo of the three folders used once
DOG_OBJECT = TaskDef("dog-object", {"dog": ("dog",), "object": ("object",)}, test=153, balanced=False)  # 16:84
LIKE_245 = {r.name: r for r in (
    Regime("animals-other-245", ANIMALS_OTHER, 245),
    Regime("dog-object-245", DOG_OBJECT, 245),
    Regime("animal-object-245", ANIMAL_OBJECT, 245),
)}
ALL_REGIMES = {**REGIMES, **LIKE_245}
GROUPS = {"all": REGIMES, "like-245": LIKE_245}


def regime_names(spec: str) -> list[str]:
    """`--regimes`: a group name (all, like-245) or a comma list of regime names."""
    return list(GROUPS[spec]) if spec in GROUPS else spec.split(",")


METHODS = "lora,adapter,vpt-deep,linear,full"
PEERS = "plain-lora,plain-linear,plain-full"


# ----------------------------------------------------------------------------- regime folders

def _quota(n: int, sizes: dict[str, int], balanced: bool) -> dict[str, int]:
    """n split over labels: equal shares if balanced, else in proportion to `sizes` (largest remainder)."""
    weights = {k: 1.0 for k in sizes} if balanced else {k: float(v) for k, v in sizes.items()}
    total = sum(weights.values())
    raw = {k: n * w / total for k, w in weights.items()}
    take = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: take[k] - raw[k])[: n - sum(take.values())]:
        take[k] += 1
    return take


def _label_photos(task: TaskDef, data: Path) -> dict[str, list[Path]]:
    """Each label's photos, shuffled with the fixed seed; a label of several coarse folders interleaves
    them in proportion (so a balanced 'animal' draw holds dogs, birds and other animals alike)."""
    rng = random.Random(f"{LAYOUT_SEED}-{task.name}")
    out = {}
    for label, folders in task.classes.items():
        photos = [p for f in folders for p in sorted((data / f).iterdir())]
        rng.shuffle(photos)
        out[label] = photos
    return out


def build_regime(regime: Regime, data: Path, work: Path) -> Path:
    """`work/<regime>/{train,val?,test}/<label>/` as links to ../shared's photos; the test set is the
    first photos of each label's fixed order (the same for every regime of the task), the rest after."""
    root = work / regime.name
    if (root / ".complete").is_file():
        return root
    photos = _label_photos(regime.task, data)
    sizes = {k: len(v) for k, v in photos.items()}
    need = {"test": regime.task.test, "train": regime.train, "val": regime.val}
    quotas = {split: _quota(n, sizes, regime.task.balanced) for split, n in need.items() if n}
    used = {k: 0 for k in photos}
    for split in ("test", "train", "val"):
        for label, k in quotas.get(split, {}).items():
            chosen = photos[label][used[label]: used[label] + k]
            if len(chosen) < k:
                raise SystemExit(f"{regime.name}: {label} has only {len(photos[label])} photos")
            used[label] += k
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for p in chosen:
                link = folder / p.name
                if not link.exists():
                    os.symlink(p, link)
    (root / ".complete").write_text(regime.describe() + "\n")
    return root


def folder_pairs(root: Path, split: str) -> list[tuple[str, int]]:
    labels = sorted(p.name for p in (root / "train").iterdir())
    return [(str(f), i) for i, c in enumerate(labels) for f in sorted((root / split / c).iterdir())]


# ----------------------------------------------------------------------------- our finetune

def _test_curve_patch(curve: list[float], val_curve: list[float | None]) -> Any:
    """Wrap the training loop so that every epoch's model is also scored on the test loader (the run's
    own selection never sees these numbers; they say what each rule would have picked), next to the
    epoch's val top-1 (None without val)."""
    import peftvision.training.loop as loop
    from peftvision.training.evaluate import evaluate_model

    original = loop.train

    def train(model, loaders, cfg, output, accelerator, num_classes, resume=False, on_best=None,
              on_epoch_end=None, progress=None):
        def scored(state):
            val_curve.append(state.history[-1].get("val_top1"))
            curve.append(evaluate_model(model, loaders.test, num_classes)["top1"])
            if on_epoch_end is not None:
                on_epoch_end(state)
        return original(model, loaders, cfg, output, accelerator, num_classes, resume, on_best, scored, progress)

    loop.train = train
    return original


def ours(run: str, root: Path, epochs: int, batch_size: int, seed: int, curves: bool) -> dict[str, Any]:
    import peftvision.training.loop as loop
    from peftvision.training.config import build_config
    from peftvision.training.finetune import finetune

    method, _, changes = run.partition("@")
    sets = [item.replace("/", ",") for item in changes.split("+") if item]  # as `finetune --set KEY=VALUE`
    curve: list[float] = []
    val_curve: list[float | None] = []
    original = _test_curve_patch(curve, val_curve) if curves else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = build_config(sets=sets, flags=dict(
                method=method, model=MODEL, checkpoint=str(BACKBONE), dataset=f"imagefolder:{root}",
                epochs=epochs, batch_size=batch_size, seed=seed, output=str(Path(tmp) / "run"), quiet=True,
            ))
            m = finetune(cfg)
    finally:
        if original is not None:
            loop.train = original
    row = {k: m.get(k) for k in ("test_top1", "best_val_top1", "best_epoch", "train_seconds", "lr", "trainable_params")}
    row.update(selection=(m.get("selection") or {}).get("why"), head_init=m.get("head_init"),
               images={role: s["images"] for role, s in m["splits"].items()})
    if curves:
        row["test_curve"], row["val_curve"] = curve, val_curve
    return row


# ----------------------------------------------------------------------------- summary

def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: list[dict[str, Any]], runs: list[str] | None = None) -> str:
    """Regimes as rows, runs as columns: mean ± std of test top-1 over seeds; the last row is the mean
    over regimes (of the per-regime means)."""
    regimes = [r for r in ALL_REGIMES if any(x["regime"] == r for x in results)]
    runs = runs or list(dict.fromkeys(x["run"] for x in results))
    head = "| regime | " + " | ".join(runs) + " |"
    lines = [head, "|---|" + "---|" * len(runs)]
    means: dict[str, list[float]] = {run: [] for run in runs}
    for reg in regimes:
        cells = []
        for run in runs:
            top1 = [x["test_top1"] for x in results if x["regime"] == reg and x["run"] == run]
            if not top1:
                cells.append("")
                continue
            m, s = _mean_std(top1)
            means[run].append(m)
            cells.append(f"{m:.1f} ± {s:.1f}" + ("" if len(top1) == 3 else f" ({len(top1)})"))
        lines.append(f"| {reg} | " + " | ".join(cells) + " |")
    full = [run for run in runs if len(means[run]) == len(regimes)]
    lines.append("| **mean over regimes** | " + " | ".join(
        f"**{statistics.fmean(means[run]):.1f}**" if run in full else "" for run in runs) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, runs: list[str]) -> None:
    """Test top-1 per regime (mean ± std over seeds), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftvision.files import save_png

    regimes = [r for r in ALL_REGIMES if any(x["regime"] == r for x in results)]
    fig, ax = plt.subplots(figsize=(10, 5))
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors  # no two runs share a colour
    for i, run in enumerate(runs):
        xs, ys, es = [], [], []
        for j, reg in enumerate(regimes):
            top1 = [x["test_top1"] for x in results if x["regime"] == reg and x["run"] == run]
            if top1:
                m, s = _mean_std(top1)
                xs.append(j + (i - len(runs) / 2) * 0.06)
                ys.append(m)
                es.append(s)
        ax.errorbar(xs, ys, yerr=es, fmt="s--" if run.startswith("plain-") else "o-", capsize=2, label=run, alpha=0.85,
                    color=colors[i % len(colors)])
    ax.set_xticks(range(len(regimes)), regimes, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 (%), mean ± std over seeds (see the table)")
    ax.set_title(f"{MODEL} (real) on real photos: regimes of size and layout")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(path, fig)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regimes", default="all")
    p.add_argument("--runs", default=f"{METHODS},{PEERS}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--curves", action="store_true", help="score every epoch of our runs on test too")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loops (ours: its default)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--work", type=Path, default=WORK, help="where the regime folders (links) are built")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results-real-regimes.json")
    p.add_argument("--summary", action="store_true", help="only print the table of --output")
    p.add_argument("--plot", type=Path, metavar="PNG", help="with --summary: also draw the table")
    p.add_argument("--also", type=Path, action="append", default=[],
                   help="with --summary: more result files to put in the same table (e.g. ours + the peers)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: list[dict[str, Any]] = json.loads(args.output.read_text())["runs"] if args.output.is_file() else []
    runs = args.runs.split(",")
    if args.summary:
        for extra in args.also:
            results += json.loads(extra.read_text())["runs"]
        if args.regimes != "all":
            keep = set(regime_names(args.regimes))
            results = [x for x in results if x["regime"] in keep]
        print(table(results, [r for r in runs if any(x["run"] == r for x in results)] or None))
        if args.plot:
            plot(results, args.plot, [r for r in runs if any(x["run"] == r for x in results)])
        return 0
    if not BACKBONE.is_file() or not args.data.is_dir():
        print(f"needs {BACKBONE} and {args.data} (../shared)", file=sys.stderr)
        return 2
    import torch

    names = regime_names(args.regimes)
    if unknown := [n for n in names if n not in ALL_REGIMES]:
        print(f"unknown regime(s) {', '.join(unknown)}; known: {', '.join([*GROUPS, *ALL_REGIMES])}", file=sys.stderr)
        return 2
    machine = {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in names:
            regime = ALL_REGIMES[name]
            root = build_regime(regime, args.data, args.work)
            for run in runs:
                if any(x["regime"] == name and x["run"] == run and x["seed"] == seed and x["epochs"] == args.epochs
                       for x in results):
                    continue
                t0 = time.perf_counter()
                if run.startswith("plain-"):
                    train, test = folder_pairs(root, "train"), folder_pairs(root, "test")
                    row = plain_loop(run, BACKBONE, train, test, len(regime.task.classes), args.epochs,
                                     args.batch_size, seed, args.workers)
                else:
                    row = ours(run, root, args.epochs, args.batch_size, seed, args.curves)
                row.update(regime=name, run=run, seed=seed, epochs=args.epochs, batch_size=args.batch_size,
                           wall_seconds=time.perf_counter() - t0, date=time.strftime("%Y-%m-%d %H:%M"), **machine)
                results.append(row)
                print(f"{name} {run} seed {seed}: test top-1 {row['test_top1']:.1f}%, {row['wall_seconds']:.0f} s",
                      flush=True)
                tmp = args.output.with_suffix(".tmp")
                tmp.write_text(json.dumps({"regimes": {n: r.describe() for n, r in ALL_REGIMES.items()},
                                           "runs": results}, indent=1) + "\n")
                os.replace(tmp, args.output)
    print(table(results, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
