"""Serving many LoRA adapters over one backbone: MultiAdapterModel against the two usual alternatives.

    python benchmarks/bench_serve.py [--adapters 1,8,64] [--batch 32] [--requests 512]
        [--concurrency 32] [--output benchmarks/results-serve.json] [--no-http]

Base: the real ViT-Tiny/16 of ../shared/backbones at 224 px (falls back to the embedded 32-px backbone
when absent). N LoRA adapters (r=8 on q and v, 4-class heads, factors drawn at random: speed does not
depend on training) are written to a temp dir; requests pick an adapter uniformly at random.

Engines, the same on both levels:
- `multi`: peftvision's MultiAdapterModel (one backbone pass, per-sample LoRA gathered and batched).
- `merged`: one merged model per adapter kept in memory; a batch is split by adapter and each part
  runs through its own merged model (what a server that switches models per request can do at best).
- `peft`: HF PEFT with every adapter loaded (our `export_peft` files), `model(x, adapter_names=...)`:
  its mixed-batch forward, which loops over the adapters present in the batch.
- `single` (library level only): one merged model on the whole batch, the cost of no adapters at all.

Library level: img/s of the forward pass on batches of `--batch` images (median of timed rounds).
HTTP level: `peftvision`'s own FastAPI server and dynamic batcher in a subprocess on loopback, the
engine plugged in behind it; a fixed number of concurrent clients send PNGs (httpx, async); throughput,
p50 / p99 latency, and the server's RSS (peak and after the run) from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
BACKBONE = ROOT.parent / "shared" / "backbones" / "vit_tiny_patch16_224.in1k_tin200.safetensors"


def base_model() -> tuple[Any, str | None]:
    import peftvision as pv

    if BACKBONE.is_file():
        return pv.create_model("vit_tiny_patch16_224", checkpoint=str(BACKBONE), num_classes=200).eval(), str(BACKBONE)
    return pv.create_model("pv_vit_tiny_32", pretrained=True).eval(), None


def write_adapters(base: Any, n: int, root: Path) -> dict[str, str]:
    import peftvision as pv

    dirs = {}
    g = torch.Generator().manual_seed(n)
    for i in range(n):
        model = copy.deepcopy(base)
        model.reset_classifier(4)
        model = pv.inject(model, "lora", r=8, targets=("q", "v"))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        dirs[f"a{i:02d}"] = str(pv.save_adapter(model, root / f"a{i:02d}", class_names=["w", "x", "y", "z"]))
    return dirs


# ----------------------------------------------------------------------------- engines

class _Engine:
    """What peftvision.serving.http's batcher needs of a model, over the alternatives to MultiAdapterModel."""

    def __init__(self, base: Any, dirs: dict[str, str]) -> None:
        from peftvision.adapters.format import read_adapter_config
        from peftvision.data import make_transform

        self.base, self.dirs = base, dirs
        self.configs = {n: read_adapter_config(d) for n, d in dirs.items()}
        self._transform = make_transform(base, train=False, resize="crop")
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.adapters = [SimpleNamespace(name=n, describe=lambda n=n: {"name": n}) for n in dirs]

    def __contains__(self, name: str) -> bool:
        return name in self.dirs

    def info(self, name: str) -> Any:
        from peftvision.errors import UnknownAdapterError

        if name not in self.dirs:
            raise UnknownAdapterError(f"no adapter named {name!r}")
        return self.configs[name]

    def num_classes(self, name: str) -> int:
        return self.configs[name]["model"]["num_classes"]

    def classes(self, name: str) -> list[str]:
        return self.configs[name]["model"]["class_names"]

    def transform(self, name: str) -> Any:
        return self._transform

    def top_k(self, x: torch.Tensor, adapters: list[str], k: Any = 5) -> list[list[dict[str, Any]]]:
        from peftvision.serving.multi import MultiAdapterModel

        return MultiAdapterModel.top_k(self, x, adapters, k)  # the same formatting as ours


class Merged(_Engine):
    def __init__(self, base: Any, dirs: dict[str, str]) -> None:
        import peftvision as pv

        super().__init__(base, dirs)
        self.models = {}
        for n, d in dirs.items():
            shell = copy.deepcopy(base)
            shell.reset_classifier(4)
            self.models[n] = pv.merge(pv.load_adapter(d, model=shell), inplace=True).eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        out = x.new_empty(x.shape[0], 4)
        by: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            by.setdefault(n, []).append(i)
        for n, rows in by.items():
            out[rows] = self.models[n](x[rows])
        return out


class Peft(_Engine):
    def __init__(self, base: Any, dirs: dict[str, str]) -> None:
        import peft

        import peftvision as pv

        super().__init__(base, dirs)
        tmp = Path(tempfile.mkdtemp(prefix="pv-peft-"))
        pristine = copy.deepcopy(base)
        pristine.reset_classifier(4)
        shell = copy.deepcopy(pristine)  # PeftModel injects into it in place
        self.model = None
        for n, d in dirs.items():
            exported = pv.export_peft(pv.load_adapter(d, model=copy.deepcopy(pristine)), tmp / n)
            if self.model is None:
                self.model = peft.PeftModel.from_pretrained(shell, str(exported), adapter_name=n)
            else:
                self.model.load_adapter(str(exported), adapter_name=n)
        self.model.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        return self.model(x, adapter_names=list(names))


class Single(_Engine):
    def __init__(self, base: Any, dirs: dict[str, str]) -> None:
        super().__init__(base, dirs)
        self.model = Merged(base, dict(list(dirs.items())[:1])).models[next(iter(dirs))]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        return self.model(x)


def make_engine(kind: str, base: Any, dirs: dict[str, str]) -> Any:
    if kind == "multi":
        from peftvision.serving.multi import MultiAdapterModel

        return MultiAdapterModel(base, dirs)
    return {"merged": Merged, "peft": Peft, "single": Single}[kind](base, dirs)


# ----------------------------------------------------------------------------- library level

def library(base: Any, dirs: dict[str, str], engines: list[str], batch: int, rounds: int) -> list[dict[str, Any]]:
    """img/s per engine on the same batch; rounds interleave the engines (A B C A B C ...) so that
    drift in the machine's speed hits all of them alike; the first round warms up."""
    from peftvision.data import input_size

    x = torch.randn(batch, *input_size(base), generator=torch.Generator().manual_seed(0))
    names = random.Random(0).choices(list(dirs), k=batch)
    built = {kind: make_engine(kind, base, dirs) for kind in engines}
    reference = built["merged"](x, names)[:, :4] if "merged" in built else None
    times: dict[str, list[float]] = {kind: [] for kind in engines}
    for _ in range(rounds + 1):
        for kind, engine in built.items():
            t = time.perf_counter()
            engine(x, names)
            times[kind].append(time.perf_counter() - t)
    rows = []
    for kind, engine in built.items():
        median = statistics.median(times[kind][1:])
        err = float((engine(x, names)[:, :4] - reference).abs().max()) if reference is not None and kind != "single" else None
        rows.append(dict(engine=kind, adapters=len(dirs), batch=batch, img_per_s=batch / median,
                         seconds_per_batch=median, max_abs_diff_vs_merged=err))
        print(f"  library {kind:>7} N={len(dirs):>2}: {batch / median:7.1f} img/s", flush=True)
    return rows


# ----------------------------------------------------------------------------- HTTP level

def run_server(args: argparse.Namespace) -> None:
    """Subprocess entry: serve `args.engine` over the adapters in `args.dir` with peftvision's app."""
    import uvicorn

    from peftvision.serving.http import create_app, find_adapters

    torch.set_num_threads(2)
    base, _ = base_model()
    dirs = find_adapters(None, args.dir) if args.n else {}
    engine = make_engine(args.serve_engine, base, dirs) if dirs else make_engine("multi", base, {})
    uvicorn.run(create_app(engine, max_batch=args.batch, max_wait_ms=5), host="127.0.0.1", port=args.port, log_level="error")


def _rss(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    mb = lambda k: int(fields[k].split()[0]) / 1024  # noqa: E731  (kB)
    return mb("VmRSS"), mb("VmHWM")


async def _load(url: str, names: list[str], images: list[bytes], concurrency: int, requests: int) -> tuple[list[float], float]:
    import httpx

    latencies: list[float] = []
    rng = random.Random(1)
    jobs = [(rng.choice(names), rng.choice(images)) for _ in range(requests)]
    async with httpx.AsyncClient(timeout=120) as client:
        async def worker() -> None:
            while jobs:
                name, img = jobs.pop()
                t = time.perf_counter()
                r = await client.post(f"{url}/predict", json={"adapter": name, "image": img, "top_k": 1})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return latencies, time.perf_counter() - start


def http(root: Path, n: int, engine: str, args: argparse.Namespace, images: list[bytes]) -> dict[str, Any]:
    import httpx

    port = 8700 + random.Random(f"{engine}{n}").randrange(200)
    cmd = [sys.executable, __file__, "--serve-engine", engine, "--dir", str(root), "--n", str(n),
           "--port", str(port), "--batch", str(args.batch)]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if proc.poll() is not None:
                raise SystemExit(f"the {engine} server exited with code {proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        names = [a["name"] for a in httpx.get(f"{url}/adapters").json()] or ["base"]
        idle_rss, _ = _rss(proc.pid)
        asyncio.run(_load(url, names, images, args.concurrency, 2 * args.concurrency))  # warm up
        latencies, wall = asyncio.run(_load(url, names, images, args.concurrency, args.requests))
        rss, peak = _rss(proc.pid)
        health = httpx.get(f"{url}/health").json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    latencies.sort()
    q = lambda f: latencies[min(len(latencies) - 1, int(f * len(latencies)))] * 1000  # noqa: E731
    row = dict(engine=engine, adapters=n, requests=len(latencies), concurrency=args.concurrency,
               img_per_s=len(latencies) / wall, p50_ms=q(0.5), p99_ms=q(0.99), rss_idle_mb=idle_rss,
               rss_mb=rss, peak_rss_mb=peak, mean_batch=health.get("requests", 0) / max(health.get("batches", 1), 1))
    print(f"  http {engine:>7} N={n:>2}: {row['img_per_s']:6.1f} img/s p50 {row['p50_ms']:6.0f} ms "
          f"p99 {row['p99_ms']:6.0f} ms rss {rss:6.0f} MB (mean batch {row['mean_batch']:.1f})", flush=True)
    return row


def _photos(k: int) -> list[bytes]:
    """PNG bytes of real photos when ../shared has them (else noise), base64-encoded for JSON."""
    from PIL import Image

    folder = ROOT.parent / "shared" / "data" / "imagenet-sample-coarse4"
    files = sorted(folder.glob("*/*"))[:k] if folder.is_dir() else []
    out = []
    for i in range(k):
        img = Image.open(files[i]).convert("RGB") if files else Image.fromarray(
            (torch.rand(256, 256, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy())
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def summary(path: str) -> str:
    """The markdown tables of a results file."""
    r = json.loads(Path(path).read_text())
    lib = {(row["engine"], row["adapters"]): row for row in r["library"]}
    lines = [f"Library, batch {r['library'][0]['batch']}, img/s (ratio to `single`):", "",
             "| adapters | single merged model | multi (ours) | merged per adapter | HF PEFT adapter_names | ours / PEFT |",
             "|---|---|---|---|---|---|"]
    for n in sorted({a for _, a in lib}):
        single = lib[("single", n)]["img_per_s"]
        speed = lambda e: lib[(e, n)]["img_per_s"] if (e, n) in lib else None  # noqa: E731
        cell = lambda e: f"{speed(e):.1f} ({speed(e) / single:.2f}x)" if speed(e) else "–"  # noqa: E731
        ratio = f"{speed('multi') / speed('peft'):.2f}x" if speed("multi") and speed("peft") else "–"
        lines.append(f"| {n} | {single:.1f} | {cell('multi')} | {cell('merged')} | {cell('peft')} | {ratio} |")
    lines += ["", "HTTP on loopback (PNG photos, JSON base64), concurrency "
              f"{r['http'][0]['concurrency']}:", "",
              "| adapters | engine | img/s | p50 ms | p99 ms | mean batch | RSS idle MB | RSS after MB | peak MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for h in r["http"]:
        lines.append(f"| {h['adapters']} | {h['engine'] if h['adapters'] else 'base only'} | {h['img_per_s']:.1f} | "
                     f"{h['p50_ms']:.0f} | {h['p99_ms']:.0f} | {h['mean_batch']:.1f} | {h['rss_idle_mb']:.0f} | "
                     f"{h['rss_mb']:.0f} | {h['peak_rss_mb']:.0f} |")
    files = {k: v / 1e6 for k, v in r["adapter_file_bytes"].items()}
    lines += ["", "Adapter files (MB): " + ", ".join(f"{k}: {v:.1f}" for k, v in files.items())]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", default="1,8,64")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--engines", default="multi,merged,peft")
    p.add_argument("--no-http", action="store_true")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results-serve.json"))
    p.add_argument("--summary", metavar="FILE", help="print the tables of a results file and exit")
    p.add_argument("--serve-engine", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=8700, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.summary:
        return print(summary(args.summary))
    if args.serve_engine:
        return run_server(args)
    torch.set_num_threads(2)
    base, ckpt = base_model()
    engines = args.engines.split(",")
    results: dict[str, Any] = {"base": "vit_tiny_patch16_224 (real, 224 px)" if ckpt else "pv_vit_tiny_32",
                               "library": [], "http": [], "adapter_file_bytes": {}}
    images = _photos(16)
    with tempfile.TemporaryDirectory(prefix="pv-serve-") as tmp:
        if not args.no_http:
            results["http"].append(http(Path(tmp) / "none", 0, "multi", args, images))  # the base alone
        for n in [int(v) for v in args.adapters.split(",")]:
            root = Path(tmp) / f"n{n}"
            dirs = write_adapters(base, n, root)
            results["adapter_file_bytes"][str(n)] = sum(
                f.stat().st_size for d in dirs.values() for f in Path(d).iterdir())
            results["library"] += library(base, dirs, ["single", *engines], args.batch, args.rounds)
            if not args.no_http:
                for engine in engines:
                    results["http"].append(http(root, n, engine, args, images))
            Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(summary(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
