"""The method registry: the one extension point of peftvision.

A method is a config dataclass plus a `Method` subclass, registered with `@register_method`. The
trainer, exporter, CLI and tests only ever talk to this interface, so adding a method is one new file
in this package (imported in `methods/__init__.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterator

from torch import nn

from ..backbone import Backbone
from ..errors import ConfigError, PeftVisionError


class PeftModule(nn.Module):
    """Base class of every module a method adds. Its own parameters (not a wrapped `base_layer`'s) train.

    Being a class, not a naming convention, lets the freezer find trainable parameters structurally and
    lets `merge` find everything it must remove.
    """

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters this module adds (default: all except those of a wrapped `base_layer`)."""
        base = getattr(self, "base_layer", None)
        skip = {id(p) for p in base.parameters()} if isinstance(base, nn.Module) else set()
        for p in self.parameters():
            if id(p) not in skip:
                yield p


class Method:
    """What a PEFT method does to a timm model. Subclasses set the class attributes and override hooks."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    freeze_backbone: ClassVar[bool] = True  # frozen modules run in eval mode while training
    saves_backbone: ClassVar[bool] = False  # the adapter file holds every weight (no base needed)
    # AdamW lr when a run does not set one, for a real pretrained backbone (`default_lr()` scales it
    # for the embedded ones). It belongs to the method, not the trainer: each method reacts to lr
    # differently, so one global default is wrong for most (benchmarks/default-lr.md).
    default_lr: ClassVar[float] = 1e-3

    def inject(self, model: nn.Module, backbone: Backbone, config: Any) -> None:
        """Add the method's modules to `model` in place. Outputs must stay unchanged where the method
        is zero-initialised."""

    def trainable_parameters(self, model: nn.Module, backbone: Backbone, config: Any) -> Iterator[nn.Parameter]:
        """Parameters to train besides the head. Default: those of every `PeftModule` in the model."""
        for module in model.modules():
            if isinstance(module, PeftModule):
                yield from module.adapter_parameters()

    def grad_checkpointing_unsupported(self, backbone: Backbone, config: Any) -> str | None:
        """None if activation checkpointing (recomputing blocks in backward) is safe, else why not."""
        return None

    def mergeable(self, config: Any) -> str | None:
        """None if `merge` can fold the method into plain timm weights, else the reason it cannot."""
        return f"{self.name} adds computation that is not a weight update, so it cannot be merged"

    def merge(self, model: nn.Module, backbone: Backbone, config: Any) -> None:
        """Fold the method into the base weights and remove every `PeftModule`, in place."""

    def to_peft(self, model: nn.Module, backbone: Backbone, config: Any) -> tuple[Any, dict[str, Any]]:
        """(a `peft.PeftConfig`, {tensor name in the base model's namespace: tensor}) for HF PEFT export."""
        raise PeftVisionError(f"{self.name} has no HF PEFT equivalent; only lora can be exported to PEFT format")


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by name everywhere (API, CLI, trainer, tests)."""
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]()
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(_METHODS)}") from None


def default_lr(method: str, model: str) -> float:
    """The lr a run of `method` on `model` gets when none is given: the method's own, times the
    backbone's `lr_scale` (10 for the small embedded backbones, 1 for every timm model)."""
    from ..weights import lr_scale

    return get_method(method).default_lr * lr_scale(model)


def build_config(method: str | Method, options: dict[str, Any] | None = None) -> Any:
    """The method's config dataclass from keyword options, with a clear error for unknown keys."""
    m = get_method(method) if isinstance(method, str) else method
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(m.config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise ConfigError(f"{m.name} has no option {', '.join(unknown)}; its options are: {allowed}")
    for f in dataclasses.fields(m.config_cls):
        # JSON/YAML give lists where the dataclass wants tuples
        if f.name in options and isinstance(options[f.name], list):
            options[f.name] = tuple(options[f.name])
    try:
        return m.config_cls(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{m.name}: {e}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
