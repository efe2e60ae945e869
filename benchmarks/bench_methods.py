"""Speed and memory of every method against full fine-tuning, and of our LoRA against HF PEFT's.

One process measures training step time and inference latency for all variants on the same model,
input and batch, interleaving the variants step by step so machine noise hits them alike. Peak memory
is measured in a fresh subprocess per variant (CPU: growth of peak RSS over the RSS before the first
step; GPU: torch.cuda.max_memory_allocated).

    python benchmarks/bench_methods.py                       # ViT-S/16 and Swin-T at 224, batch 16
    python benchmarks/bench_methods.py --models test_vit --batch 4 --steps 3 --warmup 1   # smoke run

Writes a JSON file and prints a markdown report (paste it into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import peftvision as pv
from peftvision.methods.inject import enable_grad_checkpointing
from peftvision.training.report import peak_memory_mb

# variant name -> (method, options). "peft-lora" is HF PEFT's LoRA; "lora-qkv" is ours on the same
# modules (the whole qkv) and rank, so the two do the same FLOPs.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{m: (m, {}) for m in pv.list_methods()},  # every registered method with its defaults
    "lora-qkv": ("lora", {"targets": ("qkv",)}),
    # LoRA's options (issue 29): rsLoRA and LoRA+ change only the scaling / B's lr (same FLOPs as lora; the
    # steps here use one lr); PiSSA adds the frozen initial factors (a rank-2r product)
    "lora-rslora": ("lora", {"use_rslora": True}),
    "lora-plus": ("lora", {"lr_ratio": 16.0}),
    "lora-pissa": ("lora", {"init": "pissa"}),
    "peft-lora": ("peft", {}),
    # the published, ungated VPT (the default is gated: two softmaxes per attention, issue 24)
    "vpt-deep-ungated": ("vpt-deep", {"gate": False}),
    "vpt-shallow-ungated": ("vpt-shallow", {"gate": False}),
}


def build(model_name: str, variant: str, num_classes: int, grad_ckpt: bool, compile_: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = pv.create_model(model_name, num_classes=num_classes)
    method, options = VARIANTS[variant]
    if method == "peft":
        from peft import LoraConfig, get_peft_model

        head = model.pretrained_cfg.get("classifier", "head")
        config = LoraConfig(r=8, lora_alpha=8, target_modules=r".*\.attn\.qkv", modules_to_save=[head])
        model = get_peft_model(model, config)
        if grad_ckpt:
            model.base_model.model.set_grad_checkpointing(True)
    else:
        pv.inject(model, method, **options)
        if grad_ckpt:
            enable_grad_checkpointing(model)
    if compile_:
        model = torch.compile(model)
    return model


def make_step(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(batch), labels)
        loss.backward()
        opt.step()

    return step


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, steps: int, seed: int = 0) -> dict[str, list[float]]:
    """Run each fn warmup + steps times, in a shuffled order per round; keep the post-warm-up times."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for i in range(warmup + steps):
        rng.shuffle(order)
        for k in order:
            dt = timed(fns[k])
            if i >= warmup:
                times[k].append(dt)
    return times


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: peak memory of a few training steps of one variant."""
    device = torch.device(args.device)
    model = build(args.model, args.variant, args.num_classes, args.grad_checkpointing, args.compile).to(device)
    x, y = _data(args.model, args.batch, device)
    step = make_step(model, x, y)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
        for _ in range(3):
            step()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        base = _rss_mb()
        for _ in range(3):
            step()
        peak = peak_memory_mb()  # VmHWM: ru_maxrss would include the parent's peak (it survives fork + exec)
    print(json.dumps({"peak_mb": peak, "growth_mb": peak - base}))


def _data(model_name: str, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import timm

    size = timm.create_model(model_name).pretrained_cfg["input_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, y


def measure_memory(args: argparse.Namespace, model_name: str, variant: str) -> dict[str, float]:
    cmd = [
        sys.executable, __file__, "--memory-child", "--model", model_name, "--variant", variant,
        "--batch", str(args.batch), "--num-classes", str(args.num_classes), "--device", args.device,
    ] + (["--grad-checkpointing"] if args.grad_checkpointing else []) + (["--compile"] if args.compile else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def adapter_bytes(model: nn.Module) -> int | None:
    if pv.get_state(model) is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        pv.save_adapter(model, d)
        return os.path.getsize(Path(d) / "adapter.safetensors")


def bench_model(args: argparse.Namespace, model_name: str) -> dict[str, Any]:
    device = torch.device(args.device)
    variants = [v for v in args.variants.split(",")]
    models = {v: build(model_name, v, args.num_classes, args.grad_checkpointing, args.compile).to(device) for v in variants}
    x, y = _data(model_name, args.batch, device)
    train: dict[str, list[float]] = {}
    if not args.no_train:
        print(f"[{model_name}] training steps ({args.warmup} warm-up + {args.steps}, interleaved)", file=sys.stderr)
        train = interleaved({v: make_step(m, x, y) for v, m in models.items()}, args.warmup, args.steps)

    # inference: the plain base (twice: two identical models show this run's noise floor), every variant
    # unmerged, and merged where the method can
    infer_models: dict[str, nn.Module] = {
        "base": _plain(model_name, args.num_classes).to(device),
        "base-copy": _plain(model_name, args.num_classes).to(device),
    }
    for v, m in models.items():
        infer_models[v] = m
    for v, m in models.items():  # every variant whose method merges into plain timm weights
        method, options = VARIANTS[v]
        if method != "peft" and pv.get_method(method).mergeable(pv.methods.build_config(method, options)) is None \
                and not pv.get_method(method).kind == "baseline":
            infer_models[f"{v}-merged"] = pv.merge(m)
    for k, m in infer_models.items():
        m.eval()
        if args.compile and k not in models:  # variants were compiled in build(); compile the rest alike
            infer_models[k] = torch.compile(m)

    def forward(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                m(x)
        return run

    print(f"[{model_name}] inference", file=sys.stderr)
    infer = interleaved({k: forward(m) for k, m in infer_models.items()}, args.warmup, args.steps)

    rows: dict[str, Any] = {}
    for v in variants:
        m = models[v]
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        rows[v] = {"infer_s": statistics.median(infer[v]), "trainable": trainable, "adapter_bytes": adapter_bytes(m)}
        if v in train:
            rows[v].update(step_s=statistics.median(train[v]), img_per_s=args.batch / statistics.median(train[v]))
    for k in infer_models:
        if k not in rows:
            rows[k] = {"infer_s": statistics.median(infer[k])}
    if not (args.no_memory or args.no_train):
        for v in variants:
            print(f"[{model_name}] memory: {v}", file=sys.stderr)
            rows[v].update(measure_memory(args, model_name, v))
    return rows


def _plain(name: str, num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return pv.create_model(name, num_classes=num_classes)


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or not b else f"{a / b:.2f}"


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = []
    for model_name, rows in results["models"].items():
        full, lora, base_inf = rows.get("full", {}), rows.get("lora", {}), rows["base"]["infer_s"]
        lines += [
            f"### {model_name} (batch {args.batch}, {results['device']})",
            "",
            "| variant | train step (s) | x full | x lora | img/s | peak mem growth (MB) | x full | x lora | inference (s) | x base | trainable | adapter (MB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for v, r in rows.items():
            step, mem, size = r.get("step_s"), r.get("growth_mb"), r.get("adapter_bytes")
            lines.append(
                f"| {v} | {_fmt(step, '.3f')} | {_ratio(step, full.get('step_s'))} | {_ratio(step, lora.get('step_s'))} "
                f"| {_fmt(r.get('img_per_s'), '.1f')} | {_fmt(mem, '.0f')} | {_ratio(mem, full.get('growth_mb'))} "
                f"| {_ratio(mem, lora.get('growth_mb'))} | {r['infer_s']:.4f} "
                f"| {r['infer_s'] / base_inf:.3f} | {_fmt(r.get('trainable'), ',')} | {_fmt(size and size / 1e6, '.3f')} |"
            )
        lines.append("")
        ours, theirs = rows.get("lora-qkv", {}), rows.get("peft-lora", {})
        if "step_s" in ours and "step_s" in theirs:
            mem = _ratio(ours.get("growth_mb"), theirs.get("growth_mb"))
            lines += [
                f"Our LoRA vs HF PEFT (r=8 on the whole qkv, same FLOPs): step time "
                f"{_ratio(ours['step_s'], theirs['step_s'])}x" + (f", peak memory growth {mem}x." if mem else "."),
                "",
            ]
    return "\n".join(lines)


def _cpu_name() -> str:
    """The CPU model: absolute times differ ~3x between the hosts this runs on, ratios much less."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_small_patch16_224,swin_tiny_patch4_window7_224")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--no-train", action="store_true", help="time inference only (LoRA's B stays 0: same FLOPs)")
    p.add_argument("--output", default="benchmarks/results-methods.json")
    # internal: one memory measurement in a fresh process
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_child:
        memory_child(args)
        return
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "device": args.device,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "models": {},
    }
    for name in args.models.split(","):
        results["models"][name] = bench_model(args, name)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['date']}, {results['machine']}\n`{results['command']}`\n")
    print(report(results, args))


if __name__ == "__main__":
    main()
