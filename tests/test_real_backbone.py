"""The main job on a real pretrained backbone and real photos (../shared; skipped where it is absent).

The backbone is a real ViT-Tiny/16 (ImageNet, then Tiny-ImageNet) and the photos are 1,000 ImageNet
images in four coarse classes; see ../shared/README.md. Neither is copied into the package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import peftvision as pv
from peftvision.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared"
BACKBONE = SHARED / "backbones" / "vit_tiny_patch16_224.in1k_tin200.safetensors"
PHOTOS = SHARED / "data" / "imagenet-sample-coarse4"
CLASSES = ("bird", "dog", "object", "other_animal")

pytestmark = pytest.mark.skipif(
    not (BACKBONE.is_file() and PHOTOS.is_dir()), reason=f"the real backbone and photos are not in {SHARED}"
)


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """Every class of the photos, a quarter of each, as symbolic links (a real user layout, cheaper)."""
    root = tmp_path_factory.mktemp("coarse4-quarter")
    for cls in CLASSES:
        (root / cls).mkdir()
        for f in sorted((PHOTOS / cls).iterdir())[::4]:
            (root / cls / f.name).symlink_to(f)
    return root


def test_real_backbone_loads_from_a_local_file_and_is_pretrained():
    """--checkpoint loads the real weights (the 200-class head is dropped for a new one), and the
    frozen features already separate the photos: a sanity check of the file and of the transform."""
    model = pv.create_model("vit_tiny_patch16_224", checkpoint=str(BACKBONE), num_classes=4).eval()
    random = pv.create_model("vit_tiny_patch16_224", num_classes=4).eval()
    assert model.head.out_features == 4
    from safetensors.torch import load_file

    saved = load_file(str(BACKBONE))
    torch.testing.assert_close(model.blocks[3].attn.qkv.weight, saved["blocks.3.attn.qkv.weight"])
    assert not torch.allclose(random.blocks[3].attn.qkv.weight, saved["blocks.3.attn.qkv.weight"])


def test_short_lora_run_beats_its_linear_probe(tmp_path, subset):
    """The real-backbone case end to end with every default (split, crop, lr, schedule): LoRA adapts
    the backbone and must beat the linear probe trained by the same pipeline on the same images."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common = ["--model", "vit_tiny_patch16_224", "--checkpoint", str(BACKBONE), "--dataset", f"imagefolder:{subset}",
              "--epochs", "3", "--batch-size", "32", "--quiet"]
    results = {}
    for method in ("linear", "lora"):
        assert main(["finetune", "--method", method, "--output", str(tmp_path / method), *common]) == 0
        results[method] = json.loads((tmp_path / method / "metrics.json").read_text())
    lora, linear = results["lora"], results["linear"]
    assert lora["splits"]["test"]["images"] == linear["splits"]["test"]["images"] == 50
    assert lora["resize"] == "crop" and lora["lr"] == pv.get_method("lora").default_lr  # the real-backbone default
    # ~200 training photos, no val/: a 10% slice (~20) could not pick an epoch, so every photo outside the
    # test hold-out trains and the last epoch is kept
    assert lora["selection"]["keep"] == "last" and "too few" in lora["selection"]["why"], lora["selection"]
    photos = sum(1 for _ in subset.glob("*/*"))
    assert lora["splits"]["train"]["images"] == photos - 50 and lora["head_init"]["init"] == "probe"
    assert lora["test_top1"] > 60, lora  # chance is 25% (60% of the photos are one class: objects)
    assert lora["test_top1"] > linear["test_top1"], (lora["test_top1"], linear["test_top1"])
