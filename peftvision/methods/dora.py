"""DoRA (Liu et al., 2024): LoRA with the update split into a direction and a learned magnitude.

Each targeted output row i of a Linear computes `m_i * (W + dW)_i x / ||(W + dW)_i|| + b_i`, with
dW = scaling * B A LoRA's update and m a learned vector, initialised to the rows' norms ||W_i|| so
the model starts unchanged. Rows of untargeted q / k / v slices are left as they are (HF PEFT's DoRA
covers the whole fused qkv; ours covers the slices LoRA targets, and exports as PEFT's with m = ||W_i||
on the other rows, where the factor is exactly 1). As in the paper (section 4.3) and PEFT, the norm is
treated as a constant in backward. Merges exactly: `W <- (m / ||W + dW||) * (W + dW)` row-wise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..backbones.backbone import Backbone
from ._parts import Affine, Part
from ._registry import register_method
from .lora import LoRA, LoRAConfig, LoRALinear


@dataclass
class DoRAConfig(LoRAConfig):
    """LoRA's options (use_rslora and lr_ratio apply to DoRA's factors as to LoRA's); the magnitude vector
    has none."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "default":  # DoRA's magnitude is defined on the base weight PiSSA would split
            raise ValueError(f"init={self.init!r} is a LoRA option DoRA does not support; use lora --set lora.init={self.init}")


class DoRALinear(LoRALinear):
    """A LoRALinear whose targeted rows are renormalised to a learned magnitude."""

    def __init__(self, base_layer: nn.Linear, *args: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, *args, **kwargs)
        rows = torch.cat([torch.arange(s * self.width, (s + 1) * self.width) for s in self.slices])
        self.register_buffer("rows", rows.to(base_layer.weight.device), persistent=False)  # (T*width,)
        with torch.no_grad():
            self.magnitude = nn.Parameter(base_layer.weight[rows].norm(dim=1).clone())  # (T*width,): ||W_i||

    def row_scale(self) -> torch.Tensor:
        """(out,) factor m_i / ||(W + dW)_i|| on targeted rows, 1 elsewhere; the norm carries no gradient."""
        with torch.no_grad():
            w = self.base_layer.weight
            norm = (w[self.rows] + self.delta_weight()[self.rows]).norm(dim=1)
        scale = torch.ones(self.out_features, device=w.device, dtype=self.magnitude.dtype)
        return scale.index_put((self.rows,), self.magnitude / norm)

    @property
    def weight(self) -> torch.Tensor:  # what attentions calling F.linear(x, qkv.weight, ...) must use
        w = self.base_layer.weight
        return w if self.merged else self.row_scale()[:, None] * (w + self.delta_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # (W + dW) x + b
        if self.merged:
            return out
        scale = self.row_scale().to(out.dtype)
        bias = self.base_layer.bias
        if bias is None:
            return out * scale
        return torch.addcmul(bias.to(out.dtype) * (1 - scale), out, scale)  # scale * ((W + dW) x) + b

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            self._unmerged = w.clone()
            w.copy_(self.row_scale()[:, None] * (w + self.delta_weight()))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.copy_(self._unmerged)
            del self._unmerged
            self.merged = False


@register_method
class DoRA(LoRA):
    name = "dora"
    config_cls = DoRAConfig
    default_lr = 3e-3  # LoRA's: the magnitude starts at the rows' norms and the direction as LoRA's
    embedded_lr = 1e-2  # on the embedded 32-px backbones (benchmarks/default-lr.md)
    layer_cls = DoRALinear
    probe_head_lr_ratio = 1.0  # the head at the run's lr: a slower head is measured for LoRA, not for DoRA
    examples = (dict(r=4, targets=("q", "k", "v", "proj", "fc2")), dict(targets=("qkv",)))

    def expected_params(self, model: nn.Module, backbone: Backbone, config: DoRAConfig) -> int:
        """LoRA's factors, plus one magnitude per targeted output row."""
        total = super().expected_params(model, backbone, config)
        for block in backbone.blocks:
            d, h = block.dim, backbone.linear(model, block, "mlp.fc1").out_features
            rows = {"q": d, "k": d, "v": d, "qkv": 3 * d, "proj": d, "fc1": h, "fc2": d}
            total += sum(rows[t] for t in config.targets)
        return total

    def serve_parts(self, model: nn.Module, backbone: Backbone, config: DoRAConfig) -> list[Part]:
        """LoRA's update, then the row factor s as an affine: s * ((W + dW) x + b) + (1 - s) * b."""
        parts: list[Part] = []
        for name, m in model.named_modules():
            if isinstance(m, DoRALinear):
                scale = m.row_scale().detach()
                bias = m.base_layer.bias
                shift = (1 - scale) * bias.detach() if bias is not None else torch.zeros_like(scale)
                parts += [*m.low_rank_parts(name), Affine(name, scale, shift)]
        return parts

    def to_peft(self, model: nn.Module, backbone: Backbone, config: DoRAConfig) -> tuple[Any, dict[str, torch.Tensor]]:
        """LoRA's export with `use_dora=True` and PEFT's magnitude over all rows of each layer."""
        peft_config, tensors = super().to_peft(model, backbone, config)
        peft_config.use_dora = True
        for name, m in model.named_modules():
            if isinstance(m, DoRALinear):
                with torch.no_grad():
                    full = m.base_layer.weight.norm(dim=1).index_put((m.rows,), m.magnitude.detach())
                tensors[f"{name}.lora_magnitude_vector"] = full
        return peft_config, tensors
