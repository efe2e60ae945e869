"""The Linear layers of a transformer block that methods target by short name, shared by every method
that adapts whole Linears (FacT, RepAdapter, OFT, GPS, and LoRA beyond q, k, v)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..backbones.backbone import Backbone, BlockInfo

LINEARS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def parse_targets(targets: Any) -> tuple[str, ...]:
    """`targets` as a tuple of distinct LINEARS names ("qkv,fc1" from a flag, or a sequence), or ValueError."""
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    targets = tuple(targets)
    if not targets or any(t not in LINEARS for t in targets) or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct names among {', '.join(LINEARS)}; got {targets}")
    return targets


def linear_sites(model: nn.Module, backbone: Backbone, targets: tuple[str, ...]) -> list[tuple[BlockInfo, str, nn.Linear]]:
    """(block, path, Linear) for every block and target, in block order."""
    return [(b, LINEARS[t], backbone.linear(model, b, LINEARS[t])) for b in backbone.blocks for t in targets]
