"""The example figures of `peftvision explain` in docs/explain/, and its time per image on this CPU.

    python benchmarks/explain_examples.py [--backbone FILE] [--data DIR] [--docs DIR] [--output FILE.json]

Defaults: the real ViT-Tiny/16 of ../shared/backbones (its own 200-class Tiny-ImageNet head) and photos of
../shared/data/imagenet-sample-coarse4.

1. `peftvision explain --model vit_tiny_patch16_224 --checkpoint BACKBONE <dog photo>`: rollout of the
   plain backbone.
2. A LoRA adapter trained here (`finetune` defaults, 3 epochs, batch 32) on the four coarse classes of
   the photos, the two example photos left out, then `peftvision explain --adapter RUN --checkpoint
   BACKBONE <bird photo> --compare-base`: the adapted model's rollout, the base's, and the difference.
3. Time per image, batch 1, after one warm-up call, median of 11 rounds in which every variant runs
   once in a shuffled order: the plain forward (fused attention), `explain` in each mode, and the
   figure (render + write the PNG), on the plain backbone and with LoRA (r=8 on q, v) injected, which
   costs the same whether trained or not (`--timings-only` measures only this).

The figures are written through the CLI and then re-saved with a 256-colour palette (a photo makes a
large RGB PNG); the photos themselves are not copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
BACKBONE = SHARED / "backbones" / "vit_tiny_patch16_224.in1k_tin200.safetensors"
DATA = SHARED / "data" / "imagenet-sample-coarse4"
MODEL = "vit_tiny_patch16_224"
DOG = "dog/207_n02099601.jpg"  # a golden retriever on grass, a shoe in its mouth
BIRD = "bird/015_n01558993.jpg"  # a robin on a branch


def photos_without(data: Path, root: Path, leave_out: set[Path]) -> Path:
    """The class folders of `data` as symbolic links, without the example photos."""
    for cls in sorted(p for p in data.iterdir() if p.is_dir()):
        (root / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir()):
            if f not in leave_out:
                (root / cls.name / f.name).symlink_to(f)
    return root


def palette(path: Path) -> None:
    """Re-save a PNG with 256 colours, atomically: about a third of the bytes, no visible change."""
    from PIL import Image

    from peftvision.files import atomic_write

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(256)
    atomic_write(path, lambda tmp: small.save(tmp, format="PNG", optimize=True))


def draw(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    from peftvision.files import save_png

    save_png(path, fig)
    plt.close(fig)


def median_seconds(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median time of each call over `rounds`, interleaved in a shuffled order every round so that
    the other jobs of this shared machine slow every call alike; one warm-up call each first."""
    import random

    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for r in range(rounds):
        random.Random(r).shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(times[name]) for name in calls}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", type=Path, default=BACKBONE)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "explain")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results-explain.json")
    p.add_argument("--timings-only", action="store_true", help="only time the modes (keeps the figures' record)")
    p.add_argument("--rounds", type=int, default=11, help="timed calls per variant")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.backbone.is_file() or not args.data.is_dir():
        print(f"needs {args.backbone} and {args.data} (../shared)")
        return 2
    import torch

    import peftvision as pv
    from peftvision.cli import main as cli
    from peftvision.data import make_transform, open_image
    from peftvision.explain import display_image, explain, figure
    from peftvision.training.config import TrainConfig
    from peftvision.training.finetune import finetune

    dog, bird = args.data / DOG, args.data / BIRD
    ckpt = str(args.backbone)
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    adapter = previous.get("lora_adapter")
    if not args.timings_only:
        assert cli(["explain", "--model", MODEL, "--checkpoint", ckpt, str(dog), "--output", str(args.docs)]) == 0
        palette(args.docs / f"{dog.stem}.png")
        with tempfile.TemporaryDirectory() as tmp:
            photos = photos_without(args.data, Path(tmp) / "photos", {dog, bird})
            run = Path(tmp) / "lora"
            t0 = time.perf_counter()
            metrics = finetune(TrainConfig.from_dict(dict(
                method="lora", model=MODEL, checkpoint=ckpt, dataset=f"imagefolder:{photos}", epochs=3,
                batch_size=32, seed=0, output=str(run), quiet=True,
            )))
            adapter = {"test_top1": metrics.get("test_top1"), "epochs": 3, "train_seconds": time.perf_counter() - t0}
            assert cli(["explain", "--adapter", str(run), "--checkpoint", ckpt, str(bird), "--compare-base",
                        "--output", str(args.docs)]) == 0
            palette(args.docs / f"{bird.stem}.png")

    base = pv.load_model(MODEL, checkpoint=ckpt).eval()
    lora = pv.inject(pv.load_model(MODEL, checkpoint=ckpt), "lora").eval()
    x = make_transform(base)(open_image(dog)).unsqueeze(0)  # (1, 3, 224, 224)
    calls: dict[str, Callable[[], Any]] = {}
    for name, model in (("base", base), ("lora", lora)):
        calls[f"{name} forward"] = lambda model=model: model(x)
        for mode in ("rollout", "attention", "gradcam"):
            calls[f"{name} {mode}"] = lambda model=model, mode=mode: explain(model, x, mode)
    e = explain(base, x)
    image = display_image(x[0], base)
    calls["base figure"] = lambda: draw(figure(image, e, title=dog.name), Path(tempfile.gettempdir()) / "explain.png")
    with torch.no_grad():  # the plain forwards; explain sets up its own grad mode per mode
        timings = median_seconds(calls, args.rounds)

    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None,
        "model": MODEL, "input": "1 x 3 x 224 x 224", "rounds": args.rounds,
        "seconds_per_image": timings,
        "lora_adapter": adapter,
        "figures": {f.name: f.stat().st_size for f in sorted(args.docs.glob("*.png"))},
    }
    tmp_json = args.output.with_suffix(".tmp")
    tmp_json.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp_json, args.output)
    print(" | ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))
    print(f"LoRA adapter: {record['lora_adapter']}; figures: {record['figures']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
