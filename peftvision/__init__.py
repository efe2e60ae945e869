"""peftvision: parameter-efficient fine-tuning (LoRA, Houlsby adapters, VPT) for timm ViT and Swin models.

The public API is imported lazily so that `peftvision --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_API = {
    "TrainConfig": "peftvision.training.config",
    "finetune": "peftvision.training.finetune",
    "load_task": "peftvision.data",
    "make_transform": "peftvision.data",
    "evaluate_model": "peftvision.training.evaluate",
    "inject": "peftvision.methods.inject",
    "prepare": "peftvision.methods.inject",
    "param_report": "peftvision.methods.freeze",
    "get_state": "peftvision.methods.freeze",
    "save_adapter": "peftvision.adapters.io",
    "load_adapter": "peftvision.adapters.io",
    "merge": "peftvision.adapters.io",
    "save_merged": "peftvision.adapters.io",
    "export_peft": "peftvision.adapters.peft",
    "export_timm": "peftvision.adapters.timm",
    "export_onnx": "peftvision.adapters.onnx",
    "push": "peftvision.adapters.publish",
    "resolve_adapter": "peftvision.adapters.hub",
    "write_card": "peftvision.adapters.card",
    "read_adapter_config": "peftvision.adapters.format",
    "MultiAdapterModel": "peftvision.serving.multi",
    "create_app": "peftvision.serving.http",
    "ServeConfig": "peftvision.serving.config",
    "create_model": "peftvision.backbones.backbone",
    "load_model": "peftvision.backbones.backbone",
    "describe": "peftvision.backbones.backbone",
    "list_methods": "peftvision.methods",
    "get_method": "peftvision.methods",
    "register_method": "peftvision.methods",
    "explain": "peftvision.explain",
    "attention_maps": "peftvision.explain",
    "attention_rollout": "peftvision.explain",
    "grad_cam": "peftvision.explain",
    "PeftVisionError": "peftvision.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'peftvision' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps `pv.explain` (and any API name) the function once a module of that name is imported: the
    import system sets a submodule as an attribute of its package, which would hide the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _API:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
