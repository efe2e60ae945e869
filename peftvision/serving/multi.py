"""One frozen backbone, many adapters, mixed in one batch: `MultiAdapterModel`.

Each adapter is loaded as its method's `serve_parts` (low-rank updates, bottlenecks, bias values,
affines, prompts, or a model of its own) plus its head. The parts of one kind at one site are stacked
over the adapters that have them, slot 0 being all zeros, by the part kind itself
(`methods/_parts.py`); a forward hook on the base module gathers each sample's slot and applies the
stack, so the cost does not grow with the number of distinct adapters in a batch and no Python loop
runs over adapters.

Samples are grouped only where the computation differs in shape (a part's `route`): adapters with
prompts run a pass per prompt group (same kind, token count and gating), an adapter with a model of its own
(full fine-tuning) runs that model. Everything else -- LoRA, bottleneck adapters, BitFit, linear
heads, the plain base -- shares one pass. The base's modules are never replaced: the hooks act only
inside this class's forward, so `model.base(x)` is the plain timm model.
"""

from __future__ import annotations

import copy
import itertools
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.format import WEIGHTS_NAME, read_adapter_config
from ..adapters.hub import resolve_adapter
from ..adapters.io import load_adapter
from ..backbones.backbone import (
    architecture_signature,
    create_model,
    describe,
    load_model,
    model_spec,
    weights_fingerprint,
)
from ..data import input_size, labels
from ..errors import (
    AdapterExistsError,
    AdapterFileError,
    BaseMismatchError,
    ConfigError,
    PeftVisionError,
    UnknownAdapterError,
)
from ..methods import get_method
from ..methods._parts import Apply, Part, Prompts, SitePart, stack_rows
from ..methods.freeze import get_state, param_report, unwrap

BASE = "base"  # the name that selects the plain backbone and its own head


@dataclass
class AdapterInfo:
    """A loaded adapter, as `GET /adapters` lists it."""

    name: str
    directory: str
    method: str
    num_classes: int
    classes: list[str]
    trainable_params: int
    adapter_bytes: int
    resize: str
    parts: list[Part] = field(repr=False)
    head: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(repr=False)  # path -> (C, D), (C,)
    route: tuple = ("shared",)  # ("shared",) | ("prompts", group) | ("own",)

    def describe(self) -> dict[str, Any]:
        keys = ("name", "method", "num_classes", "classes", "trainable_params", "adapter_bytes")
        return {k: getattr(self, k) for k in keys}


class _Stack:
    """One kind of part at one site (or a head), stacked over the adapters that have it (slot 0: none)."""

    def __init__(self, names: list[str], apply: Apply | None, tensors: tuple[torch.Tensor, ...] = ()) -> None:
        self.slot = {n: i + 1 for i, n in enumerate(names)}
        self.apply = apply
        self.tensors = tensors


def _short(fingerprint: str) -> str:
    return fingerprint.split(":")[-1][:12]


@dataclass
class _Head:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor | None  # (C,)

    def __post_init__(self) -> None:
        if self.bias is None:
            self.bias = self.weight.new_zeros(self.weight.shape[0])


# ----------------------------------------------------------------------------- the model

class MultiAdapterModel(nn.Module):
    """A frozen timm model serving many adapters at once: `model(x, adapters=["a", "b", "a"])`.

    Every sample's logits equal those of its own adapter's model (unmerged or merged); a batch that
    mixes adapters with different class counts is padded with -inf (probability 0) to the widest.

    Args:
        base_model: the plain timm model every adapter was trained on (not modified).
        adapters: {name: adapter directory or hub adapter `hf:USER/NAME[@REVISION]`} to load now; more can
            be added with `add_adapter`.
        ignore_fingerprint: accept adapters trained on other weights of the same architecture.
    """

    def __init__(
        self,
        base_model: nn.Module,
        adapters: Mapping[str, str | os.PathLike] | None = None,
        ignore_fingerprint: bool = False,
    ) -> None:
        super().__init__()
        base = unwrap(base_model)
        if get_state(base) is not None:
            raise PeftVisionError("MultiAdapterModel needs the plain base model, not one with a method injected")
        self.base = base.eval().requires_grad_(False)
        self.backbone = describe(base)
        self.base_name = model_spec(base).name
        self.fingerprint = weights_fingerprint(base, self.backbone)
        self.signature = architecture_signature(base, self.backbone)
        self.ignore_fingerprint = ignore_fingerprint
        self.input_size = tuple(input_size(base))  # (C, H, W) every batch must have
        self._base_has_head = isinstance(base.get_submodule(self.backbone.head_names[0]), nn.Linear)
        self._transforms: dict[str, Callable[[Any], torch.Tensor]] = {}  # per resize mode
        self._ref = next(base.parameters())
        self._adapters: dict[str, AdapterInfo] = {}
        self._own: nn.ModuleDict = nn.ModuleDict()  # models of adapters that share no weights
        self._prompts: dict[tuple, tuple[Any, dict[str, int]]] = {}  # group -> (routed module, member rows)
        self._sites: dict[str, list[_Stack]] = {}
        self._heads: dict[str, _Stack] = {}
        self._handles: list[Any] = []
        self._names: list[str] | None = None  # adapter of each sample in the pass that is running
        self._slots: dict[int, torch.Tensor | None] = {}
        self._lock = threading.RLock()  # adding / removing adapters vs. a forward in another thread
        for name, directory in (adapters or {}).items():
            self.add_adapter(name, directory)

    @classmethod
    def from_adapters(
        cls, adapters: Mapping[str, str | os.PathLike], checkpoint: str | None = None,
        pretrained: bool = True, ignore_fingerprint: bool = False,
    ) -> "MultiAdapterModel":
        """Build the base the adapters name (from the hub, or `checkpoint`) and load them all."""
        if not adapters:
            raise ConfigError("no adapters given")
        info = read_adapter_config(resolve_adapter(next(iter(adapters.values()))))["model"]
        name, kwargs = info["name"], info.get("kwargs") or {}
        if checkpoint is None:
            base = create_model(name, pretrained=pretrained, **kwargs)
        else:  # keep the checkpoint's own head (any size) for "base" predictions, if it has one
            try:
                base = load_model(name, checkpoint=checkpoint, **kwargs)
            except PeftVisionError:
                base = create_model(name, checkpoint=checkpoint, **kwargs)
        return cls(base, adapters, ignore_fingerprint=ignore_fingerprint)

    # ------------------------------------------------------------------------- adapters

    @property
    def device(self) -> torch.device:
        return self._ref.device

    @property
    def dtype(self) -> torch.dtype:
        return self._ref.dtype

    @property
    def adapters(self) -> list[AdapterInfo]:
        return list(self._adapters.values())

    def __contains__(self, name: str) -> bool:
        return name == BASE or name in self._adapters

    def info(self, name: str) -> AdapterInfo:
        if name not in self._adapters:
            loaded = ", ".join(self._adapters) or "none"
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded (loaded: {loaded}; or {BASE!r})")
        return self._adapters[name]

    def add_adapter(self, name: str, directory: str | os.PathLike) -> AdapterInfo:
        """Load the adapter in `directory` as `name`; refused if it was trained on another base."""
        if not name or name == BASE or "/" in name:
            raise ConfigError(f"bad adapter name {name!r}: use a non-empty name without '/', other than {BASE!r}")
        with self._lock:
            if name in self._adapters:
                raise AdapterExistsError(f"an adapter named {name!r} is already loaded; remove it first")
            adapter = self._load(name, directory)
            self._adapters[name] = adapter
            if adapter.route[0] == "own":
                self._own[name] = next(p.model for p in adapter.parts if p.route == "own")
            try:
                self._rebuild()
            except PeftVisionError:
                self._adapters.pop(name)
                if name in self._own:
                    del self._own[name]
                self._rebuild()
                raise
            return adapter

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            self.info(name)
            del self._adapters[name]
            if name in self._own:
                del self._own[name]
            self._rebuild()

    def _check_base(self, name: str, directory: Any, config: dict[str, Any]) -> None:
        trained_on = config["model"].get("name")
        if config["architecture_signature"] != self.signature:
            raise BaseMismatchError(
                f"adapter {name!r} ({directory}) was trained on {trained_on}, a different architecture "
                f"from this model's base {self.base_name}"
            )
        method = get_method(config["method"])
        if not (method.saves_backbone or self.ignore_fingerprint) and config["base_fingerprint"] != self.fingerprint:
            raise BaseMismatchError(
                f"adapter {name!r} ({directory}) was trained on other weights of {trained_on} "
                f"(fingerprint {_short(config['base_fingerprint'])}) than this base {self.base_name} "
                f"({_short(self.fingerprint)}); serve it over the checkpoint it was trained on"
            )

    def _load(self, name: str, directory: str | os.PathLike) -> AdapterInfo:
        local = resolve_adapter(directory)  # a hub adapter (hf:USER/NAME) downloads once, here
        config = read_adapter_config(local)
        self._check_base(name, directory, config)
        method = get_method(config["method"])
        num_classes = config["model"].get("num_classes")
        self._uninstall()  # the copy below must not carry this model's hooks
        try:
            if method.trains_base_weights or method.saves_backbone:
                shell = copy.deepcopy(self.base)  # it writes into base weights: they must be its own
            else:  # new modules, the base's tensors: an adapter costs its own size only
                memo = {id(t): t for t in itertools.chain(self.base.parameters(), self.base.buffers())}
                shell = copy.deepcopy(self.base, memo)
        finally:
            self._install()
        if num_classes is not None:
            shell.reset_classifier(num_classes)
        model = load_adapter(local, model=shell.to(self._ref.device), ignore_fingerprint=True).eval()
        state = get_state(model)
        parts = method.serve_parts(model, describe(model), state.config)
        params = dict(model.named_parameters())
        head = {
            path: (params[f"{path}.weight"].detach(), params[f"{path}.bias"].detach() if f"{path}.bias" in params else None)
            for path in self.backbone.head_names if f"{path}.weight" in params
        }
        routes = {p.route for p in parts}
        if not head and "own" not in routes:
            raise AdapterFileError(f"adapter {name!r} ({directory}) has no linear classifier head to serve")
        groups = [p.group for p in parts if p.route == "prompts"]
        route = ("own",) if "own" in routes else ("prompts", groups[0]) if groups else ("shared",)
        return AdapterInfo(
            name=name, directory=str(directory), method=state.method, num_classes=int(model.num_classes),
            classes=list(state.class_names) if state.class_names else [str(i) for i in range(model.num_classes)],
            trainable_params=param_report(model).trainable,
            adapter_bytes=(local / WEIGHTS_NAME).stat().st_size, resize=state.resize or "crop",
            parts=parts, head=head, route=route,
        )

    # ------------------------------------------------------------------------- stacking

    def _rebuild(self) -> None:
        """Stack every site's parts over the loaded adapters and hook the sites (after any change)."""
        self._uninstall()
        by_key: dict[tuple, list[tuple[str, SitePart]]] = {}
        prompt_groups: dict[tuple, list[tuple[str, Prompts]]] = {}
        for name, adapter in self._adapters.items():
            for part in adapter.parts:
                if part.route == "shared":
                    by_key.setdefault(part.key(), []).append((name, part))
                elif part.route == "prompts":
                    prompt_groups.setdefault(part.group, []).append((name, part))
        self._sites = {}
        for members in sorted(by_key.values(), key=lambda members: members[0][1].order):
            first = members[0][1]
            apply = type(first).stack([p for _, p in members], self.base.get_submodule(first.site), self._ref)
            self._sites.setdefault(first.site, []).append(_Stack([n for n, _ in members], apply))
        self._prompts = {
            group: (Prompts.stack([p for _, p in members]), {n: i for i, (n, _) in enumerate(members)})
            for group, members in prompt_groups.items()
        }
        self._heads = {path: self._head_stack(path) for path in self.backbone.head_names}
        self._install()

    def _head_stack(self, path: str) -> _Stack:
        members = [(n, a) for n, a in self._adapters.items() if path in a.head]
        heads = [_Head(*a.head[path]) for _, a in members]
        ref = self._ref
        width = max([h.weight.shape[0] for h in heads], default=1)
        weights = stack_rows(heads, "weight", (heads[0].weight.shape[1] if heads else 1, width), ref, transpose=True)
        biases = stack_rows(heads, "bias", (width,), ref)
        for (_, adapter), h in zip(members, heads):  # the adapters now hold views into the stack
            adapter.head[path] = (h.weight, h.bias)
        return _Stack([n for n, _ in members], None, (weights, biases))

    # ------------------------------------------------------------------------- hooks

    def _install(self) -> None:
        for site, stacks in self._sites.items():
            self._handles.append(self.base.get_submodule(site).register_forward_hook(self._site_hook(stacks)))
        for path, stack in self._heads.items():
            self._handles.append(self.base.get_submodule(path).register_forward_hook(self._head_hook(stack)))

    def _uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _slots_for(self, stack: _Stack) -> torch.Tensor | None:
        """Each sample's slot in `stack` for the running pass (None: no sample uses it, skip it)."""
        key = id(stack)
        if key not in self._slots:
            slots = [stack.slot.get(n, 0) for n in self._names]
            self._slots[key] = torch.tensor(slots, device=self._ref.device) if any(slots) else None
        return self._slots[key]

    def _site_hook(self, stacks: list[_Stack]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._names is None:
                return None
            for stack in stacks:
                slots = self._slots_for(stack)
                if slots is not None:
                    output = stack.apply(slots, args[0], output)
            return output

        return hook

    def _head_hook(self, stack: _Stack) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._names is None:
                return None
            slots = self._slots_for(stack)
            if slots is None:  # only the base's own head
                return None
            x = args[0]  # (b, D)
            weights, biases = stack.tensors  # (S, D, C), (S, C)
            logits = torch.baddbmm(biases[slots].unsqueeze(1), x.unsqueeze(1), weights[slots]).squeeze(1)  # (b, C)
            base_rows = slots == 0
            if bool(base_rows.any()):
                width = max(logits.shape[1], output.shape[1])
                logits = F.pad(logits, (0, width - logits.shape[1]))
                logits[base_rows] = F.pad(output[base_rows], (0, width - output.shape[1]))
            return logits

        return hook

    # ------------------------------------------------------------------------- forward

    def num_classes(self, name: str) -> int:
        return int(getattr(self.base, "num_classes", 0)) if name == BASE else self.info(name).num_classes

    def _check(self, x: torch.Tensor, names: list[str]) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_size:
            raise ConfigError(f"images must be (B, {', '.join(map(str, self.input_size))}), got {tuple(x.shape)}")
        if len(names) != x.shape[0]:
            raise ConfigError(f"{len(names)} adapter names for a batch of {x.shape[0]} images")
        for n in set(names):
            if n == BASE:
                if not self._base_has_head:
                    raise ConfigError(f"the base {self.base_name} has no classifier head to predict with")
            else:
                self.info(n)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, adapters: str | Iterable[str] | None = None) -> torch.Tensor:
        """(B, C) logits, sample i through adapter `adapters[i]` (a single name: every sample;
        None or "base": the plain model). C is the widest head in the batch; narrower ones pad with -inf."""
        names = [adapters or BASE] * x.shape[0] if adapters is None or isinstance(adapters, str) else list(adapters)
        with self._lock:
            self._check(x, names)
            groups: dict[tuple, list[int]] = {}
            for i, n in enumerate(names):
                route = ("shared",) if n == BASE else self._adapters[n].route
                groups.setdefault(route + ((n,) if route == ("own",) else ()), []).append(i)
            widths = torch.tensor([self.num_classes(n) for n in names], device=x.device)
            out = x.new_full((x.shape[0], int(widths.max())), float("-inf"))
            for route, rows in groups.items():
                sub = [names[i] for i in rows]
                logits = self._run(route, x if len(rows) == len(names) else x[rows], sub)
                logits = logits[:, : out.shape[1]]  # stacked heads are as wide as the widest loaded one
                width = logits.shape[1]
                keep = torch.arange(width, device=x.device) < widths[rows].unsqueeze(1)  # (b, width)
                out[rows, :width] = torch.where(keep, logits.to(out.dtype), out.new_tensor(float("-inf")))
            return out

    def _run(self, route: tuple, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        if route[0] == "own":
            return self._own[route[1]](x)
        self._names, self._slots = names, {}
        detach = None
        try:
            if route[0] == "prompts":
                module, members = self._prompts[route[1]]
                module.rows = torch.tensor([members[n] for n in names], device=x.device)
                detach = module.attach(self.base, self.backbone)
            return self.base(x)
        finally:
            self._names, self._slots = None, {}
            if detach is not None:
                detach()
                module.rows = None

    # ------------------------------------------------------------------------- images

    def transform(self, name: str) -> Callable[[Any], torch.Tensor]:
        """The eval preprocessing `name` was trained with (PIL image -> (C, H, W))."""
        from ..data import make_transform

        resize = "crop" if name == BASE else self.info(name).resize
        if resize not in self._transforms:
            self._transforms[resize] = make_transform(self.base, train=False, resize=resize)
        return self._transforms[resize]

    def classes(self, name: str) -> list[str]:
        return [str(i) for i in range(self.num_classes(name))] if name == BASE else self.info(name).classes

    def predict(self, images: list[Any], adapters: list[str], top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-k {label, index, score} per PIL image, each through its adapter, in one batched pass."""
        for n in adapters:
            if n not in self:
                self.info(n)
        x = torch.stack([self.transform(n)(img) for img, n in zip(images, adapters)])
        return self.top_k(x, adapters, top_k)

    def probabilities(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """(B, C) softmax probabilities per preprocessed image, each over its adapter's own classes
        (0 in the columns past them)."""
        return self(x.to(self.device, self.dtype), adapters).float().softmax(-1)

    def top_k(self, x: torch.Tensor, adapters: list[str], k: int | list[int] = 5) -> list[list[dict[str, Any]]]:
        """Top-k {label, index, score} (softmax probabilities, descending) per preprocessed image."""
        probs = self.probabilities(x, adapters)
        ks = [k] * len(adapters) if isinstance(k, int) else k
        return [labels.top_k(row[: self.num_classes(n)], self.classes(n), kk) for row, n, kk in zip(probs, adapters, ks)]
