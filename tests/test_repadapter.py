"""RepAdapter: the grouped linear adapter written out by hand, and its fold into the following Linear."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, make_input, make_model, randomize_trainable

import peftvision as pv
from peftvision.errors import ConfigError, UnsupportedModelError
from peftvision.methods.repadapter import RepAdapterLinear


def test_adapter_is_a_grouped_linear_map_before_the_linear():
    model = pv.inject(make_model("vit"), "rep-adapter", dim=8, groups=2, scale=3.0, dropout=0.0)
    randomize_trainable(model)
    layer = model.blocks[1].mlp.fc1
    assert isinstance(layer, RepAdapterLinear)
    x = torch.randn(2, 5, 64)
    down = torch.nn.functional.linear(x, layer.adapter_down.weight, layer.adapter_down.bias)  # (.., 8)
    # group i of the up-projection reads hidden units 4i..4i+3 and writes outputs 32i..32i+31
    up = torch.cat([down[..., 4 * i : 4 * i + 4] @ layer.adapter_up[i].t() for i in range(2)], -1) + layer.adapter_up_bias
    expected = torch.nn.functional.linear(x + 3.0 * up, layer.base_layer.weight, layer.base_layer.bias)
    torch.testing.assert_close(layer(x), expected)
    assert layer.up_dense()[:32, 4:].abs().sum() == 0 and layer.up_dense()[32:, :4].abs().sum() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_merged_model_is_the_base_architecture_with_folded_weights(family):
    base = make_model(family).eval()
    model = pv.inject(copy.deepcopy(base), "rep-adapter", scale=10.0)
    randomize_trainable(model)
    x = make_input(family)
    y = model.eval()(x)
    merged = pv.merge(model)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())  # no extra cost
    torch.testing.assert_close(merged(x), y, rtol=0, atol=1e-5)
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])}
    assert changed and all(n.endswith(("attn.qkv.weight", "attn.qkv.bias", "mlp.fc1.weight", "mlp.fc1.bias")) or n.startswith("head") for n in changed)


def test_dropout_is_on_the_adapter_branch_only_while_training():
    model = pv.inject(make_model("vit"), "rep-adapter", dropout=0.5)
    randomize_trainable(model)
    x = make_input("vit")
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))


def test_models_whose_attention_adds_its_own_qv_biases_are_refused():
    model = pv.create_model("beit_base_patch16_224", num_classes=3, img_size=32, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(UnsupportedModelError, match="no bias of its own to fold rep-adapter into .* choose targets without qkv"):
        pv.inject(model, "rep-adapter")
    pv.inject(model, "rep-adapter", targets=("fc1",))  # its MLP is a plain Linear


@pytest.mark.parametrize("bad,message", [
    (dict(dim=6, groups=4), r"dim \(6\) must be a multiple of groups \(4\)"),
    (dict(targets=("qkv", "norm")), "targets must be distinct names among qkv, proj, fc1, fc2"),
])
def test_bad_options_are_one_line(bad, message):
    with pytest.raises(ConfigError, match=message):
        pv.inject(make_model("vit"), "rep-adapter", **bad)
