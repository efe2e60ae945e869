"""One attention qkv layer, forward + backward: frozen, our LoRA, and HF PEFT's LoRA, side by side.

Where `bench_methods.py` times whole training steps, this isolates the one layer LoRA changes, so its
overhead over the frozen layer can be read directly (defaults: ViT-S shapes, 16 x 197 tokens of width
384, r=8). It also times the two ways of computing B's gradient that differ ~10x on CPU BLAS at r=8,
the reason `LoRALinear` hands addmm a row-major B^T.

    python benchmarks/bench_lora_layer.py                 # ViT-S qkv, median of 20 interleaved rounds
    python benchmarks/bench_lora_layer.py --dim 768       # ViT-B qkv
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import _cpu_name, interleaved  # noqa: E402

from peftvision.methods.lora import LoRALinear  # noqa: E402

OURS = {"lora q,v": ((0, 2), 3), "lora q,k,v": ((0, 1, 2), 3), "lora qkv": ((0,), 1)}


def fwd_bwd(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        xi = x.detach().requires_grad_(True)  # a trainable input, as inside a network with trainable layers below
        layer(xi).backward(g)
        for p in layer.parameters():
            p.grad = None

    return run


def peft_layer(base: nn.Linear, r: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    wrapper = nn.Module()
    wrapper.qkv = base
    wrapper.forward = lambda x: wrapper.qkv(x)  # get_peft_model needs a module with a forward
    model = get_peft_model(wrapper, LoraConfig(r=r, lora_alpha=r, target_modules=["qkv"]))
    layer = model.base_model.model.qkv
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)  # as after some training; B = 0 at init
    return layer


def layers(dim: int, r: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Linear(dim, 3 * dim).requires_grad_(False)
    out: dict[str, nn.Module] = {"frozen": base}
    for name, (slices, num_slices) in OURS.items():
        layer = LoRALinear(base, slices, num_slices, r=r, alpha=float(r), dropout=0.0)
        nn.init.normal_(layer.lora_B, std=0.02)
        out[name] = layer
    out["peft lora qkv"] = peft_layer(base, r)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--output", default="benchmarks/results-lora-layer.json")
    args = p.parse_args()
    x = torch.randn(args.batch, args.tokens, args.dim)
    g = torch.randn(args.batch, args.tokens, 3 * args.dim)
    fns = {name: fwd_bwd(layer, x, g) for name, layer in layers(args.dim, args.r).items()}
    # B's gradient (out x r) from the output gradient g (tokens x out) and z = x A^T (tokens x r)
    g2, z = g.reshape(-1, 3 * args.dim), torch.randn(args.batch * args.tokens, args.r)
    fns[f"grad B as z^T @ g (r={args.r})"] = lambda: z.t() @ g2
    fns[f"grad B as (g^T @ z)^T (r={args.r})"] = lambda: g2.t() @ z
    times = interleaved(fns, args.warmup, args.rounds)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = {"machine": f"{_cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
              "shape": vars(args), "median_ms": ms}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['machine']}; x {args.batch}x{args.tokens}x{args.dim}, r={args.r}, median of {args.rounds}\n")
    print("| layer (forward + backward) | ms | x frozen |\n|---|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.2f} | {v / ms['frozen']:.2f} |")


if __name__ == "__main__":
    main()
