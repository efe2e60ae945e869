"""Serving many LoRA adapters over one backbone: the library against its alternatives, and over HTTP.

    python benchmarks/bench_serve.py [--adapters 1,8,64] [--batch 32] [--http-adapters 64]
        [--concurrency 32] [--requests 512] [--pairs 3] [--protocol v2|predict]
        [--output benchmarks/results-serve.json] [--no-http] [--summary FILE]

Base: the real ViT-Tiny/16 of ../shared/backbones at 224 px (falls back to the embedded 32-px backbone
when absent). N LoRA adapters (r=8 on q and v, 4-class heads, factors drawn at random: speed does not
depend on training) are written to a temp dir; requests pick an adapter uniformly at random.

Library level, per engine, img/s of the forward pass on batches of `--batch` preprocessed images
(median of rounds that interleave the engines):
- `multi`: peftvision's MultiAdapterModel (one backbone pass, per-sample LoRA gathered and batched).
- `merged`: one merged model per adapter in memory; a batch is split by adapter.
- `peft`: HF PEFT with every adapter loaded (our `export_peft` files), `model(x, adapter_names=...)`.
- `single`: one merged model on the whole batch, the cost of no adapters at all.

HTTP level: `peftvision serve`'s own app and uvicorn settings (`create_app`, `uvicorn_config`) in a
subprocess on loopback, over N = `--http-adapters` adapters; a client process keeps `--concurrency`
keep-alive connections busy with real JPEG photos (the files' own bytes) -- by default through the Open
Inference Protocol with the binary extension (`--protocol v2`), or `/predict` with base64 JSON. The
client is a minimal asyncio HTTP/1.1 client, so that the load generator, which shares the CPU, costs
as little as it can. The run alternates library rounds of `multi` and HTTP runs `--pairs` times and
reports each HTTP run's ratio to the library speed measured next to it. Where the rest goes: CPU
seconds per image of the server's threads (model + torch's workers, decoding, the event loop), the
client, and everything else on the machine, from /proc.

On a machine other jobs keep busy, run it with `OMP_WAIT_POLICY=PASSIVE` (both sides inherit it): with
OpenMP's default spin-waiting, a torch thread whose partner was descheduled burns its core waiting,
which halved the library's speed here under a load average of 9 (5.6-7.2 vs 10.4-11.2 img/s, 88 vs 44
CPU ms per image) while the server's model thread suffered far less -- a ratio that flatters the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
BACKBONE = ROOT.parent / "shared" / "backbones" / "vit_tiny_patch16_224.in1k_tin200.safetensors"
PHOTOS = ROOT.parent / "shared" / "data" / "imagenet-sample-coarse4"
TICK = os.sysconf("SC_CLK_TCK")


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


# ----------------------------------------------------------------------------- library engines

class Merged:
    def __init__(self, base: Any, dirs: dict[str, str]) -> None:
        import peftvision as pv

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


class Peft:
    def __init__(self, base: Any, dirs: dict[str, str]) -> None:
        import peft

        import peftvision as pv

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


class Single:
    def __init__(self, base: Any, dirs: dict[str, str]) -> None:
        self.model = Merged(base, dict(list(dirs.items())[:1])).models[next(iter(dirs))]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        return self.model(x)


def make_engine(kind: str, base: Any, dirs: dict[str, str]) -> Any:
    if kind == "multi":
        from peftvision.serving.multi import MultiAdapterModel

        return MultiAdapterModel(base, dirs)
    return {"merged": Merged, "peft": Peft, "single": Single}[kind](base, dirs)


def _batch(base: Any, dirs: dict[str, str], batch: int) -> tuple[torch.Tensor, list[str]]:
    from peftvision.data import input_size

    x = torch.randn(batch, *input_size(base), generator=torch.Generator().manual_seed(0))
    return x, random.Random(0).choices(list(dirs), k=batch)


def library(base: Any, dirs: dict[str, str], engines: list[str], batch: int, rounds: int) -> list[dict[str, Any]]:
    """img/s per engine on the same batch; rounds interleave the engines (A B C A B C ...) so that
    drift in the machine's speed hits all of them alike; the first round warms up."""
    x, names = _batch(base, dirs, batch)
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


# ----------------------------------------------------------------------------- HTTP: the server

def run_server(args: argparse.Namespace) -> None:
    """Subprocess entry: `peftvision serve`'s app and uvicorn settings over the adapters in `args.dir`;
    writes the native ids of its threads (event loop, model, decoding) to `args.threads` when ready."""
    import threading

    import uvicorn

    from peftvision.serving.config import ServeConfig
    from peftvision.serving.http import create_app, uvicorn_config
    from peftvision.serving.multi import MultiAdapterModel
    from peftvision.serving.repository import find_adapters

    torch.set_num_threads(2)
    base, _ = base_model()
    model = MultiAdapterModel(base, find_adapters(None, args.dir))
    config = ServeConfig(port=args.port, max_batch=args.batch, max_queue=4 * args.concurrency)
    app = create_app(model, config)
    server = uvicorn.Server(uvicorn_config(app, config, log_level="error"))

    async def note_threads() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        batcher = app.state.server.batcher
        decoders = batcher._decoders._max_workers
        barrier = threading.Barrier(decoders)  # every worker of the pool, once each

        def decoder_id() -> int:
            barrier.wait()
            return threading.get_native_id()

        ids = {"loop": [threading.get_native_id()],
               "model": [batcher._model_thread.submit(threading.get_native_id).result()],
               "decode": [f.result() for f in [batcher._decoders.submit(decoder_id) for _ in range(decoders)]]}
        Path(args.threads).write_text(json.dumps(ids))

    async def main() -> None:
        asyncio.get_running_loop().create_task(note_threads())
        await server.serve()

    asyncio.run(main())


def _cpu(pid: int, tid: int | None = None) -> float:
    """CPU seconds (user + system) of a process, or of one of its threads."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _threads(pid: int) -> dict[int, float]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = _cpu(pid, int(task.name))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def _machine_cpu() -> float:
    """CPU seconds every process on the machine has used (busy jiffies of /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK  # less idle and iowait


def _batch_sizes(metrics: str) -> dict[str, int]:
    """Batches per size bucket (warm-up included), from the server's own /metrics histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    family = next(f for f in text_string_to_metric_families(metrics) if f.name == "peftvision_batch_size")
    cumulative = [(s.labels["le"], int(s.value)) for s in family.samples if s.name.endswith("_bucket")]
    return {le: n - prev for (le, n), (_, prev) in zip(cumulative, [(None, 0)] + cumulative[:-1]) if n - prev}


def _rss(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    mb = lambda k: int(fields[k].split()[0]) / 1024  # noqa: E731  (kB)
    return mb("VmRSS"), mb("VmHWM")


# ----------------------------------------------------------------------------- HTTP: the client

def _requests(protocol: str, names: list[str], photos: list[bytes], count: int, seed: int) -> list[bytes]:
    """`count` ready-to-send HTTP/1.1 requests, each a random photo for a random adapter."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        name, photo = rng.choice(names), rng.choice(photos)
        if protocol == "v2":
            header = json.dumps({
                "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4 + len(photo)}}],
                "outputs": [{"name": "PROBABILITIES", "parameters": {"classification": 1}}],
            }).encode()
            body = header + len(photo).to_bytes(4, "little") + photo
            extra = f"Inference-Header-Content-Length: {len(header)}\r\n"
            path = f"/v2/models/{name}/infer"
        else:
            body = json.dumps({"adapter": name, "image": base64.b64encode(photo).decode(), "top_k": 1}).encode()
            extra, path = "Content-Type: application/json\r\n", "/predict"
        head = f"POST {path} HTTP/1.1\r\nHost: bench\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
        out.append(head.encode() + body)
    return out


async def _drive(port: int, requests: list[bytes], concurrency: int) -> tuple[list[float], float, int]:
    """Send `requests` over `concurrency` keep-alive connections, each waiting for its answer before the
    next; (latencies, wall seconds, failures)."""
    queue = list(reversed(requests))
    latencies: list[float] = []
    failures = [0]
    length = re.compile(rb"content-length: *(\d+)", re.I)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while queue:
            request = queue.pop()
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(int(length.search(head).group(1)))
            if not head.startswith(b"HTTP/1.1 200") or b"error" in body[:20]:
                failures[0] += 1
            latencies.append(time.perf_counter() - start)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*[connection() for _ in range(concurrency)])
    return latencies, time.perf_counter() - start, failures[0]


def run_client(args: argparse.Namespace) -> None:
    """Subprocess entry: load the server, print one JSON line of results."""
    spec = json.loads(Path(args.client).read_text())
    photos = [base64.b64decode(p) for p in spec["photos"]]
    warm = _requests(spec["protocol"], spec["names"], photos, 2 * spec["concurrency"], seed=spec["seed"] + 1)
    asyncio.run(_drive(spec["port"], warm, spec["concurrency"]))
    timed = _requests(spec["protocol"], spec["names"], photos, spec["requests"], seed=spec["seed"])
    before = _cpu(os.getpid())
    latencies, wall, failures = asyncio.run(_drive(spec["port"], timed, spec["concurrency"]))
    print(json.dumps(dict(latencies=latencies, wall=wall, failures=failures, client_cpu=_cpu(os.getpid()) - before)))


def _photos(k: int) -> tuple[list[bytes], str]:
    """The bytes of `k` real JPEG photos when ../shared has them (else generated JPEGs)."""
    import io

    from PIL import Image

    files = sorted(PHOTOS.glob("*/*.jpg")) if PHOTOS.is_dir() else []
    if files:
        chosen = random.Random(0).sample(files, min(k, len(files)))
        return [f.read_bytes() for f in chosen], f"{len(chosen)} real JPEG photos of {PHOTOS.name}"
    out = []
    for i in range(k):
        buf = io.BytesIO()
        noise = (torch.rand(256, 320, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()
        Image.fromarray(noise).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out, f"{k} generated JPEGs (no photos in ../shared)"


def http(root: Path, names: list[str], args: argparse.Namespace, photos: list[bytes], seed: int) -> dict[str, Any]:
    """One HTTP run against a fresh server: throughput, latency, and CPU seconds by where they went."""
    import httpx

    port = 8700 + random.Random(seed).randrange(800)
    threads = root / f"threads-{seed}.json"
    cmd = [sys.executable, __file__, "--serve", "--dir", str(root), "--port", str(port), "--batch", str(args.batch),
           "--concurrency", str(args.concurrency), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while not threads.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server exited with code {proc.returncode}")
            time.sleep(0.25)
        ids = json.loads(threads.read_text())
        idle_rss, _ = _rss(proc.pid)
        spec = root / f"client-{seed}.json"
        spec.write_text(json.dumps(dict(port=port, names=names, photos=[base64.b64encode(p).decode() for p in photos],
                                        protocol=args.protocol, concurrency=args.concurrency, requests=args.requests,
                                        seed=seed)))
        client = subprocess.Popen([sys.executable, __file__, "--client", str(spec)], stdout=subprocess.PIPE, text=True)
        # the client warms up first; start counting once the server has answered the warm-up requests
        warm = 2 * args.concurrency
        while httpx.get(f"{url}/health").json()["requests"] < warm and client.poll() is None:
            time.sleep(0.05)
        cpu0, threads0, machine0, t0 = _cpu(proc.pid), _threads(proc.pid), _machine_cpu(), time.perf_counter()
        out, _ = client.communicate()
        cpu1, threads1, machine1, t1 = _cpu(proc.pid), _threads(proc.pid), _machine_cpu(), time.perf_counter()
        result = json.loads(out.strip().splitlines()[-1])
        rss, peak = _rss(proc.pid)
        health = httpx.get(f"{url}/health").json()
        batches = _batch_sizes(httpx.get(f"{url}/metrics").text)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    used = {tid: threads1.get(tid, 0) - threads0.get(tid, 0) for tid in threads1}
    known = {k: sum(used.get(tid, 0.0) for tid in tids) for k, tids in ids.items()}
    named = {tid for tids in ids.values() for tid in tids}
    torch_workers = sum(v for tid, v in used.items() if tid not in named and v > 0.05 * (cpu1 - cpu0))
    images = len(result["latencies"])
    per = lambda s: 1000 * s / images  # noqa: E731  (CPU ms per image)
    lat = sorted(result["latencies"])
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000  # noqa: E731
    row = dict(
        protocol=args.protocol, adapters=len(names), requests=images, failures=result["failures"],
        concurrency=args.concurrency, img_per_s=images / result["wall"], p50_ms=q(0.5), p99_ms=q(0.99),
        mean_batch=health["requests"] / max(health["batches"], 1), batch_sizes=batches, rss_idle_mb=idle_rss, rss_mb=rss, peak_rss_mb=peak,
        wall_s=t1 - t0,
        cpu_ms_per_image=dict(
            server=per(cpu1 - cpu0), model_and_torch_workers=per(known["model"] + torch_workers),
            decode=per(known["decode"]), event_loop=per(known["loop"]),
            server_other=per(cpu1 - cpu0 - known["model"] - torch_workers - known["decode"] - known["loop"]),
            client=per(result["client_cpu"]),
            rest_of_machine=per(machine1 - machine0 - (cpu1 - cpu0) - result["client_cpu"]),
        ),
        cpu_seconds_available=os.cpu_count() * (t1 - t0),
    )
    print(f"  http {args.protocol} N={len(names)}: {row['img_per_s']:6.1f} img/s p50 {row['p50_ms']:5.0f} ms "
          f"p99 {row['p99_ms']:5.0f} ms mean batch {row['mean_batch']:.1f} {batches} failures {row['failures']}; CPU ms/img "
          + ", ".join(f"{k} {v:.1f}" for k, v in row["cpu_ms_per_image"].items()), flush=True)
    return row


def http_pairs(base: Any, dirs: dict[str, str], root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--pairs` times: library rounds of `multi` on the same machine state, then an HTTP run."""
    photos, _ = _photos(64)
    x, names = _batch(base, dirs, args.batch)
    multi = make_engine("multi", base, dirs)
    multi(x, names)  # warm up
    rows = []
    for i in range(args.pairs):
        times, cpu = [], time.process_time()
        for _ in range(args.rounds):
            t = time.perf_counter()
            multi(x, names)
            times.append(time.perf_counter() - t)
        lib, lib_cpu = args.batch / statistics.median(times), 1000 * (time.process_time() - cpu) / (args.rounds * args.batch)
        row = http(root, list(dirs), args, photos, seed=i)
        served_cpu = row["cpu_ms_per_image"]["server"] + row["cpu_ms_per_image"]["client"]
        row.update(library_img_per_s=lib, ratio=row["img_per_s"] / lib, library_cpu_ms_per_image=lib_cpu,
                   cpu_ratio=lib_cpu / served_cpu)
        print(f"  pair {i}: library {lib:.1f} img/s, HTTP {row['img_per_s']:.1f} img/s: {row['ratio']:.2f}x; CPU ms/img "
              f"library {lib_cpu:.1f}, HTTP (server + client) {served_cpu:.1f}: {row['cpu_ratio']:.2f}x", flush=True)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report

def summary(path: str) -> str:
    """The markdown tables of a results file."""
    r = json.loads(Path(path).read_text())
    lines = []
    if r.get("library"):
        lib = {(row["engine"], row["adapters"]): row for row in r["library"]}
        lines += [f"Library, batch {r['library'][0]['batch']}, img/s (ratio to `single`):", "",
                  "| adapters | single merged model | multi (ours) | merged per adapter | HF PEFT adapter_names | ours / PEFT |",
                  "|---|---|---|---|---|---|"]
        for n in sorted({a for _, a in lib}):
            single = lib[("single", n)]["img_per_s"]
            speed = lambda e: lib[(e, n)]["img_per_s"] if (e, n) in lib else None  # noqa: E731
            cell = lambda e: f"{speed(e):.1f} ({speed(e) / single:.2f}x)" if speed(e) else "–"  # noqa: E731
            ratio = f"{speed('multi') / speed('peft'):.2f}x" if speed("multi") and speed("peft") else "–"
            lines.append(f"| {n} | {single:.1f} | {cell('multi')} | {cell('merged')} | {cell('peft')} | {ratio} |")
        lines.append("")
    if r.get("http"):
        h0 = r["http"][0]
        lines += [f"HTTP ({h0['protocol']}, {r.get('photos', 'photos')}), {h0['adapters']} adapters, "
                  f"{h0['concurrency']} concurrent clients, {h0['requests']} requests per run:", "",
                  "| run | library img/s | HTTP img/s | ratio | CPU ms/img library / HTTP | CPU ratio | p50 ms | p99 ms "
                  "| mean batch | failures | RSS idle / after MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, h in enumerate(r["http"]):
            served = h["cpu_ms_per_image"]["server"] + h["cpu_ms_per_image"]["client"]
            lines.append(f"| {i} | {h['library_img_per_s']:.1f} | {h['img_per_s']:.1f} | {h['ratio']:.2f}x | "
                         f"{h['library_cpu_ms_per_image']:.1f} / {served:.1f} | {h['cpu_ratio']:.2f}x | "
                         f"{h['p50_ms']:.0f} | {h['p99_ms']:.0f} | {h['mean_batch']:.1f} | {h['failures']} | "
                         f"{h['rss_idle_mb']:.0f} / {h['rss_mb']:.0f} |")
        keys = list(h0["cpu_ms_per_image"])
        lines += ["", "CPU ms per image served, by where it went (2 cores give 2,000 ms per second of wall time):", "",
                  "| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for i, h in enumerate(r["http"]):
            lines.append(f"| {i} | " + " | ".join(f"{h['cpu_ms_per_image'][k]:.1f}" for k in keys) + " |")
    if r.get("adapter_file_bytes"):
        files = {k: v / 1e6 for k, v in r["adapter_file_bytes"].items()}
        lines += ["", "Adapter files (MB): " + ", ".join(f"{k}: {v:.1f}" for k, v in files.items())]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", default="1,8,64", help="library level: adapter counts (empty: none)")
    p.add_argument("--engines", default="multi,merged,peft")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--http-adapters", type=int, default=64)
    p.add_argument("--protocol", choices=["v2", "predict"], default="v2")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--pairs", type=int, default=3, help="library + HTTP measurements, alternating")
    p.add_argument("--no-http", action="store_true")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results-serve.json"))
    p.add_argument("--summary", metavar="FILE", help="print the tables of a results file and exit")
    for hidden in ("--dir", "--threads", "--client"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=8700, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.summary:
        return print(summary(args.summary))
    if args.serve:
        return run_server(args)
    if args.client:
        return run_client(args)
    torch.set_num_threads(2)
    base, ckpt = base_model()
    results: dict[str, Any] = {
        "base": "vit_tiny_patch16_224 (real, 224 px)" if ckpt else "pv_vit_tiny_32", "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average_at_start": os.getloadavg(), "command": " ".join(sys.argv), "photos": _photos(64)[1],
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset: GNU OpenMP spins, then sleeps)"),
        "library": [], "http": [], "adapter_file_bytes": {},
    }
    with tempfile.TemporaryDirectory(prefix="pv-serve-") as tmp:
        for n in [int(v) for v in args.adapters.split(",") if v]:
            dirs = write_adapters(base, n, Path(tmp) / f"n{n}")
            results["adapter_file_bytes"][str(n)] = sum(f.stat().st_size for d in dirs.values() for f in Path(d).iterdir())
            results["library"] += library(base, dirs, ["single", *args.engines.split(",")], args.batch, args.rounds)
            Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        if not args.no_http:
            root = Path(tmp) / f"http{args.http_adapters}"
            dirs = write_adapters(base, args.http_adapters, root)
            results["http"] = http_pairs(base, dirs, root, args)
            results["load_average_at_end"] = os.getloadavg()
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(summary(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
