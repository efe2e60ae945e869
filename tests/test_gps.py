"""GPS: the selection really is the top-K by gradient, only the selected weights move, and the selection
travels with the adapter file and the training checkpoint (the data-aware `prepare` step runs once)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, make_input, make_model, randomize_trainable

import peftvision as pv
from peftvision.errors import PeftVisionError
from peftvision.methods.gps import GPS, GPSLinear, _SparseLinear, supcon_loss
from peftvision.training.config import TrainConfig
from peftvision.training.finetune import finetune


def _batches(family: str, n: int = 2, size: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(make_input(family, batch=size, seed=10 + i), torch.tensor([0, 1, 2, 0, 1, 2][:size])) for i in range(n)]


def _reference_scores(base: torch.nn.Module, batches, loss: str) -> dict[str, torch.Tensor]:
    """|accumulated gradient| of every block Linear's weight, computed on a plain copy of the base."""
    model = copy.deepcopy(base).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    for images, labels in batches:
        if loss == "supcon":
            views = torch.cat([images, images.flip(-1)])
            feats = model.forward_head(model.forward_features(views), pre_logits=True)
            supcon_loss(feats.flatten(1), torch.cat([labels, labels]), 0.07).backward()
        else:
            F.cross_entropy(model(images), labels).backward()
    return {n.rsplit(".", 1)[0]: p.grad.abs() for n, p in model.named_parameters()
            if n.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")) and "patch_embed" not in n}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loss,k", [("supcon", 1), ("ce", 3)])
def test_prepare_selects_the_top_k_inputs_by_gradient_per_neuron(family, loss, k):
    base = make_model(family)
    batches = _batches(family)
    model = pv.inject(copy.deepcopy(base), "gps", k=k, loss=loss)
    pv.prepare(model, iter(batches))
    scores = _reference_scores(base, batches, loss)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GPSLinear)}
    assert set(layers) == set(scores)
    for name, layer in layers.items():
        chosen = layer.gps_index.long()
        top = scores[name].topk(k, dim=1)
        # the chosen inputs' scores are the top-K scores of their row (set-equal up to ties)
        torch.testing.assert_close(scores[name].gather(1, chosen).sort(1).values, top.values.sort(1).values, rtol=1e-4, atol=1e-9)
        assert (layer.gps_delta == 0).all()
    # the step leaves the model as it found it: frozen weights frozen, no gradients, same mode
    assert all(p.grad is None for p in model.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(pv.get_state(model).trainable_names)
    assert model.training


def test_the_selection_uses_the_data_not_the_weights():
    base = make_model("vit")
    a = pv.inject(copy.deepcopy(base), "gps", loss="ce")
    b = pv.inject(copy.deepcopy(base), "gps", loss="ce")
    placeholder = a.blocks[0].mlp.fc1.gps_index.clone()  # the K largest |W|, before any data
    pv.prepare(a, iter(_batches("vit")))
    pv.prepare(b, iter([(make_input("vit", batch=6, seed=99), torch.tensor([2, 2, 1, 1, 0, 0]))]))
    assert not torch.equal(a.blocks[0].mlp.fc1.gps_index, placeholder)
    assert not torch.equal(a.blocks[0].mlp.fc1.gps_index, b.blocks[0].mlp.fc1.gps_index)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_selected_weights_move_and_the_merge_is_exact(family):
    base = make_model(family).eval()
    model = pv.inject(copy.deepcopy(base), "gps", k=2, loss="ce")
    pv.prepare(model, iter(_batches(family)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for images, labels in _batches(family, n=3):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    model.eval()
    x = make_input(family)
    y = model(x)
    merged = pv.merge(model)
    torch.testing.assert_close(merged(x), y, rtol=0, atol=1e-5)
    plain = dict(base.named_parameters())
    for name, layer in model.named_modules():
        if isinstance(layer, GPSLinear):
            moved = merged.get_submodule(name).weight - plain[f"{name}.weight"]
            mask = torch.zeros_like(moved, dtype=torch.bool).scatter(1, layer.gps_index.long(), True)
            assert moved[~mask].abs().max() == 0 and moved[mask].abs().sum() > 0, name


def test_sparse_linear_gradients_equal_the_dense_update():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 10, dtype=torch.double, requires_grad=True)
    weight = torch.randn(5, 10, dtype=torch.double, requires_grad=True)  # as in the selection pass
    bias = torch.randn(5, dtype=torch.double, requires_grad=True)
    index = torch.stack([torch.randperm(10)[:3] for _ in range(5)]).to(torch.int32)
    delta = torch.randn(5, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _SparseLinear.apply(t[0], t[1], t[2], index, t[3]), (x, weight, bias, delta))
    dense = torch.zeros(5, 10, dtype=torch.double).scatter_add(1, index.long(), delta)
    torch.testing.assert_close(_SparseLinear.apply(x, weight, bias, index, delta), F.linear(x, weight + dense, bias))


def test_selection_travels_with_the_adapter_file(tmp_path, base_checkpoint):
    from conftest import BACKBONES
    from safetensors.torch import load_file

    ckpt = base_checkpoint("swin")
    name, kwargs, _ = BACKBONES["swin"]
    model = pv.inject(pv.create_model(name, checkpoint=ckpt, num_classes=5, **kwargs), "gps", k=2)
    pv.prepare(model, iter(_batches("swin")))
    randomize_trainable(model)
    x = make_input("swin")
    y = model.eval()(x)
    out = pv.save_adapter(model, tmp_path)
    saved = load_file(str(out / "adapter.safetensors"))
    index_names = [n for n in saved if n.endswith("gps_index")]
    assert len(index_names) == 4 * 6 and saved[index_names[0]].dtype == torch.int32
    loaded = pv.load_adapter(out, checkpoint=ckpt).eval()
    for n in index_names:
        assert torch.equal(loaded.get_buffer(n), model.get_buffer(n))
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


def test_finetune_selects_once_and_a_resume_reads_the_selection_back(tmp_path, backbone_checkpoint, monkeypatch):
    from peftvision.files import load_tensors

    config = TrainConfig(method="gps", model="pv_vit_tiny_32", checkpoint=backbone_checkpoint, epochs=2, batch_size=100,
                         num_workers=0, quiet=True, max_test=100, head_init="random", options={"batches": 2},
                         output=str(tmp_path / "run"))
    calls = []
    prepare = GPS.prepare

    def counting(self, *args, **kwargs):
        calls.append(1)
        return prepare(self, *args, **kwargs)

    def interrupt_after_first(state):
        if state.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(GPS, "prepare", counting)
    with pytest.raises(PeftVisionError, match="interrupted"):
        finetune(config, on_epoch_end=interrupt_after_first)
    assert len(calls) == 1
    index = "blocks.0.attn.qkv.gps_index"
    selected = load_tensors(tmp_path / "run" / "checkpoint" / "state.safetensors")[f"param.{index}"]
    placeholder = pv.inject(pv.create_model("pv_vit_tiny_32", checkpoint=backbone_checkpoint, num_classes=10), "gps")
    assert not torch.equal(selected, placeholder.get_buffer(index)), "finetune ran the selection"

    monkeypatch.setattr(GPS, "prepare", lambda *a, **k: pytest.fail("a resumed run must not select again"))
    assert finetune(config, resume=True)["epochs_run"] == 2
    resumed = pv.load_adapter(tmp_path / "run", checkpoint=backbone_checkpoint)
    assert torch.equal(resumed.get_buffer(index), selected)  # from the checkpoint, into the adapter file
