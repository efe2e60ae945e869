"""Save and load adapters, and merge them into a plain timm model.

`save_adapter` describes an injected model in the adapter format (`format.py`) and writes its card;
`load_adapter` resolves a source (a directory or `hf:USER/NAME`), rebuilds the base through timm,
checks that it is the base the adapter was trained on, injects the method and loads the tensors.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..backbones.backbone import (
    ModelSpec,
    architecture_signature,
    create_model,
    describe,
    model_spec,
    weights_fingerprint,
)
from ..errors import AdapterFileError, ConfigError, PeftVisionError
from ..files import save_tensors
from ..methods import config_to_dict, get_method, saved_options
from ..methods.freeze import (
    PeftState,
    get_state,
    param_report,
    remove_eval_hook,
    require_state,
    unwrap,
)
from ..methods.inject import inject
from .card import write_card
from .format import (
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    read_adapter_config,
    read_adapter_tensors,
    write_adapter_files,
)
from .hub import resolve_adapter

# ----------------------------------------------------------------------------- save

def adapter_config(model: nn.Module, class_names: list[str] | None = None) -> dict[str, Any]:
    """The JSON description of an injected model's adapter."""
    state = require_state(model)
    model = unwrap(model)
    spec = model_spec(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    num_classes = getattr(model, "num_classes", None)
    names = class_names if class_names is not None else state.class_names
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise ConfigError(f"{len(names)} class names given for a head with {num_classes} classes")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peftvision_version": __version__,
        "method": state.method,
        "method_config": config_to_dict(state.config),
        "model": {
            "name": spec.name,
            "architecture": state.backbone.architecture,
            "kwargs": spec.kwargs,
            "num_classes": num_classes,
            "class_names": list(names) if names is not None else None,
            "input_size": list(cfg.get("input_size", ())) or None,
            "mean": list(cfg.get("mean", ())) or None,
            "std": list(cfg.get("std", ())) or None,
            "interpolation": cfg.get("interpolation"),
            "crop_pct": cfg.get("crop_pct"),
            "resize": state.resize,
        },
        "base_fingerprint": state.base_fingerprint,
        "architecture_signature": state.architecture_signature,
        "tensors": list(state.trainable_names) + list(state.state_names),  # trained, then the method's state
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, class_names: list[str] | None = None) -> Path:
    """Write `adapter.safetensors` (the method's tensors + head), `adapter_config.json` and a model
    card (`README.md`, unless the directory holds a hand-written one) to `directory`."""
    config = adapter_config(model, class_names)
    tensors = {**dict(unwrap(model).named_buffers()), **dict(unwrap(model).named_parameters())}
    directory = write_adapter_files(directory, config, {n: tensors[n] for n in config["tensors"]})
    report = param_report(model)
    write_card(directory, params=(report.trainable, report.total))
    return directory


# ----------------------------------------------------------------------------- load

def load_adapter(
    directory: str | os.PathLike,
    model: nn.Module | None = None,
    checkpoint: str | None = None,
    pretrained: bool = True,
    ignore_fingerprint: bool = False,
) -> nn.Module:
    """Rebuild the base model, inject the method and load the adapter's tensors.

    Args:
        directory: a directory written by `save_adapter`, or `hf:USER/NAME[@REVISION]` on the hub.
        model: a base timm model to put the adapter on, instead of building one with timm.
        checkpoint: a local weights file for the base (instead of downloading it from the hub).
        pretrained: build the base with pretrained weights (False only for tests / full fine-tuning).
        ignore_fingerprint: accept base weights that differ from those the adapter was trained on.
    """
    local = resolve_adapter(directory)
    config = read_adapter_config(local)
    tensors = read_adapter_tensors(local)  # validate the file before any heavy work
    method = get_method(config["method"])
    info = config["model"]
    if model is None:
        needs_base = pretrained and not method.saves_backbone
        model = create_model(
            info["name"], pretrained=needs_base, checkpoint=checkpoint if needs_base else None,
            num_classes=info.get("num_classes"), **(info.get("kwargs") or {}),
        )
    elif get_state(model) is not None:
        raise PeftVisionError("the given model already has a method injected; pass a plain timm model")
    backbone = describe(model)
    if architecture_signature(model, backbone) != config["architecture_signature"]:
        raise AdapterFileError(
            f"adapter in {directory} was trained on {info.get('name')} ({config['architecture_signature']}), "
            f"but the base model is {backbone.architecture} with a different architecture"
        )
    num_classes = getattr(model, "num_classes", None)
    if info.get("num_classes") is not None and num_classes is not None and num_classes != info["num_classes"]:
        raise AdapterFileError(
            f"the adapter in {directory} has a {info['num_classes']}-class head, the given model {num_classes} "
            f"(create it with num_classes={info['num_classes']})"
        )
    if not (ignore_fingerprint or method.saves_backbone):
        if weights_fingerprint(model, backbone) != config["base_fingerprint"]:
            raise AdapterFileError(
                f"the base weights differ from those the adapter in {directory} was trained on "
                f"({info.get('name')}); load the same checkpoint, or pass ignore_fingerprint=True / --ignore-fingerprint"
            )
    inject(model, config["method"], **saved_options(config["method"], config["method_config"]))
    state = require_state(model)
    _copy_tensors(model, state, tensors, directory)
    names = info.get("class_names")
    state.class_names = list(names) if names is not None else None
    # adapters written before the field existed were all trained on squashed images; one saved from a
    # user's own loop (null) was fed timm's own eval transform
    state.resize = info.get("resize", "squash") or "crop"
    model.peftvision_spec = ModelSpec(info["name"], dict(info.get("kwargs") or {}))
    return model


def load_best(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Copy the trainable tensors of the adapter file in `directory` into `model` (in place): after
    training, the best-on-validation adapter replaces the last epoch's."""
    _copy_tensors(unwrap(model), require_state(model), read_adapter_tensors(directory), directory)
    return model


def _copy_tensors(model: nn.Module, state: PeftState, tensors: dict[str, torch.Tensor], directory: Any) -> None:
    names = list(state.trainable_names) + list(state.state_names)  # the method's state (buffers) too
    expected = set(names)
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise AdapterFileError(
            f"{directory}/{WEIGHTS_NAME} does not fit {state.method} on this model: "
            f"missing {missing[:3]}, unexpected {extra[:3]}"
        )
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    with torch.no_grad():
        for name in names:
            src, dst = tensors[name], params[name]
            if src.shape != dst.shape:
                raise AdapterFileError(
                    f"{directory}: tensor {name} has shape {tuple(src.shape)}, the model expects {tuple(dst.shape)} "
                    f"(different num_classes or method config?)"
                )
            dst.copy_(src.to(dst.device, dst.dtype))


# ----------------------------------------------------------------------------- merge

def merge(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold the method into the base weights: a plain timm model with exactly timm's state-dict keys.

    Args:
        model: an injected model whose method can merge (see `Method.mergeable`).
        inplace: modify `model` itself instead of a copy.
    """
    model = unwrap(model)  # a compiled or DDP-wrapped model merges into a plain one
    state = require_state(model)
    method = get_method(state.method)
    reason = method.mergeable(state.config)
    if reason is not None:
        raise PeftVisionError(f"cannot merge: {reason}")
    merged = model if inplace else copy.deepcopy(model)
    method.merge(merged, state.backbone, state.config)
    remove_eval_hook(merged)
    del merged.peftvision_state
    if state.resize == "squash":  # timm's resolve_data_config(model=merged) then preprocesses as in training
        merged.pretrained_cfg = {**(getattr(merged, "pretrained_cfg", None) or {}), "crop_pct": 1.0, "crop_mode": "squash"}
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def preprocessing(model: nn.Module) -> dict[str, Any]:
    """The eval data config a model was trained with, as timm's `create_transform(**config)` takes it."""
    import timm.data

    from ..data import input_size

    state = get_state(model)
    config = timm.data.resolve_data_config({}, model=unwrap(model))
    config["input_size"] = input_size(unwrap(model))
    if state is not None and state.resize == "squash":
        config.update(crop_pct=1.0, crop_mode="squash")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def save_merged(model: nn.Module, path: str | os.PathLike) -> Path:
    """Merge and write a timm-loadable safetensors checkpoint (`pretrained_cfg_overlay=dict(file=...)`).

    The file's metadata holds the eval preprocessing (`peftvision.preprocessing`: the data config for
    `timm.data.create_transform`), so the merged model can be fed exactly as in training."""
    merged = merge(model)
    save_tensors(merged.state_dict(), path, {"format": "pt", "peftvision.preprocessing": json.dumps(preprocessing(model))})
    return Path(path)
