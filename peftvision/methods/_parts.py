"""What a trained adapter adds to the frozen base, in forms a multi-adapter model can batch per sample.

`Method.serve_parts` describes a loaded adapter as a list of these. `peftvision.serving.multi` stacks the parts
of many adapters site by site and applies them with batched matmuls, each sample with its own slice,
in one forward pass of the shared backbone. A method's file says *what* it adds; how per-sample
batching is done lives in one place and knows no method by name.

Sites are module paths in the plain base model's namespace ("blocks.3.attn.qkv").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn


@dataclass
class LowRank:
    """The Linear at `site` gets `out[..., offset : offset + len(b)] += x @ a.T @ b.T` (scaling folded
    into `b`): an update of some output rows only (one q / k / v slice of a fused qkv) keeps no zeros."""

    site: str
    a: torch.Tensor  # (R, in)
    b: torch.Tensor  # (rows, R)
    offset: int = 0  # first output row it updates


@dataclass
class Bottleneck:
    """The module at `site` gets `out += up(act(down(z)))`, z being its input or its output."""

    site: str
    down_weight: torch.Tensor  # (m, D)
    down_bias: torch.Tensor  # (m,)
    up_weight: torch.Tensor  # (D_out, m), any output scale folded in
    up_bias: torch.Tensor  # (D_out,)
    activation: str  # a name in methods.adapter.ACTIVATIONS; must map 0 to 0 (zero padding stays exact)
    reads: str  # "input" | "output"


@dataclass
class Bias:
    """The module at `site` (a Linear, LayerNorm or Conv) uses `value` as its bias instead of the base's."""

    site: str
    value: torch.Tensor


@dataclass
class Affine:
    """The module at `site` gets `out = out * scale + shift` per channel (last dim, or dim 1)."""

    site: str
    scale: torch.Tensor  # (C,)
    shift: torch.Tensor  # (C,)
    channels_first: bool = False


class RoutedPrompts(Protocol):
    """A prompt module that can serve many adapters' prompts at once, one row per sample.

    `stacked(members)` builds one module holding every member's prompts; before a forward pass the
    caller sets `rows` (B,) -- which member each sample uses -- and `attach` hooks the module into the
    shared base for that pass only (the returned callable removes the hooks)."""

    rows: torch.Tensor | None

    @classmethod
    def stacked(cls, members: list[Any]) -> "RoutedPrompts": ...

    def attach(self, model: nn.Module, backbone: Any) -> Callable[[], None]: ...


@dataclass
class Prompts:
    """Extra tokens: samples whose adapters share `group` (same kind, same token count) share a pass."""

    group: tuple
    module: Any  # a RoutedPrompts


@dataclass
class OwnModel:
    """The adapter changed every weight: its samples run through `model`, not the shared backbone."""

    model: nn.Module


Part = LowRank | Bottleneck | Bias | Affine | Prompts | OwnModel
