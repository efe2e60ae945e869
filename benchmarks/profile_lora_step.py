"""Where a LoRA training step's time goes, next to full fine-tuning's: torch.profiler by operator.

    python benchmarks/profile_lora_step.py [--model vit_small_patch16_224] [--batch 8] [--steps 5] [--top 12]

Each variant (full fine-tuning, our LoRA on q, k, v, HF PEFT's LoRA on the fused qkv) runs `--steps`
AdamW steps on random images after 2 warm-up steps, under torch.profiler (CPU), and the table lists
the operators with the most self CPU time per step, with each variant's total. Read it as: a frozen
backbone saves the weight gradients (the `mm` of backward for every frozen Linear) and the optimizer
update; what it cannot save is the activation gradients and the forward, which both variants compute.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import build  # noqa: E402  (the same variants as the step-time benchmark)


def profile(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[dict[str, float], float]:
    """(self CPU ms per step by operator, total ms per step)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    model.train()
    for _ in range(2):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        ops[e.key] += e.self_cpu_time_total / 1000 / steps
    return dict(ops), sum(ops.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--variants", default="full,lora,peft-lora")
    args = p.parse_args()
    torch.manual_seed(0)
    variants = args.variants.split(",")
    results = {}
    for v in variants:
        model = build(args.model, v, 10, grad_ckpt=False, compile_=False)
        size = model.pretrained_cfg["input_size"] if hasattr(model, "pretrained_cfg") else (3, 224, 224)
        x, y = torch.randn(args.batch, *size), torch.randint(0, 10, (args.batch,))
        results[v] = profile(model, x, y, args.steps)
    top = sorted({k for ops, _ in results.values() for k in ops}, key=lambda k: -max(r[0].get(k, 0) for r in results.values()))
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads: self CPU ms per training step\n")
    print("| operator | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for k in top[: args.top]:
        print(f"| `{k}` | " + " | ".join(f"{results[v][0].get(k, 0):.1f}" for v in variants) + " |")
    print("| **total** | " + " | ".join(f"**{results[v][1]:.1f}**" for v in variants) + " |")
    base = results[variants[0]][1]
    print("| ratio to " + variants[0] + " | " + " | ".join(f"{results[v][1] / base:.2f}x" for v in variants) + " |")


if __name__ == "__main__":
    main()
