"""VPT's zero-init gate: gated prompts learn from a closed start, and files written before it stay ungated.

The gate's math (softmax over the image's own keys + gate x softmax over the prompts) is held to
hand-written references in test_methods.py; that zero gates compute the base model exactly is the
registry's identity test (gated is the default).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, make_input, make_model

import peftvision as pv
from peftvision.errors import UnsupportedModelError
from peftvision.methods import build_config, get_method


def _gates(model: torch.nn.Module) -> list[torch.Tensor]:
    g = model.vpt.gates
    return list(g) if isinstance(g, torch.nn.ParameterList) else [g]


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_learn_at_their_own_lr_and_the_prompts_follow(family):
    model = pv.inject(make_model(family), "vpt-deep", num_tokens=2)
    state = pv.get_state(model)
    method = get_method("vpt-deep")
    multipliers = method.lr_multipliers(model, state.backbone, state.config)
    gate_names = {n for n, _ in model.named_parameters() if n.startswith("vpt.gates")}
    assert multipliers == {n: 10.0 for n in gate_names} and gate_names
    assert method.lr_multipliers(model, state.backbone, build_config("vpt-deep", {"gate_lr_ratio": 1})) == {}

    prompts = [p.detach().clone() for p in model.vpt.prompts] if family == "swin" else [model.vpt.prompts.detach().clone()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = make_input(family), torch.tensor([0, 1])
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(g.abs().sum() > 0 for g in _gates(model)), "the closed gates open on the first step"
    after = list(model.vpt.prompts) if family == "swin" else [model.vpt.prompts]
    assert all(torch.equal(a, b) for a, b in zip(after, prompts)), "prompts behind zero gates get no gradient"
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(after, prompts)), "once a gate is open the prompts learn"


@pytest.mark.parametrize("family", FAMILIES)
def test_an_adapter_file_from_before_the_gate_loads_ungated(tmp_path, family):
    model = pv.inject(make_model(family), "vpt-deep", num_tokens=2, gate=False).eval()
    x = make_input(family)
    with torch.no_grad():
        expected = model(x)
    directory = pv.save_adapter(model, tmp_path / "old")
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for key in ("gate", "gate_lr_ratio"):  # what a file written before the option has
        config["method_config"].pop(key)
    config_file.write_text(json.dumps(config))
    loaded = pv.load_adapter(directory, make_model(family)).eval()
    assert loaded.vpt.gates is None and pv.get_state(loaded).config.gate is False
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_a_gated_adapter_round_trips_with_its_gates(tmp_path):
    model = pv.inject(make_model("vit"), "vpt-deep", num_tokens=2).eval()
    with torch.no_grad():
        model.vpt.gates.normal_()
    x = make_input("vit")
    with torch.no_grad():
        expected = model(x)
    loaded = pv.load_adapter(pv.save_adapter(model, tmp_path / "gated"), make_model("vit")).eval()
    torch.testing.assert_close(loaded.vpt.gates, model.vpt.gates, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_gated_prompts_refuse_an_attention_they_cannot_gate():
    model = make_model("vit")
    for block in model.blocks:  # an attention without timm's fused qkv (as in EVA-style models)
        block.attn.qkv = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="gate=false"):
        pv.inject(model, "vpt-deep")
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in model.blocks), "refused: no hook left behind"
