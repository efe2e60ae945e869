"""VeRA (Kopiczko et al., ICLR 2024): one pair of frozen random matrices shared by every layer, and two
trainable scaling vectors per layer.

Each targeted Linear (in -> out) gets `out += lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ x)))`, with
A (r, max in) and B (max out, r) drawn once from a seed and shared by all targeted layers (each slices
out its shape), lambda_d (r,) starting at `d_initial` and lambda_b (out,) at zero (so the model starts
exactly as the base). A and B are never trained or saved: they are regenerated from `seed` exactly as
HF PEFT does (`VeraConfig.projection_prng_key`: a CPU generator, Kaiming-uniform, A then B, sized to
the largest targeted layer), so a VeRA adapter is a few KB.

On timm's fused `attn.qkv` we target q / k / v slices as LoRA does: the layer is one VeRA layer whose
lambda_b is trained on the targeted slices' rows only (zero on the others), which is exactly PEFT's
VeRA on the whole qkv with those rows of lambda_b at zero -- so the export to PEFT's format is exact
(we write the projections into it too, `save_projection=True`, PEFT's default). Merges exactly
(`W += diag(lambda_b) B diag(lambda_d) A`) and serves batched as a rank-r update per slice.
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
from ._parts import LowRank, Part
from ._registry import Method, PeftModule, register_method
from .lora import EXTRA_TARGETS, QKV_SLICES

_WHOLE = {"qkv", "proj", "fc1", "fc2"}


@dataclass
class VeRAConfig:
    r: int = 256  # width of the shared projections: the VeRA paper's and HF PEFT's default (cheap: r per layer)
    d_initial: float = 0.1  # lambda_d's start: the paper's (its Table 6c: small values work best)
    dropout: float = 0.0  # on the branch's input, as PEFT's vera_dropout
    # q, k, v slices of attn.qkv (as our LoRA's default), or whole Linears: qkv, proj, fc1, fc2
    targets: tuple[str, ...] = ("q", "k", "v")
    seed: int = 0  # regenerates A and B (PEFT's projection_prng_key); part of the adapter's config

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        allowed = QKV_SLICES + tuple(EXTRA_TARGETS)
        if not self.targets or any(t not in allowed for t in self.targets) or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets must be distinct names among {', '.join(allowed)}; got {self.targets}")
        if "qkv" in self.targets and set(self.targets) & set(QKV_SLICES):
            raise ValueError("target qkv (the whole fused layer) excludes q, k, v (its slices)")
        if int(self.r) != self.r or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if int(self.seed) != self.seed:
            raise ValueError(f"seed must be an integer, got {self.seed}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with a = 0 on fan_in = shape[1], drawn from `generator`: PEFT's `_kaiming_init`."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(PeftModule):
    """The shared frozen A (r, max in) and B (max out, r): non-persistent buffers, regenerated from the seed."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int, ref: torch.Tensor) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        a = _kaiming_uniform((r, max_in), generator)  # drawn first, as PEFT
        b = _kaiming_uniform((max_out, r), generator)
        self.register_buffer("vera_A", a.to(ref.device, ref.dtype), persistent=False)
        self.register_buffer("vera_B", b.to(ref.device, ref.dtype), persistent=False)


class VeRALinear(PeftModule):
    """A Linear plus VeRA's update on some of its equal-width output slices (all of them for a plain Linear)."""

    def __init__(self, base_layer: nn.Linear, slices: Sequence[int], num_slices: int,
                 projections: VeRAProjections, config: VeRAConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slices, self.num_slices = tuple(slices), num_slices
        self.width = base_layer.out_features // num_slices
        self._projections = [projections]  # shared, owned by the model's `vera` module: not registered here
        rows = torch.cat([torch.arange(s * self.width, (s + 1) * self.width) for s in self.slices])
        self.register_buffer("rows", rows.to(base_layer.weight.device), persistent=False)  # (T*width,) targeted rows
        factory = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.vera_lambda_d = nn.Parameter(torch.full((int(config.r),), float(config.d_initial), **factory))
        self.vera_lambda_b = nn.Parameter(torch.zeros(len(rows), **factory))  # (T*width,): 0 at init
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def a(self) -> torch.Tensor:
        """A sliced to this layer's input: (r, in)."""
        return self._projections[0].vera_A[:, : self.base_layer.in_features]

    @property
    def b(self) -> torch.Tensor:
        """The rows of B[:out] this layer updates: (T*width, r)."""
        return self._projections[0].vera_B.index_select(0, self.rows)

    @property
    def weight(self) -> torch.Tensor:  # what attentions calling F.linear(x, qkv.weight, ...) must use
        w = self.base_layer.weight
        return w if self.merged else w.index_add(0, self.rows, self.delta_rows())

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_rows(self) -> torch.Tensor:
        """The update of the targeted rows, (T*width, in): diag(lambda_b) B diag(lambda_d) A."""
        return (self.vera_lambda_b[:, None] * self.b) @ (self.vera_lambda_d[:, None] * self.a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        z = F.linear(self.dropout(x), self.a) * self.vera_lambda_d  # (..., r)
        delta = (F.linear(z, self.b) * self.vera_lambda_b).to(out.dtype)  # (..., T*width)
        if len(self.rows) == out.shape[-1]:
            return out + delta
        return out.index_add(-1, self.rows, delta)

    def low_rank_parts(self, name: str) -> list[LowRank]:
        """One rank-r serving part per targeted slice: a = lambda_d * A, b = lambda_b * B (its rows)."""
        a = (self.vera_lambda_d[:, None] * self.a).detach()
        b = (self.vera_lambda_b[:, None] * self.b).detach()
        return [LowRank(name, a, b[i * self.width : (i + 1) * self.width], s * self.width) for i, s in enumerate(self.slices)]

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight.index_add_(0, self.rows, self.delta_rows())
            self.merged = True

    def extra_repr(self) -> str:
        names = [QKV_SLICES[s] for s in self.slices] if self.num_slices == 3 else ["all"]
        return f"r={self.vera_lambda_d.numel()}, slices={names}"


def _sites(backbone: Backbone, config: VeRAConfig) -> list[tuple[BlockInfo, str, list[int], int]]:
    """(block, child path, slice indices, number of slices) for every Linear VeRA goes on."""
    qkv = [QKV_SLICES.index(t) for t in QKV_SLICES if t in config.targets]
    sites = []
    for block in backbone.blocks:
        if qkv:
            sites.append((block, "attn.qkv", qkv, 3))
        sites += [(block, EXTRA_TARGETS[t], [0], 1) for t in config.targets if t in _WHOLE]
    return sites


@register_method
class VeRA(Method):
    name = "vera"
    config_cls = VeRAConfig
    # By analogy, not measured on a real backbone: lambda_b starts at 0 like LoRA's B, but the update is a
    # product of two small vectors with fixed random factors and moves slower per step, so it wants a
    # larger lr than LoRA (the VeRA paper's learning rates are ~10x LoRA's): 1e-2
    default_lr = 1e-2
    embedded_lr = 1e-2  # embedded backbone: 3e-3 and 1e-2 tie (71.0), 3e-2 69.75 (benchmarks/default-lr.md)
    silent_at_init = ("vera_lambda_d",)  # before lambda_b = 0
    examples = (dict(r=16, targets=("v", "proj", "fc1", "fc2"), seed=3), dict(r=8, targets=("qkv",), d_initial=1.0))

    def expected_params(self, model: nn.Module, backbone: Backbone, config: VeRAConfig) -> int:
        """Per targeted Linear: lambda_d (r) + lambda_b (its targeted output rows)."""
        total = 0
        for block, child, slices, num_slices in _sites(backbone, config):
            total += int(config.r) + len(slices) * backbone.linear(model, block, child).out_features // num_slices
        return total

    def inject(self, model: nn.Module, backbone: Backbone, config: VeRAConfig) -> None:
        sites = [(b, c, s, n, backbone.linear(model, b, c)) for b, c, s, n in _sites(backbone, config)]
        max_in = max(lin.in_features for *_, lin in sites)
        max_out = max(lin.out_features for *_, lin in sites)  # whole Linears, as PEFT sizes them
        projections = VeRAProjections(int(config.r), max_in, max_out, int(config.seed), sites[0][-1].weight)
        for block, child, slices, num_slices, linear in sites:
            model.set_submodule(f"{block.name}.{child}", VeRALinear(linear, slices, num_slices, projections, config))
        model.vera = projections

    def mergeable(self, config: VeRAConfig) -> str | None:
        return None

    def exportable(self, config: VeRAConfig) -> str | None:
        return None

    def merge(self, model: nn.Module, backbone: Backbone, config: VeRAConfig) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, VeRALinear):
                module.merge()
                model.set_submodule(name, module.base_layer)
        del model.vera

    def serve_parts(self, model: nn.Module, backbone: Backbone, config: VeRAConfig) -> list[Part]:
        return [p for name, m in model.named_modules() if isinstance(m, VeRALinear) for p in m.low_rank_parts(name)]

    def to_peft(self, model: nn.Module, backbone: Backbone, config: VeRAConfig) -> tuple[Any, dict[str, torch.Tensor]]:
        """PEFT's VeRA on the whole Linears, lambda_b zero on untargeted q / k / v rows, and the projections
        saved in the file (`save_projection=True`): PEFT then reads A and B instead of redrawing them."""
        from peft import VeraConfig

        tensors: dict[str, torch.Tensor] = {}
        names = []
        for name, m in model.named_modules():
            if isinstance(m, VeRALinear):
                full = m.vera_lambda_b.new_zeros(m.base_layer.out_features).index_put((m.rows,), m.vera_lambda_b.detach())
                tensors[f"{name}.vera_lambda_b"] = full
                tensors[f"{name}.vera_lambda_d"] = m.vera_lambda_d.detach()
                names.append(re.escape(name))
        # PEFT keeps the shared projections beside the model ("base_model.vera_A"), not in a layer
        tensors["base_model.vera_A"] = model.vera.vera_A
        tensors["base_model.vera_B"] = model.vera.vera_B
        peft_config = VeraConfig(
            r=int(config.r), target_modules=rf"^(?:{'|'.join(names)})$", projection_prng_key=int(config.seed),
            save_projection=True, vera_dropout=config.dropout, d_initial=config.d_initial, bias="none", task_type=None,
        )
        return peft_config, tensors
