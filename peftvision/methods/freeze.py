"""Which parameters train, which modules stay in eval mode, and how many parameters that is.

Frozen modules run in eval mode even while the model trains, as in the VPT code: dropout, drop-path
and attention dropout of a frozen backbone stay off, because they were tuned for training the whole
network. A forward pre-hook on the root re-applies this after every `model.train()`, so it survives
trainers, DDP wrappers and `accelerate` without them knowing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..backbones.backbone import Backbone


@dataclass
class PeftState:
    """Everything peftvision attaches to an injected model (as `model.peftvision_state`)."""

    method: str
    config: Any  # the method's config dataclass
    backbone: Backbone
    base_fingerprint: str
    architecture_signature: str
    trainable_names: list[str]  # parameters saved in the adapter file: the method's, then the head's
    head_names: list[str]
    # persistent buffers the method added (e.g. GPS's selected indices, what `prepare` chose from data):
    # not trained, but part of the adapter, so saved with it and in training checkpoints
    state_names: list[str] = field(default_factory=list)
    frozen_modules: list[nn.Module] = field(default_factory=list)
    class_names: list[str] | None = None
    resize: str | None = None  # eval preprocessing it was trained with: crop | squash (None: unknown)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP (`.module`) and torch.compile (`._orig_mod`) wrappers, whose parameter
    names carry a prefix that adapter files must not."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def get_state(model: nn.Module) -> PeftState | None:
    model = unwrap(model)
    state = getattr(model, "peftvision_state", None)
    return state if isinstance(state, PeftState) else None


def require_state(model: nn.Module) -> PeftState:
    """The model's PeftState, or one clear error for a plain model."""
    state = get_state(model)
    if state is None:
        from ..errors import PeftVisionError

        raise PeftVisionError("this model has no peftvision method; call peftvision.inject(model, method) first")
    return state


def _keep_frozen_in_eval(model: nn.Module, args: Any) -> None:
    if model.training:
        for m in model.peftvision_state.frozen_modules:
            m.training = False


def apply_freeze(model: nn.Module, backbone: Backbone, trainable: list[nn.Parameter], freeze_backbone: bool) -> tuple[list[str], list[str], list[nn.Module]]:
    """Set requires_grad on exactly `trainable` + the head; return (method names, head names, frozen modules)."""
    keep = {id(p) for p in trainable}
    method_names, head_names = [], []
    for name, p in model.named_parameters():
        is_head = backbone.is_head(name.rsplit(".", 1)[0])
        p.requires_grad_(is_head or id(p) in keep)
        if is_head:
            head_names.append(name)
        elif id(p) in keep:
            method_names.append(name)
    frozen: list[nn.Module] = []
    if freeze_backbone:
        from . import PeftModule

        # What trains runs in train mode: the head, and each method module with its own submodules --
        # but not a wrapped `base_layer` (an adapter wraps timm's whole `mlp`, whose dropouts belong to
        # the frozen backbone)
        live: set[int] = set()
        for name, m in model.named_modules():
            if name and backbone.is_head(name):
                live.update(id(x) for x in m.modules())
            elif isinstance(m, PeftModule):
                base = getattr(m, "base_layer", None)
                wrapped = {id(x) for x in base.modules()} if isinstance(base, nn.Module) else set()
                live.update(id(x) for x in m.modules() if id(x) not in wrapped)
        frozen = [m for m in model.modules() if id(m) not in live and m is not model]
    return method_names, head_names, frozen


def install_eval_hook(model: nn.Module) -> None:
    model.register_forward_pre_hook(_keep_frozen_in_eval)


def remove_eval_hook(model: nn.Module) -> None:
    # by value, not by handle: a deepcopy'd model holds a copy of the hook dict but the original's handle
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _keep_frozen_in_eval:
            del model._forward_pre_hooks[key]


@dataclass
class ParamReport:
    """Parameter counts of an injected model. `total` counts every parameter, the method's included."""

    method: str
    method_params: int
    head_params: int
    total: int

    @property
    def trainable(self) -> int:
        return self.method_params + self.head_params

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def as_dict(self) -> dict[str, Any]:
        return dict(
            method=self.method, method_params=self.method_params, head_params=self.head_params,
            trainable=self.trainable, total=self.total, percent=self.percent,
        )

    def __str__(self) -> str:
        return (
            f"{self.method}: trainable {self.trainable:,} of {self.total:,} ({self.percent:.3f}%) = "
            f"method {self.method_params:,} + head {self.head_params:,}"
        )


def param_report(model: nn.Module) -> ParamReport:
    """Trainable / total / percent, split into the method's parameters and the head's."""
    from ..errors import PeftVisionError

    state = get_state(model)
    if state is None:
        raise PeftVisionError("this model has no peftvision method; call peftvision.inject(model, method) first")
    params = dict(unwrap(model).named_parameters())
    count = lambda names: sum(params[n].numel() for n in names)  # noqa: E731
    method_names = [n for n in state.trainable_names if n not in set(state.head_names)]
    return ParamReport(state.method, count(method_names), count(state.head_names), sum(p.numel() for p in params.values()))
