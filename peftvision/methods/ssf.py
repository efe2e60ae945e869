"""SSF (Lian et al., 2022): a learnable per-channel scale and shift after the backbone's operations.

`y = op(x) * scale + shift` after each chosen Linear of every block (qkv, proj, fc1, fc2) and after
every LayerNorm of the backbone (blocks, final norm, patch-embedding and patch-merging norms). It
starts at the identity (scale 1, shift 0; the paper draws N(1, 0.02) / N(0, 0.02), which moves the
output before any training) and, being affine, merges exactly into the op it follows:
`W <- scale * W`, `b <- scale * b + shift` (rows of a Linear, the affine of a LayerNorm). The merged
model is a plain timm model with timm's state-dict keys and zero overhead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..backbones.backbone import Backbone
from ..errors import PeftVisionError, UnsupportedModelError
from ._parts import Affine, Part
from ._registry import Method, PeftModule, register_method

LINEARS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
NORM = "norm"  # every LayerNorm outside the head


@dataclass
class SSFConfig:
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2", "norm")  # the paper's: after every op

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        allowed = (*LINEARS, NORM)
        if not self.targets or any(t not in allowed for t in self.targets) or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets must be distinct names among {', '.join(allowed)}; got {self.targets}")


class ScaleShift(PeftModule):
    """Runs the wrapped op, then `* scale + shift` per output channel (channel dim last, or 1 for 2-D norms)."""

    def __init__(self, base_layer: nn.Module, width: int, channels_first: bool = False) -> None:
        super().__init__()
        ref = next(base_layer.parameters())
        self.base_layer = base_layer
        self.scale = nn.Parameter(torch.ones(width, device=ref.device, dtype=ref.dtype))
        self.shift = nn.Parameter(torch.zeros(width, device=ref.device, dtype=ref.dtype))
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.channels_first:  # (B, C, H, W)
            return out * self.scale.view(-1, 1, 1) + self.shift.view(-1, 1, 1)
        return out * self.scale + self.shift

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """The wrapped op with scale and shift folded into its weight and bias."""
        base = self.base_layer
        if base.bias is None or base.weight is None:
            raise PeftVisionError(f"cannot merge SSF into a {type(base).__name__} without weight and bias")
        shape = (-1,) + (1,) * (base.weight.dim() - 1) if isinstance(base, nn.Linear) else (-1,)
        base.weight.mul_(self.scale.view(shape))
        base.bias.mul_(self.scale).add_(self.shift)
        return base


def _sites(model: nn.Module, backbone: Backbone, config: SSFConfig) -> list[tuple[str, nn.Module]]:
    """(path, module) of every op SSF follows, Linears of the blocks first, then the LayerNorms."""
    sites = []
    for block in backbone.blocks:
        attn = backbone.block_module(model, block, "attn")
        if "qkv" in config.targets and getattr(attn, "q_bias", None) is not None:
            raise UnsupportedModelError(
                f"{backbone.architecture}: its attention applies qkv.weight with its own q/v biases, so a shift "
                f"after qkv would be skipped; use --set ssf.targets=proj,fc1,fc2,norm"
            )
        sites += [(f"{block.name}.{LINEARS[t]}", backbone.linear(model, block, LINEARS[t])) for t in config.targets if t in LINEARS]
    if NORM in config.targets:
        sites += [
            (name, m) for name, m in model.named_modules()
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine and name and not backbone.is_head(name)
        ]
    return sites


def _width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else int(module.normalized_shape[0])


@register_method
class SSF(Method):
    name = "ssf"
    config_cls = SSFConfig
    default_lr = 3e-3  # scale and shift start at the identity, like LoRA's B at 0, and take the same step
    embedded_lr = 1e-2  # on the embedded 32-px backbones (benchmarks/default-lr.md)
    examples = (dict(targets=("qkv", "fc1")), dict(targets=("norm",)))

    def expected_params(self, model: nn.Module, backbone: Backbone, config: SSFConfig) -> int:
        """Two vectors (scale, shift) as wide as each followed op's output."""
        return sum(2 * _width(m) for _, m in _sites(model, backbone, config))

    def inject(self, model: nn.Module, backbone: Backbone, config: SSFConfig) -> None:
        for path, module in _sites(model, backbone, config):
            channels_first = type(module).__name__.endswith("2d")  # timm's LayerNorm2d normalises dim 1
            model.set_submodule(path, ScaleShift(module, _width(module), channels_first))

    def mergeable(self, config: SSFConfig) -> str | None:
        return None

    def merge(self, model: nn.Module, backbone: Backbone, config: SSFConfig) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, ScaleShift):
                model.set_submodule(name, module.fold())

    def serve_parts(self, model: nn.Module, backbone: Backbone, config: SSFConfig) -> list[Part]:
        return [
            Affine(name, m.scale.detach(), m.shift.detach(), m.channels_first)
            for name, m in model.named_modules() if isinstance(m, ScaleShift)
        ]
