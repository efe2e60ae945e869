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

from torch import nn

from ..backbones.backbone import model_spec
from ..files import atomic_write_text, save_tensors
from ..methods import get_method
from ..methods.freeze import require_state, unwrap


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write an HF PEFT adapter directory that `peft.PeftModel.from_pretrained(timm_model, dir)` loads."""
    state = require_state(model)
    model = unwrap(model)
    peft_config, factors = get_method(state.method).to_peft(model, state.backbone, state.config)
    # the head trains with every method: PEFT calls that `modules_to_save`
    peft_config.modules_to_save = sorted({n.rsplit(".", 1)[0] for n in state.head_names}) or None
    peft_config.base_model_name_or_path = model_spec(model).name
    peft_config.inference_mode = True
    params = dict(model.named_parameters())
    tensors = {**factors, **{name: params[name] for name in state.head_names}}
    tensors = {"base_model.model." + k: v for k, v in tensors.items()}
    directory = Path(directory)
    save_tensors(tensors, directory / "adapter_model.safetensors", {"format": "pt"})
    atomic_write_text(directory / "adapter_config.json", json.dumps(peft_config.to_dict(), indent=2, default=list) + "\n")
    return directory
