"""Register peftvision's small pretrained backbones with timm, so that they load offline.

After `import peftvision.backbones.embedded` (or `register_default_models()`),

    timm.create_model("pv_vit_tiny_32", pretrained=True, num_classes=10)

builds a 32x32 ViT and loads the weights shipped in `peftvision/backbones/` -- no hub, no network --
replacing the pretraining head by a fresh one of the requested size, exactly as timm does for its own
models. The registration follows timm's pattern: a `default_cfgs` table whose pretrained cfg points
at a local `file=`, and one `@register_model` entrypoint per name. Architectures and the pretraining
recipe live in `peftvision.backbones.weights` (importable without torch) and `python -m tools.pretrain`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import swin_transformer as _swin
from timm.models import vision_transformer as _vit
from torch import nn

from .weights import (
    ARCHITECTURES,
    DEFAULT_MODEL,
    DEFAULT_MODELS,
    INPUT_SIZE,
    MEAN,
    PRETRAIN_CLASSES,
    STD,
    weights_path,
)

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODELS", "register_default_models"]

_DESCRIPTION = (
    "Pretrained by peftvision on procedurally generated scenes (formula-driven: geometric objects of "
    f"{PRETRAIN_CLASSES} shapes over 8 textures; the head classifies the main object's shape); see "
    "peftvision/backbones/{name}.json for data, steps, wall time and upstream accuracy."
)


def _cfg(name: str) -> dict[str, Any]:
    return dict(
        file=str(weights_path(name)),
        num_classes=PRETRAIN_CLASSES,
        input_size=INPUT_SIZE,
        fixed_input_size=True,
        # The whole 32x32 image is the object of study (the built-in tasks ask where things are):
        # resize to the input size without timm's default 87.5% centre crop.
        crop_pct=1.0,
        interpolation="bilinear",
        mean=MEAN,
        std=STD,
        first_conv="patch_embed.proj",
        classifier=ARCHITECTURES[name]["classifier"],
        license="apache-2.0",
        description=_DESCRIPTION.format(name=name),
        origin_url="peftvision (python -m tools.pretrain)",
    )


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in DEFAULT_MODELS})


def _to_float32(filter_fn: Callable) -> Callable:
    """Weights ship in fp16 (half the size); upcast before timm resamples position tables."""

    def fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
        return filter_fn(state_dict, model)

    return fn


def _check_weights(name: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and not overlay and not weights_path(name).is_file():
        raise FileNotFoundError(
            f"the weights of {name} are not in this install ({weights_path(name)}); "
            f"create them with: python -m tools.pretrain --recipe recipes/pretrain-{name}.yaml"
        )


def _build(name: str, cls: type[nn.Module], filter_fn: Callable, pretrained: bool, **kwargs: Any) -> nn.Module:
    _check_weights(name, pretrained, kwargs)
    return build_model_with_cfg(
        cls,
        name,
        pretrained,
        pretrained_filter_fn=_to_float32(filter_fn),
        **{**ARCHITECTURES[name]["kwargs"], **kwargs},
    )


@register_model
def pv_vit_tiny_32(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT, 32x32 input, patch 4 (8x8 tokens + class token), width 192, depth 6, 3 heads: 2.7M params."""
    kwargs.setdefault("feature_cfg", dict(out_indices=3, feature_cls="getter"))
    return _build("pv_vit_tiny_32", _vit.VisionTransformer, _vit.checkpoint_filter_fn, pretrained, **kwargs)


@register_model
def pv_swin_tiny_32(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Swin, 32x32 input, patch 2, window 4, widths 48/96/192, depths 2/2/2: 1.3M params."""
    kwargs.setdefault("feature_cfg", dict(flatten_sequential=True, out_indices=(0, 1, 2)))
    return _build("pv_swin_tiny_32", _swin.SwinTransformer, _swin.checkpoint_filter_fn, pretrained, **kwargs)


def register_default_models() -> tuple[str, ...]:
    """Make the shipped backbones known to timm; idempotent (the registration is this module's import).

    Returns:
        The registered model names.
    """
    return DEFAULT_MODELS
