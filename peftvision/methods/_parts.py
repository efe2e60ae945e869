"""What a trained adapter adds to the frozen base, in forms a multi-adapter model can batch per sample.

`Method.serve_parts` describes a loaded adapter as a list of these. Each kind owns how it is served:
`key` says which parts of many adapters stack together, `stack` stacks them (slot 0 all zeros: the
samples without one) and returns the function that applies them to a batch, each sample with its own
slot, in batched matmuls (the BGMV idea of Punica / S-LoRA). `peftvision.serving.multi` only routes
samples and calls these, so a new kind is added here and nowhere else; no kind knows a method by name.

Sites are module paths in the plain base model's namespace ("blocks.3.attn.qkv"). Inputs and outputs
at a site are (b * k, ..., C) with the k rows of one sample contiguous: (B, N, C) tokens,
(B * windows, N, C) for Swin's window attention, (B, C) pooled; viewing them as (b, -1, C) gives each
sample its own matrix of rows. Zero-padded ranks and widths keep every sample exact: a zero factor
adds exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

# (slots (b,), site input, site output) -> new output: a stack applied to one pass
Apply = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# activations a bottleneck may be served with: each maps 0 to 0, so zero-padded widths stay exact
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu, "relu": F.relu, "identity": lambda x: x,
}


def stack_rows(parts: list[Any], attr: str, shape: tuple[int, ...], ref: torch.Tensor,
               transpose: bool = False, slot0: Any = None) -> torch.Tensor:
    """(len(parts) + 1, *shape): row i + 1 holds `attr` of parts[i] (transposed if asked) in its
    leading corner, zeros elsewhere; row 0 is `slot0` (else zeros). Each part's `attr` then points at
    its row: every adapter tensor is held once, by the stack, and the next rebuild stacks the views."""
    rows = [getattr(p, attr).to(ref.device, ref.dtype) for p in parts]
    rows = [r.t() if transpose else r for r in rows]
    out = ref.new_zeros((len(rows) + 1, *shape))
    for i, r in enumerate(rows):
        out[(i + 1, *(slice(0, s) for s in r.shape))] = r
    if slot0 is not None:
        out[0] = slot0
    for i, (p, r) in enumerate(zip(parts, rows)):
        view = out[(i + 1, *(slice(0, s) for s in r.shape))]
        setattr(p, attr, view.t() if transpose else view)
    return out


class SitePart:
    """A part applied at the output of one module of the base, in the shared backbone pass."""

    route: ClassVar[str] = "shared"
    # where at a site it applies: bias values and low-rank updates belong to the op itself, then an
    # affine of its output (DoRA's row scale reads the updated output), then bottlenecks reading the result
    order: ClassVar[int]
    site: str

    def key(self) -> tuple:
        """Parts of many adapters with equal keys stack together: same site, kind and shape-defining options."""
        return (self.site, type(self).__name__)

    @classmethod
    def stack(cls, parts: list[Any], module: nn.Module, ref: torch.Tensor) -> Apply:
        """Stack `parts` (equal keys) for `module` (the site in the base) and return how they apply."""
        raise NotImplementedError


@dataclass
class LowRank(SitePart):
    """The Linear at `site` gets `out[..., offset : offset + len(b)] += x @ a.T @ b.T` (scaling folded
    into `b`): an update of some output rows only (one q / k / v slice of a fused qkv) keeps no zeros."""

    order: ClassVar[int] = 1
    site: str
    a: torch.Tensor  # (R, in)
    b: torch.Tensor  # (rows, R)
    offset: int = 0  # first output row it updates

    def key(self) -> tuple:
        return (*super().key(), self.offset, self.b.shape[0])

    @classmethod
    def stack(cls, parts: list["LowRank"], module: nn.Module, ref: torch.Tensor) -> Apply:
        first, r = parts[0], max(p.a.shape[0] for p in parts)
        a_t = stack_rows(parts, "a", (first.a.shape[1], r), ref, transpose=True)  # (S, in, R)
        b_t = stack_rows(parts, "b", (r, first.b.shape[0]), ref, transpose=True)  # (S, R, rows)
        offset, rows = first.offset, first.b.shape[0]

        def apply(slots: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            b = slots.numel()
            z = torch.bmm(x.reshape(b, -1, x.shape[-1]), a_t[slots])  # (b, L, R)
            out = out.contiguous()
            out.view(b, -1, out.shape[-1])[..., offset : offset + rows].baddbmm_(z, b_t[slots])  # += z @ B^T
            return out

        return apply


@dataclass
class Bottleneck(SitePart):
    """The module at `site` gets `out += up(act(down(z)))`, z being its input or its output."""

    order: ClassVar[int] = 3
    site: str
    down_weight: torch.Tensor  # (m, D)
    down_bias: torch.Tensor  # (m,)
    up_weight: torch.Tensor  # (D_out, m), any output scale folded in
    up_bias: torch.Tensor  # (D_out,)
    activation: str  # a name in ACTIVATIONS
    reads: str  # "input" | "output"

    def key(self) -> tuple:
        return (*super().key(), self.activation, self.reads)

    @classmethod
    def stack(cls, parts: list["Bottleneck"], module: nn.Module, ref: torch.Tensor) -> Apply:
        first = parts[0]
        if first.activation not in ACTIVATIONS:
            raise ConfigError(f"{first.site}: cannot serve a bottleneck with activation {first.activation!r}")
        act, reads_input = ACTIVATIONS[first.activation], first.reads == "input"
        m = max(p.down_weight.shape[0] for p in parts)
        d, d_out = first.down_weight.shape[1], first.up_weight.shape[0]
        down_t = stack_rows(parts, "down_weight", (d, m), ref, transpose=True)  # (S, D, m)
        down_b = stack_rows(parts, "down_bias", (m,), ref)  # (S, m)
        up_t = stack_rows(parts, "up_weight", (m, d_out), ref, transpose=True)  # (S, m, D_out)
        up_b = stack_rows(parts, "up_bias", (d_out,), ref)  # (S, D_out)

        def apply(slots: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            z = (x if reads_input else out).reshape(slots.numel(), -1, d)  # (b, L, D)
            h = act(torch.baddbmm(down_b[slots].unsqueeze(1), z, down_t[slots]))  # (b, L, m)
            delta = torch.baddbmm(up_b[slots].unsqueeze(1), h, up_t[slots])  # (b, L, D_out)
            return out + delta.view(out.shape)

        return apply


def _per_channel(out: torch.Tensor, b: int, c: int, channels_first: bool) -> tuple[torch.Tensor, int]:
    """`out` viewed per sample with its channels on one axis: (b, C, -1) channels first, else (b, -1, C);
    and the axis a (b, C) per-sample vector must be unsqueezed at to broadcast over it."""
    return (out.reshape(b, c, -1), -1) if channels_first else (out.reshape(b, -1, c), 1)


@dataclass
class Bias(SitePart):
    """The module at `site` (a Linear, LayerNorm or Conv) uses `value` as its bias instead of the base's."""

    order: ClassVar[int] = 0
    site: str
    value: torch.Tensor

    @classmethod
    def stack(cls, parts: list["Bias"], module: nn.Module, ref: torch.Tensor) -> Apply:
        base = getattr(module, "bias", None)
        if not isinstance(module, (nn.Linear, nn.LayerNorm, nn.Conv2d)) or base is None:
            name = type(module).__name__
            raise ConfigError(f"cannot serve a bias of {parts[0].site} ({name}): not a Linear, LayerNorm or Conv2d")
        channels_first = isinstance(module, nn.Conv2d) or type(module).__name__.endswith("2d")  # timm's LayerNorm2d
        base = base.detach()
        values = stack_rows(parts, "value", tuple(base.shape), ref, slot0=base)  # (S, C), slot 0: the base's

        def apply(slots: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            d = values[slots] - base  # (b, C): each sample's bias in place of the one the op added
            view, axis = _per_channel(out, slots.numel(), d.shape[1], channels_first)
            return (view + d.unsqueeze(axis)).view(out.shape)

        return apply


@dataclass
class Affine(SitePart):
    """The module at `site` gets `out = out * scale + shift` per channel (last dim, or dim 1)."""

    order: ClassVar[int] = 2
    site: str
    scale: torch.Tensor  # (C,)
    shift: torch.Tensor  # (C,)
    channels_first: bool = False

    def key(self) -> tuple:
        return (*super().key(), self.channels_first)

    @classmethod
    def stack(cls, parts: list["Affine"], module: nn.Module, ref: torch.Tensor) -> Apply:
        c, channels_first = parts[0].scale.shape[0], parts[0].channels_first
        scale = stack_rows(parts, "scale", (c,), ref, slot0=1.0)  # (S, C); slot 0 is the identity (1, 0)
        shift = stack_rows(parts, "shift", (c,), ref)

        def apply(slots: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            view, axis = _per_channel(out, slots.numel(), c, channels_first)
            return torch.addcmul(shift[slots].unsqueeze(axis), view, scale[slots].unsqueeze(axis)).view(out.shape)

        return apply


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

    route: ClassVar[str] = "prompts"
    group: tuple
    module: Any  # a RoutedPrompts

    @staticmethod
    def stack(parts: list["Prompts"]) -> RoutedPrompts:
        """One module serving every part's prompts (parts of one group), row i for parts[i]."""
        return type(parts[0].module).stacked([p.module for p in parts])


@dataclass
class OwnModel:
    """The adapter changed every weight: its samples run through `model`, not the shared backbone."""

    route: ClassVar[str] = "own"
    model: nn.Module


Part = LowRank | Bottleneck | Bias | Affine | Prompts | OwnModel
