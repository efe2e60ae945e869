"""LoRA (Hu et al., 2021) on the q, k, v slices of timm's fused `attn.qkv`, and optionally on proj/fc1/fc2.

timm computes q, k and v with one Linear (rows ordered q, k, v). A LoRA on the q and v slices only
is a LoRA of rank r x (number of slices) on the whole qkv whose B is block-structured: B's rows of an
untargeted slice are zero. We keep the factors compact -- A stacks the slices' A's, B holds one
(width, r) block per slice -- and compute all slices with one matmul for A and one fused
multiply-add into the frozen layer's output for B, so no delta-W is ever materialised while training.
The target `qkv` is HF PEFT's variant: one rank-r LoRA over the whole fused layer.

Options from the LoRA literature, each also in HF PEFT:
- `use_rslora` (Kalajdzievski 2023, rank-stabilised LoRA): scale by alpha / sqrt(r) instead of alpha / r,
  so a larger rank is not silently a smaller update.
- `lr_ratio` (LoRA+, Hayou et al. 2024): B learns `lr_ratio` times faster than A (through
  `Method.lr_multipliers`, which the trainer's optimizer applies on top of layer decay); 1 is plain LoRA.
- `init="pissa"` (Meng et al. 2024): A, B start as the principal r singular directions of each targeted
  weight (slice), `scaling * B0 A0 = U_r S_r V_r^T`, and the residual `W - scaling * B0 A0` is frozen.
  We never rewrite the base weight: the update is `scaling * (B A - B0 A0)`, computed as
  `(B - B0) A + B0 (A - A0)` (exactly zero at init, so the model starts exactly as the base), with A0,
  B0 kept as persistent buffers (saved with the adapter, so a reload never depends on recomputing an
  SVD). That is a rank-2r LoRA over the *original* weights, which is how merge, serving and the HF PEFT
  export see it -- PEFT's own `init_lora_weights="pissa"` rewrites the base to the residual instead,
  and converts to this same rank-2r form to share an adapter (`convert_pissa_to_lora`): our export
  loads onto the unmodified pretrained timm model.
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
from ._linears import LINEARS
from ._registry import Method, PeftModule, register_method

QKV_SLICES = ("q", "k", "v")
# targets that are a whole Linear; "qkv" is HF PEFT's choice: one rank-r LoRA over the fused layer
EXTRA_TARGETS = LINEARS


@dataclass
class LoRAConfig:
    r: int = 8  # rank; 8 is the setting of the VTAB-1k results in the PETL literature
    alpha: float = 8.0  # the update is scaled by alpha / r, so alpha = r means scale 1
    dropout: float = 0.0  # dropout on the LoRA branch's input only
    # subset of q, k, v (slices of attn.qkv), qkv (all of it), proj, fc1, fc2. q, k, v: it beat Hu et al.'s
    # q, v by 1.3 points on the real ViT-Tiny and photos, by 1.5 on the embedded digits (3 seeds; RESULTS.md)
    targets: tuple[str, ...] = ("q", "k", "v")
    use_rslora: bool = False  # scale alpha / sqrt(r) (rsLoRA) instead of alpha / r; off: the literature's VTAB setting
    lr_ratio: float = 1.0  # LoRA+: B's lr = lr x lr_ratio (the LoRA+ paper suggests 16); 1 is plain LoRA
    init: str = "default"  # default (A Kaiming, B = 0) | pissa (principal singular directions, residual frozen)

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
        if not self.lr_ratio > 0:
            raise ValueError(f"lr_ratio must be positive, got {self.lr_ratio}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


INITS = ("default", "pissa")


class LoRALinear(PeftModule):
    """A Linear plus a low-rank update on some of its equal-width output slices.

    `slices` index the output rows in blocks of `out_features // num_slices` (3 slices for a fused qkv,
    1 for a plain Linear). The original layer is kept as `base_layer`, as in HF PEFT.
    """

    def __init__(
        self, base_layer: nn.Linear, slices: Sequence[int], num_slices: int, r: int, alpha: float, dropout: float,
        rslora: bool = False, init: str = "default",
    ) -> None:
        super().__init__()
        if base_layer.out_features % num_slices:
            raise ConfigError(f"cannot split {base_layer.out_features} outputs into {num_slices} slices")
        self.base_layer = base_layer
        self.slices = tuple(slices)
        self.num_slices = num_slices
        self.width = base_layer.out_features // num_slices
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        t = len(self.slices)
        factory = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(t * r, base_layer.in_features, **factory))  # (T*r, in)
        self.lora_B = nn.Parameter(torch.zeros(t, self.width, r, **factory))  # (T, width, r): B = 0 at init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and HF PEFT
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.register_buffer("lora_A0", None)  # PiSSA's initial factors (None otherwise: nothing is saved)
        self.register_buffer("lora_B0", None)
        if init == "pissa":
            self._pissa_init()

    @torch.no_grad()
    def _pissa_init(self) -> None:
        """A, B = the principal r singular directions of each targeted slice's weight, split as PEFT does
        (sqrt of the singular values on each side, the scaling divided out), kept as A0, B0 too."""
        t, w, r = self.lora_B.shape
        weight = self.base_layer.weight.float()
        a0, b0 = torch.empty_like(self.lora_A, dtype=torch.float32), torch.empty_like(self.lora_B, dtype=torch.float32)
        for i, s in enumerate(self.slices):
            u, sv, vh = torch.linalg.svd(weight[s * w : (s + 1) * w], full_matrices=False)  # (w, k) (k,) (k, in)
            root = (sv[:r] / self.scaling).sqrt()
            a0[i * r : (i + 1) * r] = root[:, None] * vh[:r]  # (r, in)
            b0[i] = u[:, :r] * root  # (w, r)
        self.lora_A.copy_(a0)
        self.lora_B.copy_(b0)
        self.register_buffer("lora_A0", a0.to(self.lora_A.dtype))  # persistent: the adapter file carries it
        self.register_buffer("lora_B0", b0.to(self.lora_B.dtype))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (T*R, in), B (T, width, R)) of the update `scaling * block_b(B) @ A`: the trained factors (R = r),
        or with PiSSA the rank-2r pair [A; A - A0], [B - B0, B0] per slice, which is B A - B0 A0."""
        if self.lora_A0 is None:
            return self.lora_A, self.lora_B
        t, _, r = self.lora_B.shape
        a = torch.stack([self.lora_A.view(t, r, -1), (self.lora_A - self.lora_A0).view(t, r, -1)], 1)
        return a.reshape(2 * t * r, -1), torch.cat([self.lora_B - self.lora_B0, self.lora_B0], -1)

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

    def block_b(self, b: torch.Tensor | None = None) -> torch.Tensor:
        """B (default: `lora_B`; any (T, width, R)) as one (out, T*R) matrix: slice s's rows hold its own
        (width, R) block, untargeted rows are 0."""
        b = self.lora_B if b is None else b
        t, w, r = b.shape
        if t == self.num_slices:
            return b[0] if t == 1 else torch.block_diag(*b.unbind(0))
        full = b.new_zeros(self.num_slices, w, t, r)
        for i, s in enumerate(self.slices):
            full[s, :, i, :] = b[i]
        return full.view(self.num_slices * w, t * r)

    def low_rank_parts(self, name: str) -> list[LowRank]:
        """One serving part per targeted slice: its rows of B, its rows of A, scaling folded in."""
        a, b = self.factors()
        rank = b.shape[-1]
        return [
            LowRank(name, a[i * rank : (i + 1) * rank].detach(), b[i].detach() * self.scaling, s * self.width)
            for i, s in enumerate(self.slices)
        ]

    def delta_weight(self) -> torch.Tensor:
        """The dense update (out, in) that `merge` adds: scaling * B @ A."""
        a, b = self.factors()
        return (self.block_b(b) @ a) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        # (tokens, out), fresh and 2-D: updated in place below as a whole tensor, not through a view, since
        # autograd copies the whole gradient of a view's base in backward (~10% of the layer's time)
        out = self.base_layer(x)
        a, b = self.factors()
        z = F.linear(self.lora_dropout(x), a).to(out.dtype)  # (tokens, T*r): one matmul for all slices
        # out += scaling * z @ B^T in one fused kernel, without forming delta-W or a (tokens, out) temporary.
        # B^T is made row-major so that autograd computes its gradient as z^T @ grad; for the transposed
        # view it would compute (grad^T @ z)^T, which CPU BLAS runs ~10x slower at T*r = 8.
        out.addmm_(z, self.block_b(b).to(out.dtype).t().contiguous(), alpha=self.scaling)
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
    # the probe's head learns at lr x 0.1 (real photos, benchmarks/RESULTS.md, 3 seeds: 91.5 mean over 7
    # regimes vs 91.3 with the head kept and 90.8 at 1, at or above 1 in every regime)
    probe_head_lr_ratio = 0.1
    layer_cls: type[LoRALinear] = LoRALinear  # the wrapper inject puts on each targeted layer (DoRA's subclasses it)
    examples = (
        dict(r=4, targets=("q", "k", "v", "proj", "fc1", "fc2")),
        dict(r=2, targets=("k",)),
        dict(targets=("qkv", "fc2")),
        dict(r=4, targets=("q", "v", "fc1"), init="pissa", use_rslora=True, lr_ratio=16.0),
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
            wrapped = self.layer_cls(base, slices, num_slices, int(config.r), config.alpha, config.dropout,
                                     rslora=config.use_rslora, init=config.init)
            model.set_submodule(f"{block.name}.{child}", wrapped)

    def lr_multipliers(self, model: nn.Module, backbone: Backbone, config: LoRAConfig) -> dict[str, float]:
        """LoRA+: every B at lr x lr_ratio (A, and the head, at the run's lr)."""
        if config.lr_ratio == 1:
            return {}
        return {f"{name}.lora_B": float(config.lr_ratio) for name, m in model.named_modules() if isinstance(m, LoRALinear)}

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
        """A LoRA on T slices of a Linear is a rank r*T LoRA on the whole Linear with block-structured B
        (PiSSA: rank 2r*T, the pair of `LoRALinear.factors`, over the original base weights).

        HF PEFT scales by lora_alpha / rank (rsLoRA: / sqrt(rank)), so a module of another rank than r gets
        the alpha that keeps our scaling.
        """
        from peft import LoraConfig

        tensors: dict[str, torch.Tensor] = {}
        rank_pattern: dict[str, int] = {}
        alpha_pattern: dict[str, float] = {}
        for name, m in model.named_modules():
            if not isinstance(m, LoRALinear):
                continue
            a, b = m.factors()
            rank = a.shape[0]  # T*r, or 2*T*r with PiSSA
            tensors[f"{name}.lora_A.weight"] = a.detach()
            tensors[f"{name}.lora_B.weight"] = m.block_b(b).detach()  # (out, rank)
            if rank != config.r:
                rank_pattern[re.escape(name)] = rank
                alpha_pattern[re.escape(name)] = m.scaling * (math.sqrt(rank) if config.use_rslora else rank)
        names = "|".join(re.escape(n.rsplit(".lora_A", 1)[0]) for n in tensors if n.endswith("lora_A.weight"))
        peft_config = LoraConfig(
            r=int(config.r),
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=rf"^(?:{names})$",
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            use_rslora=bool(config.use_rslora),
            bias="none",
            task_type=None,
        )
        return peft_config, tensors
