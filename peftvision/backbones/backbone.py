"""Create timm backbones and describe their structure for the methods.

Everything a method needs to know about a model -- its family, where its transformer blocks are,
their width, the attention's fused qkv, the MLP, the classifier head -- is read here from the module
structure and `pretrained_cfg`, never from the model's name. Methods receive a `Backbone` and stay
ignorant of timm's class names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConfigError, PeftVisionError, UnsupportedModelError

Family = Literal["vit", "swin"]


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block, by module path, so that it survives `deepcopy` and re-wrapping."""

    name: str  # "blocks.3" (ViT) or "layers.1.blocks.0" (Swin)
    stage: int  # Swin stage index; 0 for every ViT block
    dim: int  # token width entering the block


@dataclass(frozen=True)
class Backbone:
    """The structure of a timm ViT- or Swin-family model, as found by `describe`."""

    architecture: str
    family: Family
    blocks: tuple[BlockInfo, ...]
    head_names: tuple[str, ...]  # from pretrained_cfg["classifier"]; may name an nn.Identity
    num_prefix_tokens: int = 0  # ViT: class + register + distillation tokens
    stage_names: tuple[str, ...] = ()  # Swin: "layers.0", ...
    patch_size: tuple[int, int] = (16, 16)

    def block_module(self, model: nn.Module, block: BlockInfo, child: str = "") -> nn.Module:
        """`model.<block>.<child>`, with a clear error when the block lacks that child."""
        path = f"{block.name}.{child}" if child else block.name
        try:
            return model.get_submodule(path)
        except AttributeError:
            raise UnsupportedModelError(
                f"{self.architecture}: block {block.name} has no `{child}` module "
                f"(peftvision expects timm's `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`)"
            ) from None

    def linear(self, model: nn.Module, block: BlockInfo, child: str) -> nn.Linear:
        """A Linear inside a block (`attn.qkv`, `mlp.fc1`, ...), or a clear error naming it."""
        module = self.block_module(model, block, child)
        # A method may already have wrapped it; the wrapper exposes the original as `base_layer`.
        base = getattr(module, "base_layer", module)
        if not isinstance(base, nn.Linear):
            raise UnsupportedModelError(
                f"{self.architecture}: `{block.name}.{child}` is a {type(base).__name__}, not a Linear layer"
            )
        return base

    def is_head(self, name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in self.head_names)


def architecture_of(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _block_dim(block: nn.Module) -> int:
    for path in ("norm1", "attn.qkv", "mlp.fc1"):
        try:
            m = block.get_submodule(path)
        except AttributeError:
            continue
        m = getattr(m, "base_layer", m)
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[0])
        if isinstance(m, nn.Linear):
            return m.in_features
    raise UnsupportedModelError(f"cannot tell the token width of block {type(block).__name__}")


def _is_transformer_block(block: nn.Module) -> bool:
    return hasattr(block, "attn") and hasattr(block, "mlp")


def _head_names(model: nn.Module, arch: str) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or "head"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    found = []
    for name in names:
        try:
            model.get_submodule(name)
            found.append(name)
        except AttributeError:
            continue
    if not found:
        raise UnsupportedModelError(
            f"{arch}: pretrained_cfg['classifier'] names {names}, but the model has no such module"
        )
    return tuple(found)


def describe(model: nn.Module) -> Backbone:
    """Find the blocks, widths and head of a timm ViT- or Swin-family model.

    Raises:
        UnsupportedModelError: the model has no transformer blocks in either layout.
    """
    arch = architecture_of(model)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (int(patch), int(patch))
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and all(
        _is_transformer_block(b) for b in blocks
    ):
        infos = tuple(BlockInfo(f"blocks.{i}", 0, _block_dim(b)) for i, b in enumerate(blocks))
        npt = getattr(model, "num_prefix_tokens", None)
        if npt is None:
            npt = int(getattr(model, "cls_token", None) is not None)
        return Backbone(arch, "vit", infos, _head_names(model, arch), int(npt), patch_size=patch)

    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.Sequential, nn.ModuleList)) and len(layers) and all(
        hasattr(s, "blocks") and len(s.blocks) and all(_is_transformer_block(b) for b in s.blocks)
        for s in layers
    ):
        infos = tuple(
            BlockInfo(f"layers.{s}.blocks.{j}", s, _block_dim(b))
            for s, stage in enumerate(layers)
            for j, b in enumerate(stage.blocks)
        )
        stages = tuple(f"layers.{s}" for s in range(len(layers)))
        return Backbone(arch, "swin", infos, _head_names(model, arch), 0, stages, patch)

    raise UnsupportedModelError(
        f"{arch}: no transformer blocks found; peftvision needs a timm ViT-family model "
        f"(`blocks[i].attn` / `.mlp`) or Swin-family model (`layers[s].blocks[j]`)"
    )


# ----------------------------------------------------------------------------- identity of the base

def _base_items(model: nn.Module, backbone: Backbone) -> list[tuple[str, torch.Tensor]]:
    """Persistent tensors of the backbone, head excluded (a new head is random by construction)."""
    return sorted((k, v) for k, v in model.state_dict().items() if not backbone.is_head(k.rsplit(".", 1)[0]))


def architecture_signature(model: nn.Module, backbone: Backbone) -> str:
    """A hash of the architecture name and every non-head tensor's name and shape."""
    h = hashlib.sha256(backbone.architecture.encode())
    for k, v in _base_items(model, backbone):
        h.update(f"{k}:{tuple(v.shape)};".encode())
    return "sha256:" + h.hexdigest()[:32]


def weights_fingerprint(model: nn.Module, backbone: Backbone, samples: int = 1024) -> str:
    """A hash of the base weights' values, sampled at a fixed stride so ViT-L hashes in milliseconds.

    Two checkpoints that differ at all almost surely differ at the sampled positions: fine-tuning
    moves every weight, and different pre-trainings share none.
    """
    h = hashlib.sha256()
    for k, v in _base_items(model, backbone):
        flat = v.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(k.encode())
        h.update(flat[::step].to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


# ----------------------------------------------------------------------------- creating models

@dataclass
class ModelSpec:
    """What `load_adapter` needs to rebuild a base: timm only records the name, not the kwargs."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def model_spec(model: nn.Module) -> ModelSpec:
    """How to rebuild `model` with timm: recorded by `create_model`, else read off `pretrained_cfg`."""
    spec = getattr(model, "peftvision_spec", None)
    if isinstance(spec, ModelSpec):
        return spec
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = architecture_of(model)
    if cfg.get("tag"):
        name = f"{name}.{cfg['tag']}"
    kwargs: dict[str, Any] = {}
    # The one kwarg users commonly change on plain timm models; timm does not record it.
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None and cfg.get("input_size") and tuple(img) != tuple(cfg["input_size"][1:]):
        kwargs["img_size"] = list(img)
    return ModelSpec(name, kwargs)


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint: str | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """`timm.create_model` that remembers its arguments and turns hub failures into one-line errors.

    Args:
        name: any timm model name, optionally with a pretrained tag (`vit_base_patch16_224.augreg_in1k`).
        pretrained: load pretrained weights (from the hub, or from `checkpoint`).
        checkpoint: a local safetensors/pth weights file for this architecture; implies `pretrained`.
        num_classes: size of the new classifier head.
        **kwargs: architecture overrides passed to timm (img_size, embed_dim, depths, ...).
    """
    import timm

    from .embedded import register_default_models

    register_default_models()  # peftvision's own small pretrained backbones
    try:
        json.dumps(kwargs)
    except TypeError:
        raise ConfigError(f"model kwargs must be plain values (numbers, strings, lists): {kwargs}") from None
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ConfigError(f"unknown timm model {name!r}{hint}")
    create_kwargs = dict(kwargs)
    if num_classes is not None:
        create_kwargs["num_classes"] = num_classes
    if checkpoint is not None:
        _check_weights_file(checkpoint)
        create_kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint))
        pretrained = True
    try:
        model = timm.create_model(name, pretrained=pretrained, **create_kwargs)
    except (OSError, ValueError) as e:  # hub errors subclass OSError / ValueError in huggingface_hub
        if checkpoint is None and pretrained and _looks_offline(e):
            raise PeftVisionError(
                f"cannot download weights for {name!r} (no network?): pass a local weights file "
                f"with --checkpoint FILE / checkpoint=..."
            ) from None
        raise PeftVisionError(f"cannot create {name!r}: {_first_line(e)}") from None
    except RuntimeError as e:  # timm: shape mismatch when loading a checkpoint of another architecture
        raise PeftVisionError(f"cannot load weights into {name!r}: {_first_line(e)}") from None
    model.peftvision_spec = ModelSpec(name, kwargs)
    return model


def load_model(name: str, checkpoint: str | None = None, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """A timm model with every weight, the head included, from a complete checkpoint (a merged adapter,
    a fine-tuned model); without one, `create_model(name, pretrained=True)`.

    `create_model` drops a checkpoint's head unless its size is the registered one (a new head is what
    fine-tuning wants); a model to use as it is needs its own head, so here the head's size is read
    from a safetensors file and every tensor is loaded strictly. Other file types go through timm's
    loader, with `num_classes` as given. The preprocessing `save_merged` records in the file's
    metadata becomes the model's `pretrained_cfg` (squashed images for a model trained on them).
    """
    if checkpoint is None or not str(checkpoint).endswith(".safetensors"):
        return create_model(name, pretrained=True, checkpoint=checkpoint, num_classes=num_classes, **kwargs)
    from safetensors import safe_open

    from ..files import load_tensors

    _check_weights_file(checkpoint)
    tensors = load_tensors(checkpoint)  # a damaged file: one line
    with safe_open(str(checkpoint), "pt") as f:
        metadata = f.metadata() or {}
    model = create_model(name, **kwargs)
    heads = [tensors[f"{h}.weight"] for h in describe(model).head_names if f"{h}.weight" in tensors]
    size = int(heads[0].shape[0]) if heads else num_classes
    if num_classes is not None and size != num_classes:
        raise ConfigError(f"{checkpoint} has a {size}-class head, not {num_classes}: leave out --num-classes")
    if size is not None and size != model.num_classes:
        model.reset_classifier(size)
    own = model.state_dict()
    wrong = sorted(set(own) ^ set(tensors)) + [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
    if wrong:
        raise PeftVisionError(
            f"{checkpoint} is not a complete {name!r} checkpoint: {len(wrong)} tensors missing, extra or of "
            f"another shape ({', '.join(wrong[:3])}); give the architecture it was saved from"
        )
    model.load_state_dict(tensors)
    prep = json.loads(metadata.get("peftvision.preprocessing", "{}"))
    overrides = {k: prep[k] for k in ("crop_pct", "crop_mode") if k in prep}
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **overrides}
    return model


def _check_weights_file(path: str) -> None:
    import os

    if not os.path.isfile(path):
        raise PeftVisionError(f"checkpoint file not found: {path}")


def _looks_offline(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(s in text for s in ("offline", "connection", "resolve", "localentrynotfound", "network", "hub"))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
