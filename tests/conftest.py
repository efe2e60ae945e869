"""Tiny timm backbones shared by the tests: every test runs on each family in seconds on 2 CPU cores."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (pretraining) is not installed

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub call must fail fast, never hang on retries
# No test reads or writes the user's caches (~/.cache/peftvision, the Hugging Face cache, matplotlib's):
# they all live in one temporary directory for the session, removed at exit.
_SANDBOX = Path(tempfile.mkdtemp(prefix="peftvision-tests-"))
atexit.register(shutil.rmtree, _SANDBOX, ignore_errors=True)
os.environ["PEFTVISION_CACHE"] = str(_SANDBOX / "peftvision")
os.environ["HF_HOME"] = str(_SANDBOX / "huggingface")
for _var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE"):
    os.environ.pop(_var, None)
os.environ["MPLCONFIGDIR"] = str(_SANDBOX / "matplotlib")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# name -> (timm name, kwargs, input size). Kwargs keep each model tiny; they are recorded by
# peftvision.create_model so that load_adapter can rebuild the same architecture.
BACKBONES = {
    "vit": ("test_vit", dict(img_size=64), 64),  # 6 blocks, width 64, class token, token pooling
    "vit-map": ("test_vit3", dict(img_size=32), 32),  # attention-pool head reads the patch tokens
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2, 2), num_heads=(2, 2, 4)),
        32,
    ),
}
FAMILIES = ["vit", "swin"]


def make_model(kind: str, num_classes: int = 5, seed: int = 0, **extra):
    import peftvision as pv

    name, kwargs, _ = BACKBONES[kind]
    torch.manual_seed(seed)
    return pv.create_model(name, num_classes=num_classes, **{**kwargs, **extra})


def make_input(kind: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = BACKBONES[kind][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_trainable(model, std: float = 0.05, seed: int = 2) -> None:
    """Move every trainable tensor away from its initialisation, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def base_checkpoint(tmp_path):
    """Write a tiny model's weights to a local file, as users pass with --checkpoint."""

    def write(kind: str, seed: int = 0):
        from safetensors.torch import save_file

        model = make_model(kind, seed=seed)
        path = tmp_path / f"{kind}-{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return str(path)

    return write


@pytest.fixture(scope="session")
def backbone_checkpoint(tmp_path_factory) -> str:
    """Random-init weights of the embedded ViT architecture in a local file.

    The pipeline tests (finetune, compare, eval, DDP) pass it as `--model pv_vit_tiny_32 --checkpoint
    FILE`, so they test training, files and resumption whether or not the pretrained weights are
    installed; tests of the shipped weights themselves live in test_models.py.
    """
    from safetensors.torch import save_file

    import peftvision as pv

    torch.manual_seed(0)
    model = pv.create_model("pv_vit_tiny_32")
    path = tmp_path_factory.mktemp("backbone") / "pv_vit_tiny_32-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)
