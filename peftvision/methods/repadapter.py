"""RepAdapter (Luo et al., 2023): a linear adapter before a Linear, re-parameterised into it.

The adapter is activation-free: `x + s * up(dropout(down(x)))`, down a dense d -> m projection, up a
grouped m -> d projection (`groups` blocks, as the paper's grouped 1x1 convolution), both with bias,
up zero-initialised (the model starts exactly as the base). It sits on the input of each chosen Linear
-- by default `attn.qkv` and `mlp.fc1`, i.e. after the block's two LayerNorms, the paper's "RepBlock"
placement -- so, being affine, it folds into that Linear exactly:

    W' = W (I + s U D),    b' = b + s W (U d + u)        (D, d: down; U, u: up, U block-diagonal)

and the merged model is plain timm with no extra cost at inference. In training the adapter costs one
d x m and one grouped m x d matmul per site. Attentions that apply `qkv.weight` with their own q / v
biases (BEiT, EVA, SwinV2) have no bias to fold into and skip the wrapper's forward: refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.backbone import Backbone, BlockInfo
from ..errors import UnsupportedModelError
from ._parts import Bias, LowRank, Part
from ._linears import LINEARS, parse_targets
from ._registry import Method, PeftModule, register_method



@dataclass
class RepAdapterConfig:
    dim: int = 8  # hidden width m: the paper's VTAB-1k setting
    groups: int = 2  # blocks of the grouped up-projection: the paper's default
    scale: float = 1.0  # s; the paper tunes it per task over {0.1, 1, 10, 100}: 1 is its default
    dropout: float = 0.1  # between down and up, as the paper
    targets: tuple[str, ...] = ("qkv", "fc1")  # the Linears it precedes: before attention and MLP (RepBlock)

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        for name in ("dim", "groups"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.dim % self.groups:
            raise ValueError(f"dim ({self.dim}) must be a multiple of groups ({self.groups})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class RepAdapterLinear(PeftModule):
    """`base_layer(x + s * up(dropout(down(x))))`: a grouped linear adapter on the Linear's input."""

    def __init__(self, base_layer: nn.Linear, config: RepAdapterConfig) -> None:
        super().__init__()
        d, m, g = base_layer.in_features, int(config.dim), int(config.groups)
        if d % g:
            raise UnsupportedModelError(f"rep-adapter: a {d}-wide input does not split into {g} groups; choose other groups")
        factory = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.base_layer = base_layer
        self.groups, self.scale = g, float(config.scale)
        self.adapter_down = nn.Linear(d, m, **factory)
        nn.init.xavier_uniform_(self.adapter_down.weight)  # the paper's init
        nn.init.zeros_(self.adapter_down.bias)
        self.adapter_up = nn.Parameter(torch.zeros(g, d // g, m // g, **factory))  # (groups, d/g, m/g): 0 at init
        self.adapter_up_bias = nn.Parameter(torch.zeros(d, **factory))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def up_dense(self) -> torch.Tensor:
        """The grouped up-projection as one block-diagonal (d, m) matrix."""
        return torch.block_diag(*self.adapter_up.unbind(0))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """The Linear's new input: x + s * up(dropout(down(x)))."""
        z = self.dropout(self.adapter_down(x))  # (..., m)
        z = z.unflatten(-1, (self.groups, -1))  # (..., g, m/g)
        up = torch.einsum("...gi,goi->...go", z, self.adapter_up).flatten(-2) + self.adapter_up_bias  # (..., d)
        return x + self.scale * up.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(self.adapt(x))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, c) with adapt(x) = x @ M.T + c in eval mode: M = I + s U D (d, d), c = s (U d + u) (d,)."""
        up = self.up_dense()
        eye = torch.eye(up.shape[0], device=up.device, dtype=up.dtype)
        return eye + self.scale * up @ self.adapter_down.weight, self.scale * (up @ self.adapter_down.bias + self.adapter_up_bias)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """The wrapped Linear with the adapter folded in: W <- W M, b <- W c + b."""
        base = self.base_layer
        m, c = self.folded()
        base.bias.add_(base.weight @ c)  # with the old W
        base.weight.copy_(base.weight @ m)
        return base


def _sites(model: nn.Module, backbone: Backbone, config: RepAdapterConfig) -> list[tuple[BlockInfo, str, nn.Linear]]:
    sites = []
    for block in backbone.blocks:
        attn = backbone.block_module(model, block, "attn")
        for t in config.targets:
            linear = backbone.linear(model, block, LINEARS[t])
            if linear.bias is None or (t == "qkv" and getattr(attn, "q_bias", None) is not None):
                raise UnsupportedModelError(
                    f"{backbone.architecture}: `{block.name}.{LINEARS[t]}` has no bias of its own to fold "
                    f"rep-adapter into (its attention adds q/v biases itself); choose targets without {t}"
                )
            sites.append((block, LINEARS[t], linear))
    return sites


@register_method
class RepAdapter(Method):
    name = "rep-adapter"
    config_cls = RepAdapterConfig
    # By analogy, not measured on a real backbone: the up-projection starts at zero, as LoRA's B and the
    # adapter's, which take 3e-3 there (RESULTS.md, real backbone)
    default_lr = 3e-3
    embedded_lr = 3e-3  # embedded backbone: 72.25 at 3e-3, 70.75 at 1e-2, collapses at 3e-2 (benchmarks/default-lr.md)
    silent_at_init = ("adapter_down",)  # before the zero up-projection
    examples = (dict(dim=4, groups=4, scale=10.0, dropout=0.0, targets=("qkv", "proj", "fc1", "fc2")),)

    def expected_params(self, model: nn.Module, backbone: Backbone, config: RepAdapterConfig) -> int:
        """Per site of input width d: down d*m + m, grouped up d*m/g + d."""
        m, g = int(config.dim), int(config.groups)
        return sum(d * m + m + d * m // g + d for d in (lin.in_features for _, _, lin in _sites(model, backbone, config)))

    def inject(self, model: nn.Module, backbone: Backbone, config: RepAdapterConfig) -> None:
        for block, child, linear in _sites(model, backbone, config):
            model.set_submodule(f"{block.name}.{child}", RepAdapterLinear(linear, config))

    def mergeable(self, config: RepAdapterConfig) -> str | None:
        return None

    def merge(self, model: nn.Module, backbone: Backbone, config: RepAdapterConfig) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, RepAdapterLinear):
                model.set_submodule(name, module.fold())

    def serve_parts(self, model: nn.Module, backbone: Backbone, config: RepAdapterConfig) -> list[Part]:
        """W (x + s U (D x + d) + s u) + b = W x + [s W U] [D] x + (b + W c): a rank-m update of the
        Linear and a new bias, both generic parts."""
        parts: list[Part] = []
        for name, m in model.named_modules():
            if isinstance(m, RepAdapterLinear):
                with torch.no_grad():
                    w = m.base_layer.weight
                    _, c = m.folded()
                    parts += [
                        LowRank(name, m.adapter_down.weight.detach().clone(), m.scale * w @ m.up_dense()),
                        Bias(name, m.base_layer.bias + F.linear(c, w)),
                    ]
        return parts
