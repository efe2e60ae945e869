"""PEFT methods: every module of this package registers its methods; importing the package imports them all.

Adding a method is one new file here (see `_registry.py` for what it declares); nothing else lists it.
"""

import importlib
import pkgutil

from ._registry import (
    Method,
    PeftModule,
    build_config,
    config_to_dict,
    default_lr,
    get_method,
    list_methods,
    register_method,
    saved_options,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "Method",
    "PeftModule",
    "build_config",
    "config_to_dict",
    "default_lr",
    "get_method",
    "list_methods",
    "register_method",
    "saved_options",
]
