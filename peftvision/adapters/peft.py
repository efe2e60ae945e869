"""Export an adapter to HF PEFT's format, for people who load adapters with `peft`.

`peft.PeftModel.from_pretrained(timm_model, directory)` loads what `export_peft` writes. Each method
says whether it has an HF PEFT equivalent (`Method.exportable`) and gives its config and tensors in the
base model's namespace (`Method.to_peft`); the head trains with every method and travels as PEFT's
`modules_to_save`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..backbones.backbone import model_spec
from ..backbones.weights import ARCHITECTURES
from ..files import atomic_write_text, save_tensors
from ..methods import get_method
from ..methods.freeze import require_state, unwrap
from .card import REPO_PLACEHOLDER, export_card
from .io import adapter_config, preprocessing


def export_peft(model: nn.Module, directory: str | os.PathLike, metrics: dict[str, Any] | None = None) -> Path:
    """Write an HF PEFT adapter directory that `peft.PeftModel.from_pretrained(timm_model, dir)` loads,
    with a model card (`README.md`) saying how (`metrics`: the source run's, for the card)."""
    state = require_state(model)
    model = unwrap(model)
    peft_config, factors = get_method(state.method).to_peft(model, state.backbone, state.config)
    # the head trains with every method: PEFT calls that `modules_to_save`
    peft_config.modules_to_save = sorted({n.rsplit(".", 1)[0] for n in state.head_names}) or None
    peft_config.base_model_name_or_path = model_spec(model).name
    peft_config.inference_mode = True
    params = dict(model.named_parameters())
    tensors = {**factors, **{name: params[name] for name in state.head_names}}
    # a method's tensors live in the base model's namespace, except PEFT-level ones it names itself
    # ("base_model.vera_A": VeRA's shared projections sit beside the model in PEFT, not in a layer)
    tensors = {k if k.startswith("base_model.") else "base_model.model." + k: v for k, v in tensors.items()}
    directory = Path(directory)
    save_tensors(tensors, directory / "adapter_model.safetensors", {"format": "pt"})
    atomic_write_text(directory / "adapter_config.json", json.dumps(peft_config.to_dict(), indent=2, default=list) + "\n")
    atomic_write_text(directory / "README.md", _card(model, metrics))
    return directory


def _card(model: nn.Module, metrics: dict[str, Any] | None) -> str:
    """The card: how `peft` loads the adapter onto the timm base it was trained on."""
    config = adapter_config(model)
    info = config["model"]
    kwargs = "".join(f", {k}={v!r}" for k, v in (info.get("kwargs") or {}).items())
    embedded = info["name"].split(".")[0] in ARCHITECTURES
    usage = [
        "With HF PEFT on the timm base model:", "",
        "```python",
        "import peft, timm",
        *(["import peftvision.backbones.embedded  # registers this base, whose weights ship with peftvision"]
          if embedded else []),
        "",
        f'base = timm.create_model("{info["name"]}", pretrained=True, num_classes={info["num_classes"]}{kwargs})',
        f'model = peft.PeftModel.from_pretrained(base, "{REPO_PLACEHOLDER}").eval()',
        f"transform = timm.data.create_transform(**{preprocessing(model)!r})  # as in training",
        "```", "",
        "Base weights from a local file: add `pretrained_cfg_overlay=dict(file=\"base.safetensors\")` to "
        "`create_model`; they must be the weights the adapter was trained on (the fingerprint above).",
    ]
    what = (f"An HF PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) exported from a peftvision "
            f"{config['method']} adapter: the method's tensors and the classifier head (`modules_to_save`), "
            f"for the timm model `{info['name']}`.")
    return export_card(config, "peft", what, usage, metrics)
