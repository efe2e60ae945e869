"""The method registry: the one extension point of peftvision.

A method is a config dataclass plus a `Method` subclass, registered with `@register_method`, in one
file of this package (every module here is imported when the package is: discovered, not listed).
The trainer, exporter, CLI, `compare` and the tests only ever talk to this interface: a method declares
what it can do (merge, export to HF PEFT, gradient checkpointing), its closed-form parameter count and
the option sets it wants tested, and they pick it up from there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..backbones.backbone import Backbone
from ..errors import ConfigError, PeftVisionError
from ._parts import OwnModel, Part


class PeftModule(nn.Module):
    """Base class of every module a method adds. Its own parameters (not a wrapped `base_layer`'s) train.

    Being a class, not a naming convention, lets the freezer find trainable parameters structurally and
    lets `merge` find everything it must remove.
    """

    def __getattr__(self, name: str) -> Any:
        """Attributes a wrapper lacks fall through to its `base_layer`, so timm code that reads e.g.
        `attn.num_heads`, `norm.normalized_shape` or `fc1.in_features` keeps working on it."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

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
    # lr on peftvision's embedded 32-px backbones (weakly pretrained, a few dozen steps), measured there;
    # None: `default_lr` x the backbone's `lr_scale`
    embedded_lr: ClassVar[float | None] = None
    kind: ClassVar[str] = "peft"  # "baseline" (linear, full, BitFit): listed first, as tables show them
    identity_at_init: ClassVar[bool] = True  # an injected model computes what the base did (zero-init update)
    # start the head from a linear probe on the frozen features (LP-FT, Kumar et al. 2022) unless a run
    # says otherwise (`head_init`): on real photos of 60-800 images it beat a random head for LoRA
    # (benchmarks/RESULTS.md, regime table); a method that measures worse with it sets False
    probe_head: ClassVar[bool] = True
    # the head's lr as a fraction of the run's when it starts from a probe (`head_lr_ratio`). A probe head
    # already fits the frozen features, so its gradients are small; AdamW normalises them and moves every
    # head weight by about lr a step anyway, which on a few dozen photos is noise added to a fitted head.
    # 1: the head trains with the rest; 0: the probe's head is kept and the method learns features for it
    probe_head_lr_ratio: ClassVar[float] = 1.0
    trains_base_weights: ClassVar[bool] = False  # unfreezes weights of the base rather than adding modules
    # nothing but the head trains: with a probe head the run is one convex fit that picks its own L2,
    # so lr and weight decay do not apply (compare's search runs one point, not the whole grid)
    head_only: ClassVar[bool] = False
    # name fragments of the parameters that get no gradient on the first step because a zero-initialised
    # factor follows them (LoRA's A before B = 0); the tests hold every other trainable tensor to a gradient
    silent_at_init: ClassVar[tuple[str, ...]] = ()
    examples: ClassVar[tuple[Mapping[str, Any], ...]] = ()  # option sets the tests run besides the defaults
    # the value an option takes in a saved config that lacks it (written before the option existed),
    # where that differs from today's default: old adapter files keep meaning what they meant
    saved_defaults: ClassVar[Mapping[str, Any]] = {}

    def expected_params(self, model: nn.Module, backbone: Backbone, config: Any) -> int:
        """Closed-form count of the parameters the method trains besides the head, read off the plain
        base model (before `inject`); the tests hold `inject` to it."""
        raise NotImplementedError(f"{self.name} declares no closed-form parameter count")

    def starts_as_base(self, config: Any) -> bool:
        """True if the injected model computes exactly what the base did until the first step: its
        features are the base's (cacheable, probe-able before `prepare`). Default: `identity_at_init`."""
        return self.identity_at_init

    def silent_parameters(self, config: Any) -> tuple[str, ...]:
        """`silent_at_init` for this config (a zero gate silences what it gates)."""
        return self.silent_at_init

    def inject(self, model: nn.Module, backbone: Backbone, config: Any) -> None:
        """Add the method's modules to `model` in place. Outputs must stay unchanged where the method
        is zero-initialised."""

    def trainable_parameters(self, model: nn.Module, backbone: Backbone, config: Any) -> Iterator[nn.Parameter]:
        """Parameters to train besides the head. Default: those of every `PeftModule` in the model."""
        for module in model.modules():
            if isinstance(module, PeftModule):
                yield from module.adapter_parameters()

    def prepare(self, model: nn.Module, backbone: Backbone, config: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A data-aware step after `inject` and before training, run once per run (never on resume: what
        it decides must live in the method's persistent buffers, which the adapter file and the training
        checkpoint carry). `batches` yields (images, labels) of the training data. Default: nothing --
        only methods that choose their parameters from the task's data (GPS) need it."""

    def lr_multipliers(self, model: nn.Module, backbone: Backbone, config: Any) -> dict[str, float]:
        """{parameter name: factor on the run's lr} for parameters that should learn faster or slower than
        the rest (LoRA+'s B); the optimizer applies it on top of layer decay. Default: none."""
        return {}

    def grad_checkpointing_unsupported(self, backbone: Backbone, config: Any) -> str | None:
        """None if activation checkpointing (recomputing blocks in backward) is safe, else why not."""
        return None

    def mergeable(self, config: Any) -> str | None:
        """None if `merge` can fold the method into plain timm weights, else the reason it cannot."""
        return f"{self.name} adds computation that is not a weight update, so it cannot be merged"

    def merge(self, model: nn.Module, backbone: Backbone, config: Any) -> None:
        """Fold the method into the base weights and remove every `PeftModule`, in place."""

    def serve_parts(self, model: nn.Module, backbone: Backbone, config: Any) -> list[Part]:
        """What the loaded adapter in `model` adds to the frozen base, as `_parts` a multi-adapter
        model batches per sample. The head is not a part: every method trains one, it is served
        generically. Default: the method's modules are opaque, so its samples get their own model."""
        return [OwnModel(model)]

    def prompt_tokens(self, model: nn.Module, backbone: Backbone, config: Any) -> tuple[int, bool]:
        """(tokens the method inserts into each block's sequence, new ones at every block?) -- what
        `explain` must leave out of a map over the image. Default: none."""
        return 0, False

    def exportable(self, config: Any) -> str | None:
        """None if `to_peft` can write the method in HF PEFT's format, else the reason it cannot."""
        exporters = [m for m in list_methods() if get_method(m).exportable.__func__ is not Method.exportable]
        return f"{self.name} has no HF PEFT equivalent (methods that export: {', '.join(exporters) or 'none'})"

    def to_peft(self, model: nn.Module, backbone: Backbone, config: Any) -> tuple[Any, dict[str, Any]]:
        """(a `peft.PeftConfig`, {tensor name in the base model's namespace: tensor}) for HF PEFT export; a
        name starting with `base_model.` is taken as PEFT's own (VeRA's shared projections)."""
        raise PeftVisionError(self.exportable(config) or f"{self.name}: no HF PEFT export")


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by name everywhere (API, CLI, trainer, tests)."""
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Registered names: baselines first, then the PEFT methods, each in registration order."""
    return [n for n, c in _METHODS.items() if c.kind == "baseline"] + [n for n, c in _METHODS.items() if c.kind != "baseline"]


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]()
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(list_methods())}") from None


def default_lr(method: str, model: str) -> float:
    """The lr a run of `method` on `model` gets when none is given: the method's own for real pretrained
    backbones, or its `embedded_lr` on an embedded backbone (`peftvision.backbones.weights`)."""
    from ..backbones.weights import embedded_lr_scale

    m = get_method(method)
    scale = embedded_lr_scale(model)
    if scale is None:
        return m.default_lr
    return m.embedded_lr if m.embedded_lr is not None else m.default_lr * scale


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


def saved_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """A saved config's options, with what the method's `saved_defaults` says for keys the file lacks."""
    return {**get_method(method).saved_defaults, **options}


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
