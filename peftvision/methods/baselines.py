"""The baselines every PEFT comparison reports: linear probing, full fine-tuning, BitFit.

None of them adds modules; they only choose which existing parameters train, so each "merges"
trivially: the trained model already is a plain timm model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn

from ..backbones.backbone import Backbone
from ._parts import Bias, OwnModel, Part
from ._registry import Method, register_method


@dataclass
class NoOptions:
    """This method has no hyperparameters of its own (only the trainer's lr, weight decay, ...)."""


class _Baseline(Method):
    config_cls = NoOptions
    kind = "baseline"

    def mergeable(self, config: NoOptions) -> str | None:
        return None

    def merge(self, model: nn.Module, backbone: Backbone, config: NoOptions) -> None:
        return None


@register_method
class LinearProbe(_Baseline):
    """Only the classifier head trains (the frozen backbone is a feature extractor)."""

    name = "linear"
    head_only = True
    default_lr = 3e-3  # a head from scratch on frozen features tolerates a larger step
    embedded_lr = 3e-2  # on the embedded 32-px backbones (benchmarks/default-lr.md)

    def trainable_parameters(self, model: nn.Module, backbone: Backbone, config: NoOptions) -> Iterator[nn.Parameter]:
        return iter(())

    def expected_params(self, model: nn.Module, backbone: Backbone, config: NoOptions) -> int:
        return 0

    def serve_parts(self, model: nn.Module, backbone: Backbone, config: NoOptions) -> list[Part]:
        return []  # the head is all it has


@register_method
class FullFineTuning(_Baseline):
    """Every weight trains, and dropout / drop-path behave as timm configured them."""

    name = "full"
    default_lr = 1e-4  # every pretrained weight moves: the literature's 1e-4
    embedded_lr = 1e-3  # on the embedded 32-px backbones (benchmarks/default-lr.md)
    freeze_backbone = False
    saves_backbone = True
    trains_base_weights = True

    def trainable_parameters(self, model: nn.Module, backbone: Backbone, config: NoOptions) -> Iterator[nn.Parameter]:
        return model.parameters()

    def expected_params(self, model: nn.Module, backbone: Backbone, config: NoOptions) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if not backbone.is_head(n.rsplit(".", 1)[0]))


@register_method
class BitFit(_Baseline):
    """Every bias term trains (Linear, LayerNorm, patch-embedding conv, q/v biases), plus the head
    (Ben Zaken et al., 2022)."""

    name = "bitfit"
    default_lr = 1e-3  # biases are few and start from pretrained values
    embedded_lr = 1e-2  # on the embedded 32-px backbones (benchmarks/default-lr.md)
    trains_base_weights = True

    def expected_params(self, model: nn.Module, backbone: Backbone, config: NoOptions) -> int:
        return sum(p.numel() for n, p in model.named_parameters()
                   if n.rsplit(".", 1)[-1].endswith("bias") and not backbone.is_head(n.rsplit(".", 1)[0]))

    def serve_parts(self, model: nn.Module, backbone: Backbone, config: NoOptions) -> list[Part]:
        if any(n.endswith("_bias") for n, _ in model.named_parameters()):
            return [OwnModel(model)]  # BEiT / EVA's q_bias, v_bias are used inside the attention's own code
        return [
            Bias(name, module.bias.detach()) for name, module in model.named_modules()
            if isinstance(getattr(module, "bias", None), nn.Parameter) and not backbone.is_head(name)
        ]

    def trainable_parameters(self, model: nn.Module, backbone: Backbone, config: NoOptions) -> Iterator[nn.Parameter]:
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                # `bias`, and the separate q_bias / v_bias of BEiT- and EVA-style attention
                if name == "bias" or name.endswith("_bias"):
                    yield p
