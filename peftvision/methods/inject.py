"""`inject`: backbone -> method -> freeze, the one call that turns a timm model into a PEFT model."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..backbones.backbone import architecture_signature, describe, weights_fingerprint
from ..errors import PeftVisionError
from . import build_config, get_method
from .freeze import PeftState, apply_freeze, get_state, install_eval_hook


def inject(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Add a PEFT method to a timm model in place and freeze everything but the method and the head.

    Args:
        model: a timm ViT- or Swin-family model (any `vit_*`, `deit_*`, `swin_*`, ...).
        method: a registered method name (`peftvision.list_methods()`).
        **options: the method's config fields, e.g. `r=8, targets=("q", "v")` for lora.

    Returns:
        The same model object, for chaining.
    """
    if get_state(model) is not None:
        raise PeftVisionError(
            f"this model already has {get_state(model).method} injected; merge it or start from a fresh model"
        )
    m = get_method(method)
    config = build_config(m, options)
    backbone = describe(model)
    fingerprint = weights_fingerprint(model, backbone)
    signature = architecture_signature(model, backbone)
    m.inject(model, backbone, config)
    trainable = list(m.trainable_parameters(model, backbone, config))
    method_names, head_names, frozen = apply_freeze(model, backbone, trainable, m.freeze_backbone)
    model.peftvision_state = PeftState(
        method=m.name,
        config=config,
        backbone=backbone,
        base_fingerprint=fingerprint,
        architecture_signature=signature,
        trainable_names=method_names + head_names,
        head_names=head_names,
        frozen_modules=frozen,
    )
    if m.freeze_backbone:
        install_eval_hook(model)
    return model


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute block activations in backward (less memory, more compute), where the method allows."""
    state = get_state(model)
    if state is not None:
        reason = get_method(state.method).grad_checkpointing_unsupported(state.backbone, state.config)
        if reason:
            raise PeftVisionError(f"--grad-checkpointing does not work with {state.method} here: {reason}")
    if not hasattr(model, "set_grad_checkpointing"):
        raise PeftVisionError(f"{type(model).__name__} has no gradient checkpointing")
    model.set_grad_checkpointing(True)
