"""Adapter+ (Steitz & Roth, "Adapters Strike Back", CVPR 2024): the bottleneck adapter, re-tuned for ViTs.

What differs from the Houlsby adapter (`adapter.py`):
- Placement "post": after the whole block, reading the block's output (residual included) and adding
  to it -- `y = x + s * up(act(down(x)))` with `x` the block's output.
- A learnable per-channel scale `s` (initialised to 1) instead of a fixed scalar.
- No layer norm inside the adapter.
- Houlsby's initialisation: both projections drawn from a normal with std 0.01 truncated at 2 std,
  biases zero -- so, unlike our zero-initialised adapter, the output moves (slightly) at init.
- Stochastic depth on the adapter branch (drop_path 0.1 in the paper).
Adapter+ reports 77.6 on VTAB-1k (ViT-B/16, IN-21k, mean of group means) with about 0.2% of its weights.

The adapters enter through forward hooks on timm's blocks, so the base keeps timm's modules and keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.backbone import Backbone
from ._parts import Bottleneck as BottleneckPart
from ._parts import Part
from ._registry import Method, PeftModule, register_method

INIT_STD = 0.01  # Houlsby et al.'s value, as Adapter+ uses it


@dataclass
class AdapterPlusConfig:
    dim: int = 8  # bottleneck width: Adapter+'s VTAB-1k setting for ViT-B/16 (~0.2% of the weights)
    drop_path: float = 0.1  # stochastic depth of the adapter branch while training (the paper's)
    dropout: float = 0.0  # dropout inside the bottleneck

    def __post_init__(self) -> None:
        if int(self.dim) != self.dim or self.dim < 1:
            raise ValueError(f"dim must be a positive integer, got {self.dim}")
        for name in ("drop_path", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


class PostBlockAdapter(PeftModule):
    """`x + scale * up(gelu(down(x)))` on a block's output x, per sample dropped with prob. drop_path."""

    def __init__(self, width: int, config: AdapterPlusConfig, ref: torch.Tensor) -> None:
        super().__init__()
        factory = dict(device=ref.device, dtype=ref.dtype)
        m = int(config.dim)
        self.down = nn.Linear(width, m, **factory)
        self.act = nn.GELU()
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.up = nn.Linear(m, width, **factory)
        self.scale = nn.Parameter(torch.ones(width, **factory))
        self.drop_path = float(config.drop_path)
        for layer in (self.down, self.up):
            nn.init.trunc_normal_(layer.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
            nn.init.zeros_(layer.bias)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(x)))) * self.scale

    def hook(self, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = self.branch(output)  # (B, ..., C): tokens (ViT) or (B, H, W, C) (Swin)
        if self.training and self.drop_path > 0:  # stochastic depth: keep the branch per sample
            keep = 1.0 - self.drop_path
            mask = delta.new_empty((delta.shape[0],) + (1,) * (delta.dim() - 1)).bernoulli_(keep)
            delta = delta * mask / keep
        return output + delta


@register_method
class AdapterPlus(Method):
    name = "adapter-plus"
    config_cls = AdapterPlusConfig
    default_lr = 3e-3  # as the Houlsby adapter (benchmarks/default-lr.md)
    embedded_lr = 1e-2  # on the embedded 32-px backbones (benchmarks/default-lr.md)
    identity_at_init = False  # Houlsby's init: both projections small but non-zero
    examples = (dict(dim=4, drop_path=0.0),)

    def expected_params(self, model: nn.Module, backbone: Backbone, config: AdapterPlusConfig) -> int:
        """Per block of width d: down d*m + m, up m*d + d, scale d."""
        m = int(config.dim)
        return sum(2 * b.dim * m + m + 2 * b.dim for b in backbone.blocks)

    def inject(self, model: nn.Module, backbone: Backbone, config: AdapterPlusConfig) -> None:
        ref = next(model.parameters())
        adapters = nn.ModuleList(PostBlockAdapter(b.dim, config, ref) for b in backbone.blocks)
        for info, adapter in zip(backbone.blocks, adapters):
            model.get_submodule(info.name).register_forward_hook(adapter.hook)
        model.post_adapters = adapters

    def serve_parts(self, model: nn.Module, backbone: Backbone, config: AdapterPlusConfig) -> list[Part]:
        parts: list[Part] = []
        for info, a in zip(backbone.blocks, model.post_adapters):
            s = a.scale.detach()
            parts.append(BottleneckPart(
                info.name, a.down.weight.detach(), a.down.bias.detach(), a.up.weight.detach() * s[:, None],
                a.up.bias.detach() * s, "gelu", "output",
            ))
        return parts

    def mergeable(self, config: AdapterPlusConfig) -> str | None:
        return "adapter-plus adds a non-linear bottleneck after every block, which no weight of the base can hold"
