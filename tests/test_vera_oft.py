"""VeRA and OFT: their math, and HF PEFT parity of their exports (outputs equal to 1e-6; measured: 0)."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import BACKBONES, FAMILIES, make_input, make_model, randomize_trainable

import peftvision as pv
from peftvision.methods.oft import OFTLinear, block_size_for
from peftvision.methods.vera import VeRALinear

PARITY_ATOL = 1e-6  # fp32; the export has been bitwise equal on this machine


def _trained(family: str, checkpoint: str, method: str, **options):
    name, kwargs, _ = BACKBONES[family]
    model = pv.create_model(name, checkpoint=checkpoint, num_classes=5, **kwargs)
    pv.inject(model, method, **options)
    randomize_trainable(model)
    return model.eval()


def _peft_outputs(tmp_path, family: str, checkpoint: str, model, x):
    from peft import PeftModel

    pv.export_peft(model, tmp_path)
    name, kwargs, _ = BACKBONES[family]
    base = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint), num_classes=5, **kwargs)
    base = base.eval()
    plain = base(x)
    return plain, PeftModel.from_pretrained(base, str(tmp_path)).eval()(x)


# ----------------------------------------------------------------------------- VeRA

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", [{}, dict(targets=("v", "proj", "fc1", "fc2"), r=16, seed=3), dict(targets=("qkv",), d_initial=1.0)],
                         ids=["default", "v-proj-mlp", "qkv"])
def test_vera_export_equals_peft(tmp_path, base_checkpoint, family, options):
    ckpt = base_checkpoint(family)
    model = _trained(family, ckpt, "vera", **options)
    x = make_input(family)
    y = model(x)
    plain, peft_y = _peft_outputs(tmp_path, family, ckpt, model, x)
    assert not torch.allclose(plain, y, atol=1e-4)
    torch.testing.assert_close(peft_y, y, rtol=0, atol=PARITY_ATOL)


def test_vera_projections_are_peft_draws_from_the_seed_and_not_saved(tmp_path):
    """A and B come from the seed exactly as PEFT draws them (so even PEFT's `save_projection=False`
    would agree); the adapter file holds only the scaling vectors and the head."""
    from peft import VeraConfig, get_peft_model

    model = pv.inject(make_model("swin"), "vera", r=32, seed=7, targets=("qkv", "fc2"))
    peft_model = get_peft_model(make_model("swin"), VeraConfig(r=32, projection_prng_key=7, target_modules=r".*\.(attn\.qkv|mlp\.fc2)"))
    assert torch.equal(model.vera.vera_A, peft_model.base_model.vera_A["default"])
    assert torch.equal(model.vera.vera_B, peft_model.base_model.vera_B["default"])
    out = pv.save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter.safetensors"))
    assert not any("vera_A" in k or "vera_B" in k for k in saved)
    per_layer = sum(v.numel() for k, v in saved.items() if not k.startswith("head"))
    assert per_layer == pv.param_report(model).method_params  # r + rows per layer: a few KB


def test_vera_update_is_the_scaled_random_product():
    model = pv.inject(make_model("vit"), "vera", r=8, targets=("q", "v"))
    randomize_trainable(model)
    layer = model.blocks[0].attn.qkv
    assert isinstance(layer, VeRALinear)
    a, b = model.vera.vera_A[:, :64], model.vera.vera_B[: 3 * 64]
    dense = torch.zeros(3 * 64, 64)
    rows = torch.cat([torch.arange(0, 64), torch.arange(128, 192)])
    dense[rows] = (layer.vera_lambda_b[:, None] * b[rows]) @ (layer.vera_lambda_d[:, None] * a)
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.base_layer.weight + dense, layer.bias))
    assert dense[64:128].abs().sum() == 0  # k untouched


# ----------------------------------------------------------------------------- OFT

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", [{}, dict(block_size=5, targets=("proj", "fc2")), dict(block_size=32, targets=("qkv",))],
                         ids=["default", "adjusted-blocks", "b32-qkv"])
def test_oft_export_equals_peft(tmp_path, base_checkpoint, family, options):
    ckpt = base_checkpoint(family)
    model = _trained(family, ckpt, "oft", **options)
    x = make_input(family)
    y = model(x)
    plain, peft_y = _peft_outputs(tmp_path, family, ckpt, model, x)  # PEFT warns where it adjusts a block size
    assert not torch.allclose(plain, y, atol=1e-4)
    torch.testing.assert_close(peft_y, y, rtol=0, atol=PARITY_ATOL)


def test_oft_rotations_are_orthogonal_and_keep_the_angles_between_neurons():
    model = pv.inject(make_model("vit"), "oft", block_size=8)
    randomize_trainable(model, std=0.3)
    layer = model.blocks[2].mlp.fc1
    assert isinstance(layer, OFTLinear)
    r = layer.rotations()
    eye = torch.eye(8).expand_as(r)
    torch.testing.assert_close(r @ r.transpose(-2, -1), eye, rtol=0, atol=1e-5)
    assert not torch.allclose(r, eye, atol=1e-2)
    w0, w = layer.base_layer.weight, layer.weight.detach()
    torch.testing.assert_close(w @ w.t(), w0 @ w0.t(), rtol=0, atol=1e-4)  # pairwise dot products of rows: kept
    x = torch.randn(3, w.shape[1])
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, layer.bias), rtol=0, atol=1e-5)


def test_oft_block_sizes_are_adjusted_as_peft_does():
    from peft.tuners.oft.layer import OFTLayer

    for width in (24, 48, 64, 96, 192, 768, 3072):
        for size in (2, 5, 7, 8, 16, 32, 100, 5000):
            expected = size if width % size == 0 else OFTLayer.adjust_oft_parameters(None, width, size)
            assert block_size_for(width, size) == expected, (width, size)

