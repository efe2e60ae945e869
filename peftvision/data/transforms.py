"""Preprocessing read from the model, and DataLoaders."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import DataError

RESIZE_MODES = ("crop", "squash")


def input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model takes. Its patch embedding knows better than `pretrained_cfg`: a model built
    with `img_size=64` still carries the 224 of the registered config."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        return (cfg["input_size"][0], int(h), int(w))
    return tuple(cfg["input_size"])  # type: ignore[return-value]


def make_transform(
    model: torch.nn.Module, train: bool = False, resize: str = "crop", **overrides: Any
) -> Callable[[Any], torch.Tensor]:
    """PIL RGB image -> normalised (C, H, W) tensor, as the model was pretrained to see it.

    Size, interpolation, mean and std come from the model's `pretrained_cfg` (timm's
    `resolve_data_config` + `create_transform`). `train=True` adds timm's standard augmentation
    (random-resized crop, horizontal flip, colour jitter); flips and crops change the label of
    location / orientation tasks, so pass e.g. `hflip=0.0, scale=(0.9, 1.0)` there.

    Args:
        model: a timm model (its `pretrained_cfg` and patch embedding are read).
        train: augment (random) instead of the deterministic evaluation transform.
        resize: how evaluation fits an image to the input size. "crop" is the model's own eval
            transform (resize the short side to size / crop_pct, centre crop): what a model pretrained
            on photos saw, and worth 4 points on real photos (89.5% vs 85.6% in FACTS.md). "squash"
            resizes the whole image to the input size, never cropping: the VTAB-1k rule, since a crop
            would cut off the objects that location and counting tasks are about.
        **overrides: any `timm.data.create_transform` argument (hflip, scale, color_jitter, ...).
    """
    import timm.data

    if resize not in RESIZE_MODES:
        raise DataError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    cfg = timm.data.resolve_data_config({}, model=model)
    cfg["input_size"] = input_size(model)
    if not train and resize == "squash":
        cfg.update(crop_pct=1.0, crop_mode="squash")
    cfg.update(overrides)
    try:
        return timm.data.create_transform(**cfg, is_training=train)
    except TypeError as e:
        raise DataError(f"bad transform option: {e}") from None
