"""VPT's prototype start (`init="prototypes"`, SPT, Wang et al. 2024): each prompt layer begins at k-means
centres of the patch tokens that layer receives in the frozen model, drawn from the training images by
`prepare`. The default stays VPT's xavier noise (measured: benchmarks/RESULTS.md)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, make_input, make_model

import peftvision as pv
from peftvision.errors import ConfigError
from peftvision.methods import vpt as vpt_module
from peftvision.methods.vpt import _kmeans, _prompt_slots

PROMPTED = ["vpt-shallow", "vpt-deep"]


def _batches(family: str, n: int = 2, size: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(make_input(family, batch=size, seed=10 + i), torch.zeros(size, dtype=torch.long)) for i in range(n)]


def test_kmeans_recovers_separated_clusters_as_their_means():
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.3 * torch.randn(40, 2, generator=g) for c in centres])
    found = _kmeans(points, 3, torch.Generator().manual_seed(0))
    means = torch.stack([points[i * 40:(i + 1) * 40].mean(0) for i in range(3)])
    order = torch.cdist(means, found).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(found[order], means, rtol=0, atol=1e-5)


def test_kmeans_with_fewer_points_than_centres_repeats_the_points():
    points = torch.arange(6.0).reshape(2, 3)
    found = _kmeans(points, 5, torch.Generator().manual_seed(0))
    assert found.shape == (5, 3) and all(any(torch.equal(row, p) for p in points) for row in found)


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", PROMPTED)
def test_prompts_switched_off_compute_the_base_model(family, method, gate):
    base = make_model(family).eval()
    model = pv.inject(copy.deepcopy(base), method, num_tokens=3, gate=gate).eval()
    x = make_input(family)
    with torch.no_grad():
        if gate:  # zero gates compute the base model too (the registry's identity test): open them
            for g in model.vpt.gates if isinstance(model.vpt.gates, torch.nn.ParameterList) else [model.vpt.gates]:
                g.normal_()
        assert not torch.allclose(model(x), base(x)), "prompts change the output when on"
        model.vpt.off = True
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", PROMPTED)
def test_prepare_puts_each_prompt_at_the_mean_of_the_base_tokens_nearest_it(family, method, monkeypatch):
    """With every token kept, each layer's prompts are a Lloyd fixed point of that layer's base tokens."""
    monkeypatch.setattr(vpt_module, "_PROTO_TOKENS", 10**6)
    base = make_model(family).eval()
    model = pv.inject(copy.deepcopy(base), method, num_tokens=3, init="prototypes")
    batches = _batches(family)
    backbone = pv.describe(base)
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, _ in _prompt_slots(model.vpt, backbone):  # the same blocks of the plain base model
        def keep(block, args, name=name):
            x = args[0]
            seen.setdefault(name, []).append(x[:, backbone.num_prefix_tokens:].flatten(0, 1) if family == "vit" else x.flatten(0, 2))
        hooks.append(base.get_submodule(name).register_forward_pre_hook(keep))
    with torch.no_grad():
        for images, _ in batches:
            base.forward_features(images)
    for h in hooks:
        h.remove()

    before = [p.detach().clone() for _, p in _prompt_slots(model.vpt, backbone)]
    pv.prepare(model, iter(batches))
    slots = _prompt_slots(model.vpt, backbone)
    assert len(slots) == (1 if method == "vpt-shallow" else len(backbone.blocks))
    for (name, prompt), old in zip(slots, before):
        tokens = torch.cat(seen[name])
        assign = torch.cdist(tokens, prompt.detach()).argmin(1)
        assert not torch.equal(prompt, old)
        for j in range(prompt.shape[0]):
            assert (assign == j).any(), f"{name}: prompt {j} is nobody's nearest centre"
            torch.testing.assert_close(prompt[j].detach(), tokens[assign == j].mean(0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_prepare_is_deterministic_and_xavier_skips_it(family):
    batches = _batches(family)
    a = pv.inject(make_model(family), "vpt-deep", num_tokens=3, init="prototypes")
    b = pv.inject(make_model(family), "vpt-deep", num_tokens=3, init="prototypes")
    pv.prepare(a, iter(batches))
    pv.prepare(b, iter(batches))
    for p, q in zip(a.vpt.parameters(), b.vpt.parameters()):
        assert torch.equal(p, q)
    c = pv.inject(make_model(family), "vpt-deep", num_tokens=3)  # the default: VPT's own start
    before = [p.detach().clone() for p in c.vpt.parameters()]
    pv.prepare(c, iter([]))  # no data needed: nothing is read
    assert all(torch.equal(p, q) for p, q in zip(c.vpt.parameters(), before))


def test_prototypes_without_training_images_say_so():
    model = pv.inject(make_model("vit"), "vpt-deep", init="prototypes")
    with pytest.raises(ConfigError, match="needs training images"):
        pv.prepare(model, iter([]))
    with pytest.raises(ConfigError, match="init must be prototypes or xavier"):
        pv.inject(make_model("vit"), "vpt-deep", init="zeros")


@pytest.mark.parametrize("gate", [False, True])
def test_finetune_starts_the_prompts_before_fitting_the_probe(tmp_path, backbone_checkpoint, monkeypatch, gate):
    """The probe must be fitted on the features training starts from: ungated prompts are prepared first;
    gated ones start closed (the base's features), so the probe comes first and may use cached features."""
    from peftvision.training import probe as probe_module
    from peftvision.training.config import TrainConfig
    from peftvision.training.finetune import finetune

    order: list[str] = []
    prepare, probe = vpt_module._VPT.prepare, probe_module.probe_head

    def recording_prepare(self, *args, **kwargs):
        order.append("prepare")
        return prepare(self, *args, **kwargs)

    def recording_probe(*args, **kwargs):
        order.append("probe")
        return probe(*args, **kwargs)

    monkeypatch.setattr(vpt_module._VPT, "prepare", recording_prepare)
    monkeypatch.setattr(probe_module, "probe_head", recording_probe)
    config = TrainConfig(method="vpt-deep", model="pv_vit_tiny_32", checkpoint=backbone_checkpoint, epochs=1,
                         batch_size=100, num_workers=0, quiet=True, max_test=100, options={"init": "prototypes", "gate": gate},
                         output=str(tmp_path / "run"))
    finetune(config)
    assert order == (["probe", "prepare"] if gate else ["prepare", "probe"])
