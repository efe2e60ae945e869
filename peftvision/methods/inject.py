"""`inject`: backbone -> method -> freeze, the one call that turns a timm model into a PEFT model."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..backbones.backbone import architecture_signature, describe, weights_fingerprint
from ..errors import PeftVisionError
from . import build_config, get_method
from .freeze import PeftState, apply_freeze, get_state, install_eval_hook, require_state, unwrap


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
    before = {id(module) for module in model.modules()}
    buffers_before = {id(b) for b in model.buffers()}
    m.inject(model, backbone, config)
    for module in model.modules():  # torch creates modules in training mode: new ones take the model's
        if id(module) not in before:
            module.training = model.training
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
        state_names=_new_persistent_buffers(model, buffers_before),
        frozen_modules=frozen,
    )
    if m.freeze_backbone:
        install_eval_hook(model)
    return model


def _new_persistent_buffers(model: nn.Module, before: set[int]) -> list[str]:
    """Names of the persistent buffers `inject` added: the method's state that is not trained (found by
    identity, so a base buffer renamed by a wrapper, e.g. `attn.base_layer.relative_position_index`, is not one)."""
    names = []
    for prefix, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and id(buf) not in before and name not in module._non_persistent_buffers_set:
                names.append(f"{prefix}.{name}" if prefix else name)
    return names


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: buffer} of the method's persistent state (`PeftState.state_names`), live: copying into a
    value changes the model. The trainer checkpoints them with the trainable tensors. Empty for a plain model."""
    state = get_state(model)
    if state is None:
        return {}
    buffers = dict(unwrap(model).named_buffers())
    return {n: buffers[n] for n in state.state_names}


def prepare(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Run the method's data-aware step once, after `inject` and before training; `batches` yields
    (images, labels) of the training data. A no-op for every method that needs no data; GPS picks the
    weights it trains here. `finetune` calls it (not when resuming: the checkpoint holds the result)."""
    state = require_state(model)
    get_method(state.method).prepare(unwrap(model), state.backbone, state.config, batches)


def lr_multipliers(model: nn.Module, head_lr_ratio: float = 1.0) -> dict[str, float]:
    """{parameter name: factor on the lr} the injected method asks for (LoRA+: B learns faster), and
    `head_lr_ratio` on the head's parameters; empty for most methods and for a plain model."""
    state = get_state(model)
    if state is None:
        return {}
    factors = dict(get_method(state.method).lr_multipliers(unwrap(model), state.backbone, state.config))
    if head_lr_ratio != 1:
        factors.update({name: float(head_lr_ratio) for name in state.head_names})
    return factors


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
