"""OFT (Qiu et al., NeurIPS 2023): a block-diagonal orthogonal transform of each frozen weight.

Each targeted Linear computes `W R^T x + b` with R = blockdiag(R_1, ..., R_n) over its input features,
every block b x b orthogonal through the Cayley transform of a skew-symmetric Q_i:
`R_i = (I - Q_i)(I + Q_i)^-1` (exact, a batched solve; PEFT's default Neumann series only
approximates it). Q_i's b(b-1)/2 free entries are the parameters, zero at init (R = I: the model
starts exactly as the base). Rotating the input side of W keeps the angles between its rows -- the
"hyperspherical energy" OFT preserves -- and applying R to x before the frozen Linear is what HF PEFT
does, so the export to PEFT's OFT format (`oft_block_size`, `use_cayley_neumann=False`) gives the
same outputs. Merges exactly: W <- W R^T.

A block size that does not divide a layer's input width becomes the nearest one that does, with
PEFT's own rule (`OFTLayer.adjust_oft_parameters`), so a Swin stage of width 24 with b = 16 gets
blocks of 12 in both libraries. OFT's constrained variant (COFT) and BOFT's butterfly factorisation
are not implemented.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..backbones.backbone import Backbone, BlockInfo
from ._linears import linear_sites, parse_targets
from ._registry import Method, PeftModule, register_method



@dataclass
class OFTConfig:
    # b: 16 on all four Linears of a block is ~0.48M parameters on ViT-B/16, about LoRA r=8 on q, k, v
    # (0.44M); PEFT's default is 32 (twice the parameters, each block freer)
    block_size: int = 16
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")  # every Linear of the block

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        if int(self.block_size) != self.block_size or self.block_size < 2:
            raise ValueError(f"block_size must be an integer of at least 2, got {self.block_size}")


def block_size_for(width: int, size: int) -> int:
    """The block size used on a `width`-wide input: `size` if it divides it, else the nearest divisor
    (ties to the smaller), exactly as HF PEFT adjusts it -- so both libraries build the same blocks."""
    if size >= width:
        return width
    higher = size
    while higher <= width and width % higher:
        higher += 1
    lower = size
    while lower > 1 and width % lower:
        lower -= 1
    return lower if size - lower <= higher - size else higher


class OFTLinear(PeftModule):
    """`base_layer(x @ blockdiag(R))`, R orthogonal by Cayley: the frozen weight rotated on its input side."""

    def __init__(self, base_layer: nn.Linear, block_size: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        width = base_layer.in_features
        self.block_size = block_size_for(width, int(block_size))
        self.blocks = width // self.block_size
        b = self.block_size
        factory = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.oft_R = nn.Parameter(torch.zeros(self.blocks, b * (b - 1) // 2, **factory))  # Q's upper triangles
        rows, cols = torch.triu_indices(b, b, 1)
        self.register_buffer("rows", rows.to(factory["device"]), persistent=False)
        self.register_buffer("cols", cols.to(factory["device"]), persistent=False)
        self.merged = False

    def rotations(self) -> torch.Tensor:
        """(blocks, b, b) orthogonal: X (I + Q) = I - Q, as PEFT's exact Cayley solves it."""
        n, b = self.blocks, self.block_size
        q = self.oft_R.new_zeros(n, b, b)
        q[:, self.rows, self.cols] = self.oft_R
        q = q - q.transpose(-2, -1)  # skew-symmetric
        eye = torch.eye(b, device=q.device, dtype=q.dtype).expand(n, b, b)
        return torch.linalg.solve(eye + q, eye - q, left=False)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x @ blockdiag(R), block by block: (..., in) -> (..., in)."""
        r = self.rotations().to(x.dtype)
        return torch.einsum("...nk,nkc->...nc", x.unflatten(-1, (self.blocks, self.block_size)), r).flatten(-2)

    @property
    def weight(self) -> torch.Tensor:  # what attentions calling F.linear(x, qkv.weight, ...) must use: W R^T
        w = self.base_layer.weight
        return w if self.merged else (torch.block_diag(*self.rotations()) @ w.t()).t()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x if self.merged else self.rotate(x))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((torch.block_diag(*self.rotations()) @ w.t()).t())  # W R^T, in PEFT's order of products
            self.merged = True

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, block_size={self.block_size}"


def _sites(model: nn.Module, backbone: Backbone, config: OFTConfig) -> list[tuple[BlockInfo, str, nn.Linear]]:
    return linear_sites(model, backbone, config.targets)


@register_method
class OFT(Method):
    name = "oft"
    config_cls = OFTConfig
    # By analogy, not measured on a real backbone: Q starts at zero and enters the output linearly at
    # first (R ~ I - 2Q), like LoRA's B, so LoRA's 3e-3
    default_lr = 3e-3
    embedded_lr = 3e-3  # embedded backbone: 70.25 at 3e-3, 68.0 at 1e-2, collapses at 3e-2 (benchmarks/default-lr.md)
    examples = (dict(block_size=8, targets=("qkv", "fc2")), dict(block_size=5, targets=("proj",)))

    def expected_params(self, model: nn.Module, backbone: Backbone, config: OFTConfig) -> int:
        """Per targeted Linear of input width n and (adjusted) block size b: n / b blocks of b(b-1)/2."""
        total = 0
        for _, _, linear in _sites(model, backbone, config):
            n = linear.in_features
            b = block_size_for(n, int(config.block_size))
            total += (n // b) * b * (b - 1) // 2
        return total

    def inject(self, model: nn.Module, backbone: Backbone, config: OFTConfig) -> None:
        for block, child, linear in _sites(model, backbone, config):
            model.set_submodule(f"{block.name}.{child}", OFTLinear(linear, int(config.block_size)))

    def mergeable(self, config: OFTConfig) -> str | None:
        return None

    def exportable(self, config: OFTConfig) -> str | None:
        return None

    def merge(self, model: nn.Module, backbone: Backbone, config: OFTConfig) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, OFTLinear):
                module.merge()
                model.set_submodule(name, module.base_layer)

    def to_peft(self, model: nn.Module, backbone: Backbone, config: OFTConfig) -> tuple[Any, dict[str, torch.Tensor]]:
        """PEFT's OFT with the exact Cayley transform; each layer's `oft_R.weight` is our Q's triangles
        (PEFT adjusts an unfitting block size per layer as we do)."""
        from peft import OFTConfig as PeftOFTConfig

        tensors = {f"{name}.oft_R.weight": m.oft_R.detach() for name, m in model.named_modules() if isinstance(m, OFTLinear)}
        names = "|".join(re.escape(n.rsplit(".oft_R", 1)[0]) for n in tensors)
        peft_config = PeftOFTConfig(
            r=0, oft_block_size=int(config.block_size), target_modules=rf"^(?:{names})$", use_cayley_neumann=False,
            module_dropout=0.0, bias="none", task_type=None,
        )
        return peft_config, tensors
