"""FacT-TT (Jie & Deng, AAAI 2023): the weight updates of all blocks as one tensor-train factorisation.

Every targeted d x d piece of every block's weights gets the update `s * V @ core @ U` with U (r, d)
and V (d, r) shared by all blocks of that width, and a small core (r, r) of its own. timm's fused qkv
is three d x d pieces (q, k, v), proj one, fc1 (h x d) and fc2 (d x h) h / d pieces each. So a
Linear split into k_out x k_in pieces has the core (k_out * r, k_in * r) and

    dW = s * blockdiag(V, .., V) @ core @ blockdiag(U, .., U)        # (k_out * d, k_in * d)

which is LoRA-shaped (a rank k_out * r update), computed without forming dW, merged exactly, and
served batched like LoRA. The cost is 2 d r shared + 12 r^2 per ViT block: a fifth of LoRA r=8 on
ViT-B. Swin stages of different widths each get their own U and V. V starts at zero (identity at
init), U and the cores as nn.Linear weights (FacT's init). Dropout acts on the cores' output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.backbone import Backbone, BlockInfo
from ..errors import UnsupportedModelError
from ._parts import LowRank, Part
from ._linears import linear_sites, parse_targets
from ._registry import Method, PeftModule, register_method



@dataclass
class FacTConfig:
    r: int = 8  # rank of the shared factors: FacT-TT's VTAB-1k setting for ViT-B/16
    scale: float = 1.0  # s, the update's scale (FacT searches it per task over 0.01 ... 100)
    dropout: float = 0.1  # on the cores' output, as FacT
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")  # FacT's: attention and MLP

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        if int(self.r) != self.r or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class SharedFactors(PeftModule):
    """U (r, d) and V (d, r), shared by every block of width d."""

    def __init__(self, width: int, r: int, ref: torch.Tensor) -> None:
        super().__init__()
        factory = dict(device=ref.device, dtype=ref.dtype)
        self.u = nn.Parameter(torch.empty(r, width, **factory))
        self.v = nn.Parameter(torch.zeros(width, r, **factory))  # zero: the model starts unchanged
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))


class FacTLinear(PeftModule):
    """A Linear of k_out x k_in pieces of width d plus `s * blockdiag(V) @ core @ blockdiag(U)`."""

    def __init__(self, base_layer: nn.Linear, factors: SharedFactors, config: FacTConfig) -> None:
        super().__init__()
        r, d = factors.u.shape
        if base_layer.in_features % d or base_layer.out_features % d:
            raise UnsupportedModelError(
                f"a {base_layer.in_features} -> {base_layer.out_features} Linear is not made of {d} x {d} pieces; "
                f"choose fact targets without it"
            )
        self.base_layer = base_layer
        self._factors = [factors]  # shared, owned by the model's `fact` module: not registered here
        self.k_in, self.k_out = base_layer.in_features // d, base_layer.out_features // d
        self.core = nn.Parameter(torch.empty(self.k_out * r, self.k_in * r, device=factors.u.device, dtype=factors.u.dtype))
        nn.init.kaiming_uniform_(self.core, a=math.sqrt(5))
        self.scale = float(config.scale)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def factors(self) -> SharedFactors:
        return self._factors[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., k_out * d)
        u, v = self.factors.u, self.factors.v
        lead = x.shape[:-1]
        z = F.linear(x.reshape(*lead, self.k_in, -1), u).flatten(-2)  # (..., k_in * r): U on each piece
        z = self.dropout(F.linear(z, self.core))  # (..., k_out * r)
        delta = F.linear(z.unflatten(-1, (self.k_out, -1)), v).flatten(-2)  # (..., k_out * d): V on each piece
        return out + self.scale * delta.to(out.dtype)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with dW = b @ a: a = core @ blockdiag(U) (k_out*r, in), b = s * blockdiag(V) (out, k_out*r)."""
        u, v = self.factors.u, self.factors.v
        a = self.core @ torch.block_diag(*[u] * self.k_in)
        return a, self.scale * torch.block_diag(*[v] * self.k_out)


def _sites(model: nn.Module, backbone: Backbone, config: FacTConfig) -> list[tuple[BlockInfo, str, nn.Linear]]:
    return linear_sites(model, backbone, config.targets)


@register_method
class FacT(Method):
    name = "fact"
    config_cls = FacTConfig
    default_lr = 3e-3  # V starts at 0, as LoRA's B
    embedded_lr = 1e-2  # on the embedded 32-px backbones (benchmarks/default-lr.md)
    silent_at_init = (".u", ".core")  # before V = 0
    examples = (dict(r=4, targets=("qkv", "fc2"), dropout=0.0),)

    def expected_params(self, model: nn.Module, backbone: Backbone, config: FacTConfig) -> int:
        """2 d r per distinct block width d, plus r^2 per d x d piece of every targeted Linear."""
        r = int(config.r)
        widths = {b.dim for b in backbone.blocks}
        pieces = sum((m.out_features // b.dim) * (m.in_features // b.dim) for b, _, m in _sites(model, backbone, config))
        return sum(2 * d * r for d in widths) + pieces * r * r

    def inject(self, model: nn.Module, backbone: Backbone, config: FacTConfig) -> None:
        ref = next(model.parameters())
        shared = nn.ModuleDict({str(d): SharedFactors(d, int(config.r), ref) for d in sorted({b.dim for b in backbone.blocks})})
        for block, child, linear in _sites(model, backbone, config):
            model.set_submodule(f"{block.name}.{child}", FacTLinear(linear, shared[str(block.dim)], config))
        model.fact = shared

    def mergeable(self, config: FacTConfig) -> str | None:
        return None

    @torch.no_grad()
    def merge(self, model: nn.Module, backbone: Backbone, config: FacTConfig) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, FacTLinear):
                a, b = module.low_rank()
                module.base_layer.weight += b @ a
                model.set_submodule(name, module.base_layer)
        del model.fact

    def serve_parts(self, model: nn.Module, backbone: Backbone, config: FacTConfig) -> list[Part]:
        parts: list[Part] = []
        for name, m in model.named_modules():
            if isinstance(m, FacTLinear):
                a, b = m.low_rank()
                parts.append(LowRank(name, a.detach(), b.detach()))
        return parts
