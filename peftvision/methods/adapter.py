"""Houlsby bottleneck adapters (Houlsby et al., 2019), with the placements the VTAB-1k literature uses.

An adapter is down-projection -> non-linearity -> up-projection with a residual connection. The
up-projection starts at zero, so an injected model computes exactly what the base computed.

Placements:
- `ffn` (default): one adapter on the output of each block's MLP -- the "Adapter" baseline of the
  VTAB-1k tables (and Pfeiffer et al.'s efficient variant).
- `attn+ffn`: Houlsby's original -- one after the attention's output projection, one after the MLP.
- `parallel`: AdaptFormer -- the adapter reads the MLP's input and its output, times `scale`, is added
  to the MLP's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..backbones.backbone import Backbone
from ._parts import Bottleneck as BottleneckPart
from ._parts import Part
from ._registry import Method, PeftModule, register_method

PLACEMENTS = ("ffn", "attn+ffn", "parallel")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "identity": nn.Identity}


@dataclass
class AdapterConfig:
    dim: int = 8  # bottleneck width; 8 is the VTAB-1k Adapter setting for ViT-B/16
    placement: str = "ffn"  # ffn | attn+ffn | parallel (see the module docstring)
    scale: float = 0.1  # output scale of the parallel adapter (AdaptFormer's default)
    activation: str = "gelu"  # gelu | relu | identity
    dropout: float = 0.0  # dropout inside the bottleneck

    def __post_init__(self) -> None:
        if int(self.dim) != self.dim or self.dim < 1:
            raise ValueError(f"dim must be a positive integer, got {self.dim}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class Bottleneck(nn.Module):
    """down (D -> dim) -> activation -> dropout -> up (dim -> D, zero-initialised)."""

    def __init__(self, width: int, dim: int, activation: str, dropout: float, factory: dict[str, Any]) -> None:
        super().__init__()
        self.down = nn.Linear(width, dim, **factory)
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(dim, width, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(x))))


class AdapterWrapper(PeftModule):
    """Runs the wrapped module, then adds the adapter: sequential on its output, or parallel on its input.

    Attribute look-ups fall through to the wrapped module (`PeftModule`), so timm code that reads e.g.
    `attn.num_heads` keeps working.
    """

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck, parallel: bool, scale: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.parallel = parallel
        self.scale = scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.parallel:
            return out + self.scale * self.adapter(x)
        return out + self.adapter(out)


def _width(module: nn.Module, fallback: int) -> int:
    """Output width of an MLP or attention: its last Linear's out_features."""
    for child in ("fc2", "proj"):
        layer = getattr(module, child, None)
        if isinstance(layer, nn.Linear):
            return layer.out_features
    return fallback


@register_method
class HoulsbyAdapter(Method):
    name = "adapter"
    config_cls = AdapterConfig
    default_lr = 3e-3  # the up-projection starts at 0, as LoRA's B, and wants the same lr (benchmarks/default-lr.md)
    embedded_lr = 1e-2  # on the embedded 32-px backbones (benchmarks/default-lr.md)
    silent_at_init = ("adapter.down",)  # before the zero up-projection
    # the probe's head is kept as fitted (real photos, benchmarks/RESULTS.md, 3 seeds: 92.8 mean over 7
    # regimes vs 92.6 at 0.1 and 91.6 at 1, and above the probe in all 7; at 1 it was 0.6 below on 60
    # photos): the zero-init bottlenecks adapt the features to the head rather than the head to noise
    probe_head_lr_ratio = 0.0
    examples = (dict(dim=4, placement="attn+ffn"), dict(placement="parallel", scale=0.5))

    def expected_params(self, model: nn.Module, backbone: Backbone, config: AdapterConfig) -> int:
        """Per adapter on a width-d output: down d*m + m, up m*d + d; one per block, two with attn+ffn."""
        m, per_block = int(config.dim), 2 if config.placement == "attn+ffn" else 1
        return sum(per_block * (2 * b.dim * m + m + b.dim) for b in backbone.blocks)

    def inject(self, model: nn.Module, backbone: Backbone, config: AdapterConfig) -> None:
        children = ("attn", "mlp") if config.placement == "attn+ffn" else ("mlp",)
        for block in backbone.blocks:
            for child in children:
                base = backbone.block_module(model, block, child)
                ref = next(base.parameters())
                factory = dict(device=ref.device, dtype=ref.dtype)
                bottleneck = Bottleneck(_width(base, block.dim), int(config.dim), config.activation, config.dropout, factory)
                wrapper = AdapterWrapper(base, bottleneck, config.placement == "parallel", config.scale)
                model.set_submodule(f"{block.name}.{child}", wrapper)

    def serve_parts(self, model: nn.Module, backbone: Backbone, config: AdapterConfig) -> list[Part]:
        parts: list[Part] = []
        for name, m in model.named_modules():
            if isinstance(m, AdapterWrapper):
                scale = m.scale if m.parallel else 1.0  # folded into the up-projection
                down, up = m.adapter.down, m.adapter.up
                parts.append(BottleneckPart(
                    name, down.weight.detach(), down.bias.detach(), up.weight.detach() * scale,
                    up.bias.detach() * scale, config.activation, "input" if m.parallel else "output",
                ))
        return parts
