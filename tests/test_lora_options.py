"""LoRA's options (rsLoRA scaling, LoRA+ lr ratio, PiSSA init), the math of each, and what DoRA inherits."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from conftest import BACKBONES, FAMILIES, make_input, make_model, randomize_trainable
from torch import nn

import peftvision as pv
from peftvision.errors import ConfigError
from peftvision.methods.lora import LoRALinear
from peftvision.training.config import TrainConfig
from peftvision.training.loop import build_optimizer, build_scheduler, current_lr


def _qkv(model: nn.Module) -> LoRALinear:
    return model.get_submodule(pv.get_state(model).backbone.blocks[0].name + ".attn.qkv")


def test_rslora_scales_by_alpha_over_sqrt_r():
    plain = _qkv(pv.inject(make_model("vit"), "lora", r=4, alpha=6))
    stable = _qkv(pv.inject(make_model("vit"), "lora", r=4, alpha=6, use_rslora=True))
    assert plain.scaling == pytest.approx(6 / 4) and stable.scaling == pytest.approx(6 / math.sqrt(4))
    randomize_trainable(stable)
    a, b = stable.lora_A.detach(), stable.block_b().detach()
    torch.testing.assert_close(stable.delta_weight(), 6 / 2 * b @ a)


def _optimizer(model: nn.Module, **cfg) -> tuple[torch.optim.Optimizer, object]:
    config = TrainConfig(method=pv.get_state(model).method, lr=1e-3, weight_decay=0.05, **cfg)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, 0, 10)
    scheduler.step_update(3)
    return optimizer, scheduler


def _lr_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("layer_decay", [None, 0.7])
def test_lora_plus_gives_b_its_lr_ratio_on_top_of_layer_decay(method, layer_decay):
    ratio = pv.inject(make_model("vit"), method, lr_ratio=16.0)
    plain = pv.inject(make_model("vit"), method)
    opt_ratio, _ = _optimizer(ratio, layer_decay=layer_decay)
    opt_plain, _ = _optimizer(plain, layer_decay=layer_decay)
    got, ref = _lr_of(opt_ratio), _lr_of(opt_plain)
    ref_by_name = {n: ref[id(p)] for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in ratio.named_parameters():
        if p.requires_grad:  # every tensor keeps its group's lr (weight / layer decay), B times 16
            factor = 16.0 if name.endswith("lora_B") else 1.0
            assert got[id(p)] == pytest.approx(factor * ref_by_name[name]), name
    assert {g["weight_decay"] for g in opt_ratio.param_groups} == {g["weight_decay"] for g in opt_plain.param_groups}
    assert sum(len(g["params"]) for g in opt_ratio.param_groups) == len(ref_by_name)
    assert current_lr(opt_ratio) == pytest.approx(current_lr(opt_plain))  # the logged lr is the schedule's


def test_methods_without_multipliers_get_timms_own_groups():
    model = pv.inject(make_model("vit"), "lora")
    optimizer, _ = _optimizer(model)
    assert all("lr_scale" not in g for g in optimizer.param_groups)


@pytest.mark.parametrize("family", FAMILIES)
def test_pissa_starts_from_the_principal_directions_with_the_residual_frozen(family):
    base = make_model(family).eval()
    x = make_input(family)
    model = pv.inject(copy.deepcopy(base), "lora", r=4, alpha=8, init="pissa", targets=("q", "v", "fc1")).eval()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # (B - B0) A + B0 (A - A0) is exactly 0
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        w = base.get_submodule(name).weight.detach()
        for i, s in enumerate(m.slices):
            rows = w[s * m.width : (s + 1) * m.width]
            u, sv, vh = torch.linalg.svd(rows, full_matrices=False)
            principal = m.scaling * m.lora_B0[i] @ m.lora_A0[i * 4 : (i + 1) * 4]
            torch.testing.assert_close(principal, u[:, :4] * sv[:4] @ vh[:4], rtol=0, atol=1e-5)
            residual = torch.linalg.svdvals(rows - principal)
            torch.testing.assert_close(residual[: len(sv) - 4], sv[4:], rtol=0, atol=1e-5)  # what is left is frozen
        assert torch.equal(m.lora_A, m.lora_A0) and torch.equal(m.lora_B, m.lora_B0)  # training starts there


def test_pissa_trains_the_principal_part_and_merges_exports_and_reloads_exactly(tmp_path, base_checkpoint):
    from peft import PeftModel

    ckpt = base_checkpoint("vit")
    name, kwargs, _ = BACKBONES["vit"]
    model = pv.create_model(name, checkpoint=ckpt, num_classes=5, **kwargs)
    w0 = model.blocks[1].attn.qkv.weight.detach().clone()
    pv.inject(model, "lora", r=4, init="pissa", targets=("q", "k", "v", "proj"))
    randomize_trainable(model)
    model.eval()
    x = make_input("vit")
    y = model(x)
    qkv = model.blocks[1].attn.qkv
    assert torch.equal(qkv.base_layer.weight, w0), "the base weight is never rewritten"
    # what it computes: the frozen residual plus the trained principal factors
    s = qkv.scaling
    residual = w0 - s * qkv.block_b(qkv.lora_B0) @ qkv.lora_A0
    torch.testing.assert_close(qkv.weight, residual + s * qkv.block_b() @ qkv.lora_A, rtol=0, atol=1e-5)
    torch.testing.assert_close(pv.merge(model)(x), y, rtol=0, atol=1e-5)
    pv.export_peft(model, tmp_path / "peft")
    plain = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=ckpt), num_classes=5, **kwargs)
    torch.testing.assert_close(PeftModel.from_pretrained(plain.eval(), str(tmp_path / "peft")).eval()(x), y, rtol=0, atol=1e-5)
    out = pv.save_adapter(model, tmp_path / "adapter")
    assert "blocks.1.attn.qkv.lora_A0" in pv.get_state(model).state_names  # A0, B0 travel with the adapter
    torch.testing.assert_close(pv.load_adapter(out, checkpoint=ckpt).eval()(x), y, rtol=0, atol=0)


def test_pissa_gradients_are_those_of_lora_on_the_frozen_residual():
    torch.manual_seed(0)
    base = nn.Linear(12, 18).requires_grad_(False)
    layer = LoRALinear(base, (0, 2), 3, r=2, alpha=3.0, dropout=0.0, init="pissa")
    with torch.no_grad():
        layer.lora_A.add_(0.1 * torch.randn_like(layer.lora_A))
        layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
    x, g = torch.randn(5, 12), torch.randn(5, 18)
    layer(x).backward(g)
    a, b = layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True)
    residual = base.weight - 1.5 * layer.block_b(layer.lora_B0) @ layer.lora_A0
    rows = torch.zeros(3, 6, 2, 2)
    rows[0, :, 0, :], rows[2, :, 1, :] = b[0], b[1]
    torch.nn.functional.linear(x, residual + 1.5 * rows.reshape(18, 4) @ a, base.bias).backward(g)
    torch.testing.assert_close(layer.lora_A.grad, a.grad)
    torch.testing.assert_close(layer.lora_B.grad, b.grad)


def test_dora_inherits_rslora_and_lr_ratio_and_refuses_pissa_in_one_line(tmp_path, base_checkpoint):
    from peft import PeftModel

    stable = pv.inject(make_model("vit"), "dora", r=4, use_rslora=True, lr_ratio=4.0)
    assert _qkv(stable).scaling == pytest.approx(8 / 2)
    assert pv.get_method("dora").lr_multipliers(stable, pv.get_state(stable).backbone, pv.get_state(stable).config)
    with pytest.raises(ConfigError, match=r"^dora: init='pissa' is a LoRA option DoRA does not support; use lora"):
        pv.inject(make_model("vit"), "dora", init="pissa")
    ckpt = base_checkpoint("vit")
    name, kwargs, _ = BACKBONES["vit"]
    model = pv.create_model(name, checkpoint=ckpt, num_classes=5, **kwargs)
    pv.inject(model, "dora", r=4, use_rslora=True, targets=("q", "v"))
    randomize_trainable(model)
    x = make_input("vit")
    y = model.eval()(x)
    pv.export_peft(model, tmp_path)
    plain = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=ckpt), num_classes=5, **kwargs)
    torch.testing.assert_close(PeftModel.from_pretrained(plain.eval(), str(tmp_path)).eval()(x), y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad,message", [
    (dict(init="olora"), "init must be one of default, pissa"),
    (dict(lr_ratio=0), "lr_ratio must be positive"),
])
def test_bad_lora_options_are_one_line(bad, message):
    with pytest.raises(ConfigError, match=message):
        pv.inject(make_model("vit"), "lora", **bad)
