"""The small pretrained backbones that ship inside peftvision: names, architectures, files.

This module is plain Python (no torch, no timm) so that the CLI can name the default model in its
`--help` without paying for imports. `peftvision.backbones.embedded` registers these names with timm; the
weights themselves are `<name>.safetensors` next to this file, with `<name>.json` recording how
they were made (data, steps, wall time, upstream accuracy), both written by `python -m
tools.pretrain` (run from a source checkout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).resolve().parent

# Inputs are 32x32 RGB scaled to [-1, 1]: the built-in tasks are small images, and at 32x32 a
# 2.7M-parameter ViT pretrains in under an hour on two CPU cores.
INPUT_SIZE = (3, 32, 32)
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

# Architecture kwargs per shipped model: `timm.create_model(<name>)` builds exactly this, and
# the pretraining script reads it from here, so the two cannot drift apart.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "pv_vit_tiny_32": dict(
        family="vit",
        # Mean-pooled patch tokens (as timm's MAE-style ViTs) rather than the class token: every token
        # gets a gradient from the pooled objectives, which a small ViT needs to train in minutes.
        kwargs=dict(
            img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0, global_pool="avg"
        ),
        classifier="head",
        # A timm entry point of the same class: with `kwargs` it builds this architecture in plain timm,
        # without peftvision (what `export --format timm` names, so timm users need nothing of ours)
        timm_entry="vit_tiny_patch16_224",
        # Each method's default lr is for real pretrained backbones (ImageNet-scale weights, as timm's).
        # These small, weakly pretrained 32-px models, fine-tuned for a few dozen steps, want larger
        # steps: each method declares its measured lr for them (`Method.embedded_lr`,
        # benchmarks/default-lr.md), and lr_scale x its real-backbone lr stands in where it declares none.
        lr_scale=10.0,
    ),
    "pv_swin_tiny_32": dict(
        family="swin",
        kwargs=dict(
            img_size=32, patch_size=2, window_size=4, embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12)
        ),
        classifier="head.fc",
        timm_entry="swin_tiny_patch4_window7_224",
        lr_scale=10.0,
    ),
}

DEFAULT_MODEL = "pv_vit_tiny_32"
DEFAULT_MODELS = tuple(ARCHITECTURES)

# Classes of the pretraining task = size of the shipped head (`pretrained_cfg["num_classes"]`): the
# shapes of `tools.pretrain.scenes.SHAPES` (a test keeps the two equal).
PRETRAIN_CLASSES = 16


def embedded_lr_scale(model: str) -> float | None:
    """The lr scale of an embedded backbone (`pv_vit_tiny_32`, ...), None for any other model."""
    arch = ARCHITECTURES.get(model.split(".", 1)[0])
    return None if arch is None else float(arch["lr_scale"])


def weights_path(name: str) -> Path:
    """Where the safetensors file of a shipped model lives (it may not exist in a source checkout)."""
    return WEIGHTS_DIR / f"{name}.safetensors"


def metadata_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.json"


def metadata(name: str) -> dict[str, Any]:
    """How the shipped weights were made, as recorded by the pretraining run ({} when absent)."""
    path = metadata_path(name)
    return json.loads(path.read_text()) if path.is_file() else {}
