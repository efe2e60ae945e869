"""LoRA (Hu et al., 2021) on the q, k, v slices of timm's fused `attn.qkv`, and optionally on proj/fc1/fc2.

timm computes q, k and v with one Linear (rows ordered q, k, v). A LoRA on the q and v slices only
is a LoRA of rank r x (number of slices) on the whole qkv whose B is block-structured: B's rows of an
untargeted slice are zero. We keep the factors compact -- A stacks the slices' A's, B holds one
(width, r) block per slice -- and compute all slices with one matmul for A and one fused
multiply-add into the frozen layer's output for B, so no delta-W is ever materialised while training.
The target `qkv` is HF PEFT's variant: one rank-r LoRA over the whole fused layer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.backbone import Backbone, BlockInfo
from ..errors import ConfigError
from ._parts import LowRank, Part
from ._registry import Method, PeftModule, register_method

QKV_SLICES = ("q", "k", "v")
# targets that are a whole Linear; "qkv" is HF PEFT's choice: one rank-r LoRA over the fused layer
EXTRA_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


@dataclass
class LoRAConfig:
    r: int = 8  # rank; 8 is the setting of the VTAB-1k results in the PETL literature
    alpha: float = 8.0  # the update is scaled by alpha / r, so alpha = r means scale 1
    dropout: float = 0.0  # dropout on the LoRA branch's input only
    # subset of q, k, v (slices of attn.qkv), qkv (all of it), proj, fc1, fc2. q, k, v: it beat Hu et al.'s
    # q, v by 1.3 points on the real ViT-Tiny and photos, by 1.5 on the embedded digits (3 seeds; RESULTS.md)
    targets: tuple[str, ...] = ("q", "k", "v")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in QKV_SLICES and t not in EXTRA_TARGETS]
        if "qkv" in self.targets and set(self.targets) & set(QKV_SLICES):
            raise ValueError("target qkv (one LoRA over the fused layer) excludes q, k, v (one per slice)")
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"targets must be distinct names among {', '.join(QKV_SLICES + tuple(EXTRA_TARGETS))}; got {self.targets}"
            )
        if int(self.r) != self.r or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class LoRALinear(PeftModule):
    """A Linear plus a low-rank update on some of its equal-width output slices.

    `slices` index the output rows in blocks of `out_features // num_slices` (3 slices for a fused qkv,
    1 for a plain Linear). The original layer is kept as `base_layer`, as in HF PEFT.
    """

    def __init__(
        self, base_layer: nn.Linear, slices: Sequence[int], num_slices: int, r: int, alpha: float, dropout: float
    ) -> None:
        super().__init__()
        if base_layer.out_features % num_slices:
            raise ConfigError(f"cannot split {base_layer.out_features} outputs into {num_slices} slices")
        self.base_layer = base_layer
        self.slices = tuple(slices)
        self.num_slices = num_slices
        self.width = base_layer.out_features // num_slices
        self.r = r
        self.scaling = alpha / r
        t = len(self.slices)
        factory = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(t * r, base_layer.in_features, **factory))  # (T*r, in)
        self.lora_B = nn.Parameter(torch.zeros(t, self.width, r, **factory))  # (T, width, r): B = 0 at init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and HF PEFT
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    # Some timm attentions (BEiT, EVA, SwinV2) call F.linear(x, qkv.weight, own_bias) instead of qkv(x).
    # Exposing the effective weight keeps LoRA correct there too (at the cost of forming delta-W).
    @property
    def weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w if self.merged else w + self.delta_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def block_b(self) -> torch.Tensor:
        """B as one (out, T*r) matrix: slice s's rows hold its own (width, r) block, untargeted rows are 0."""
        t, w, r = self.lora_B.shape
        if t == self.num_slices:
            return self.lora_B[0] if t == 1 else torch.block_diag(*self.lora_B.unbind(0))
        full = self.lora_B.new_zeros(self.num_slices, w, t, r)
        for i, s in enumerate(self.slices):
            full[s, :, i, :] = self.lora_B[i]
        return full.view(self.num_slices * w, t * r)

    def low_rank_parts(self, name: str) -> list[LowRank]:
        """One serving part per targeted slice: its rows of B, its rows of A, scaling folded in."""
        return [
            LowRank(name, self.lora_A[i * self.r : (i + 1) * self.r].detach(), self.lora_B[i].detach() * self.scaling, s * self.width)
            for i, s in enumerate(self.slices)
        ]

    def delta_weight(self) -> torch.Tensor:
        """The dense update (out, in) that `merge` adds: scaling * B @ A."""
        return (self.block_b() @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        # (tokens, out), fresh and 2-D: updated in place below as a whole tensor, not through a view, since
        # autograd copies the whole gradient of a view's base in backward (~10% of the layer's time)
        out = self.base_layer(x)
        z = F.linear(self.lora_dropout(x), self.lora_A).to(out.dtype)  # (tokens, T*r): one matmul for all slices
        # out += scaling * z @ B^T in one fused kernel, without forming delta-W or a (tokens, out) temporary.
        # B^T is made row-major so that autograd computes its gradient as z^T @ grad; for the transposed
        # view it would compute (grad^T @ z)^T, which CPU BLAS runs ~10x slower at T*r = 8.
        out.addmm_(z, self.block_b().to(out.dtype).t().contiguous(), alpha=self.scaling)
        return out.view(*lead, out.shape[-1])

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        names = [QKV_SLICES[s] for s in self.slices] if self.num_slices == 3 else ["all"]
        return f"r={self.r}, scaling={self.scaling:g}, slices={names}"


def _lora_sites(backbone: Backbone, config: LoRAConfig) -> list[tuple[BlockInfo, str, list[int], int]]:
    """(block, child path, slice indices, number of slices) for every layer LoRA goes on."""
    qkv = [QKV_SLICES.index(t) for t in QKV_SLICES if t in config.targets]  # keep q, k, v order
    sites = []
    for block in backbone.blocks:
        if qkv:
            sites.append((block, "attn.qkv", qkv, 3))
        sites += [(block, EXTRA_TARGETS[t], [0], 1) for t in config.targets if t in EXTRA_TARGETS]
    return sites


@register_method
class LoRA(Method):
    name = "lora"
    config_cls = LoRAConfig
    default_lr = 3e-3  # B starts at 0 and alpha / r = 1: the update grows only as fast as lr lets it (benchmarks/default-lr.md)
    embedded_lr = 1e-2  # on the embedded 32-px backbones (benchmarks/default-lr.md)
    silent_at_init = ("lora_A",)
    layer_cls: type[LoRALinear] = LoRALinear  # the wrapper inject puts on each targeted layer (DoRA's subclasses it)
    examples = (
        dict(r=4, targets=("q", "k", "v", "proj", "fc1", "fc2")),
        dict(r=2, targets=("k",)),
        dict(targets=("qkv", "fc2")),
    )

    def expected_params(self, model: nn.Module, backbone: Backbone, config: LoRAConfig) -> int:
        """Per block of width d and MLP width h: r * (in + out) per targeted layer, a q/k/v slice being d -> d."""
        r, targets, total = int(config.r), config.targets, 0
        for block in backbone.blocks:
            d, h = block.dim, backbone.linear(model, block, "mlp.fc1").out_features
            shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, h), "fc2": (h, d)}
            total += sum(r * sum(shapes[t]) for t in targets)
        return total

    def inject(self, model: nn.Module, backbone: Backbone, config: LoRAConfig) -> None:
        for block, child, slices, num_slices in _lora_sites(backbone, config):
            base = backbone.linear(model, block, child)
            wrapped = self.layer_cls(base, slices, num_slices, int(config.r), config.alpha, config.dropout)
            model.set_submodule(f"{block.name}.{child}", wrapped)

    def mergeable(self, config: LoRAConfig) -> str | None:
        return None

    def exportable(self, config: LoRAConfig) -> str | None:
        return None

    def merge(self, model: nn.Module, backbone: Backbone, config: LoRAConfig) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear):
                module.merge()
                model.set_submodule(name, module.base_layer)

    def serve_parts(self, model: nn.Module, backbone: Backbone, config: LoRAConfig) -> list[Part]:
        return [p for name, m in model.named_modules() if isinstance(m, LoRALinear) for p in m.low_rank_parts(name)]

    def to_peft(self, model: nn.Module, backbone: Backbone, config: LoRAConfig) -> tuple[Any, dict[str, torch.Tensor]]:
        """A LoRA on T slices of a Linear is a rank r*T LoRA on the whole Linear with block-structured B.

        HF PEFT scales by lora_alpha / rank, so a rank-r*T module gets alpha*T to keep our alpha / r.
        """
        from peft import LoraConfig

        tensors: dict[str, torch.Tensor] = {}
        rank_pattern: dict[str, int] = {}
        alpha_pattern: dict[str, float] = {}
        for name, m in model.named_modules():
            if not isinstance(m, LoRALinear):
                continue
            t, _, r = m.lora_B.shape
            tensors[f"{name}.lora_A.weight"] = m.lora_A.detach()
            tensors[f"{name}.lora_B.weight"] = m.block_b().detach()  # (out, T*r)
            if t != 1:
                rank_pattern[re.escape(name)] = r * t
                alpha_pattern[re.escape(name)] = config.alpha * t
        names = "|".join(re.escape(n.rsplit(".lora_A", 1)[0]) for n in tensors if n.endswith("lora_A.weight"))
        peft_config = LoraConfig(
            r=int(config.r),
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=rf"^(?:{names})$",
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            bias="none",
            task_type=None,
        )
        return peft_config, tensors
