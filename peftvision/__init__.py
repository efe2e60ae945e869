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
    "TrainConfig": "peftvision.config",
    "finetune": "peftvision.finetune",
    "load_task": "peftvision.data",
    "make_transform": "peftvision.data",
    "evaluate_model": "peftvision.evaluate",
    "inject": "peftvision.injection",
    "param_report": "peftvision.freeze",
    "get_state": "peftvision.freeze",
    "save_adapter": "peftvision.export",
    "load_adapter": "peftvision.export",
    "merge": "peftvision.export",
    "save_merged": "peftvision.export",
    "export_peft": "peftvision.export",
    "push": "peftvision.hub",
    "resolve_adapter": "peftvision.hub",
    "write_card": "peftvision.card",
    "MultiAdapterModel": "peftvision.multi",
    "create_app": "peftvision.serve",
    "create_model": "peftvision.backbone",
    "load_model": "peftvision.backbone",
    "describe": "peftvision.backbone",
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
    """Keeps `pv.finetune` / `pv.explain` the functions once their modules are imported: the import
    system sets a submodule as an attribute of its package, which would hide the function of that name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _API.get(name) == value.__name__:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
