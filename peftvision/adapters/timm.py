"""Export an adapted model as a timm model folder, for people who load models with timm alone.

The folder is laid out as timm's own hub models are: `config.json` (a timm entry point as
`architecture`, the `model_args` that make it this architecture, the head's size and class names, and
a `pretrained_cfg` with the preprocessing the adapter was trained with), `model.safetensors` (the
merged weights) and a model card. Pushed to the hub, `timm.create_model("hf-hub:USER/NAME",
pretrained=True)` builds it with plain timm -- no peftvision -- and timm's
`create_transform(**resolve_data_config({}, model=model))` preprocesses as in training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones.backbone import model_spec
from ..backbones.weights import ARCHITECTURES
from ..errors import PeftVisionError, UnsupportedModelError
from ..files import atomic_write_text, save_tensors
from ..methods import get_method
from ..methods.freeze import require_state, unwrap
from .card import REPO_PLACEHOLDER, export_card
from .io import adapter_config, merge, preprocessing

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
# pretrained_cfg keys written; timm builds a `PretrainedCfg` from the dict, which refuses unknown keys,
# and the base's own source, tag, papers and test-time sizes would misdescribe the merged model
_CFG_KEYS = ("input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
             "num_classes", "pool_size", "first_conv", "classifier", "license")


def timm_architecture(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """(timm entry point, model_args) with which plain timm, without peftvision, builds `model`'s
    architecture: its own name for timm's models; for peftvision's embedded backbones, a timm entry
    point of the same class with every architecture argument spelled out."""
    import timm

    spec = model_spec(model)
    arch = spec.name.split(".", 1)[0]
    embedded = ARCHITECTURES.get(arch)
    if embedded is not None:
        entry, args = embedded["timm_entry"], {**embedded["kwargs"], **spec.kwargs}
    elif timm.is_model(arch) and not timm.models.model_entrypoint(arch).__module__.startswith("timm."):
        raise UnsupportedModelError(
            f"{arch} is registered by {timm.models.model_entrypoint(arch).__module__}, not by timm: "
            f"plain timm cannot build it (export --format onnx runs anywhere)"
        )
    else:
        entry, args = arch, dict(spec.kwargs)
    return entry, json.loads(json.dumps(args))  # tuples become lists, as they read back from config.json


def timm_config(model: nn.Module) -> dict[str, Any]:
    """The `config.json` of an adapted model's timm export, in the keys timm's hub loader reads."""
    state = require_state(model)
    plain = unwrap(model)
    architecture, model_args = timm_architecture(plain)
    base_cfg = dict(getattr(plain, "pretrained_cfg", None) or {})
    prep = preprocessing(model)
    pretrained_cfg = {k: base_cfg[k] for k in _CFG_KEYS if base_cfg.get(k) is not None}
    pretrained_cfg.update({k: prep[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")})
    if list(base_cfg.get("input_size", ()))[1:] != list(prep["input_size"])[1:]:
        pretrained_cfg.pop("pool_size", None)  # the base's final feature map size, at its own input size
    pretrained_cfg["num_classes"] = plain.num_classes
    pretrained_cfg["custom_load"] = False
    spec = model_spec(plain)
    pretrained_cfg["description"] = f"{state.method} adapter merged into {spec.name} by peftvision"
    config: dict[str, Any] = {
        "architecture": architecture,
        "num_classes": plain.num_classes,
        "num_features": getattr(plain, "num_features", None),
    }
    if state.class_names:
        config["label_names"] = list(state.class_names)
    config["model_args"] = model_args
    config["pretrained_cfg"] = json.loads(json.dumps(pretrained_cfg))
    return config


def export_timm(model: nn.Module, directory: str | os.PathLike, metrics: dict[str, Any] | None = None) -> Path:
    """Write a timm model folder (config.json, merged model.safetensors, README.md) that
    `timm.create_model("hf-hub:USER/NAME", pretrained=True)` loads once pushed.

    Before anything is written, plain timm rebuilds the model from the config and the merged weights
    and must compute what `model` computes: an export timm would build differently is refused.

    Args:
        model: an injected model whose method can merge (`Method.mergeable`).
        directory: the folder to write (created if needed).
        metrics: the source run's metrics.json, for the card.
    """
    state = require_state(model)
    reason = get_method(state.method).mergeable(state.config)
    if reason is not None:
        raise PeftVisionError(f"cannot export to timm: {reason} (export --format onnx runs it unmerged)")
    config = timm_config(model)
    merged = merge(model).eval()
    tensors = merged.state_dict()
    _check_rebuild(model, config, tensors)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PeftVisionError(f"{directory} is a file: give a directory for the timm export")
    save_tensors(tensors, directory / WEIGHTS_NAME, {"format": "pt"})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    atomic_write_text(directory / CARD_NAME, _card(model, config, metrics))
    return directory


def _check_rebuild(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Build what timm builds from `config`, load the merged weights strictly and compare outputs."""
    import timm

    try:
        rebuilt = timm.create_model(config["architecture"], pretrained=False, num_classes=config["num_classes"],
                                    **config["model_args"])
        rebuilt.load_state_dict(tensors, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeftVisionError(f"plain timm cannot rebuild this model as {config['architecture']}: {first}") from None
    size = config["pretrained_cfg"]["input_size"]
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    plain = unwrap(model)
    training = plain.training
    try:
        with torch.no_grad():
            expected, got = plain.eval()(x), rebuilt.eval()(x)
    finally:
        plain.train(training)
    tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
    diff = float((got - expected).abs().max())
    if not diff <= tolerance:
        raise PeftVisionError(
            f"timm's {config['architecture']} with the merged weights computes other outputs than the adapted "
            f"model (max difference {diff:.2e} > {tolerance:.1e}); not written"
        )


def _card(model: nn.Module, config: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    state = require_state(model)
    repo = f"hf-hub:{REPO_PLACEHOLDER}"
    usage = [
        "With timm alone (no peftvision needed):", "",
        "```python",
        "import timm, torch",
        "from PIL import Image",
        "",
        f'model = timm.create_model("{repo}", pretrained=True).eval()',
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))  # as in training",
        'x = transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0)',
        "with torch.no_grad():",
        "    probs = model(x).softmax(-1)[0]",
    ]
    if state.class_names:
        usage.append('print(model.pretrained_cfg["label_names"][int(probs.argmax())], float(probs.max()))')
    usage += ["```", "",
              f"A local copy of this folder loads with `timm.create_model(\"local-dir:PATH\", pretrained=True)` "
              f"(recent timm), or with any timm 1.x as `timm.create_model(\"{config['architecture']}\", "
              f"num_classes={config['num_classes']}, checkpoint_path=\"PATH/model.safetensors\", **model_args)`, "
              f"`model_args` from `config.json` (then preprocess as its `pretrained_cfg` says)."]
    what = (f"A plain timm `{config['architecture']}` whose weights are peftvision's {state.method} adapter merged "
            f"into its base: `config.json` holds the architecture arguments (`model_args`), the class names and "
            f"the preprocessing the adapter was trained with, `model.safetensors` the weights.")
    return export_card(adapter_config(model), "timm", what, usage, metrics)
