"""PEFT methods. Each module below registers itself; importing this package makes them all available."""

from ._registry import (
    Method,
    PeftModule,
    build_config,
    config_to_dict,
    default_lr,
    get_method,
    list_methods,
    register_method,
)
from . import baselines, lora, adapter, vpt  # noqa: F401  (registration order = display order)

__all__ = [
    "Method",
    "PeftModule",
    "build_config",
    "config_to_dict",
    "default_lr",
    "get_method",
    "list_methods",
    "register_method",
]
