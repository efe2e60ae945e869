"""MultiAdapterModel: one backbone pass, every sample through its own adapter, exactly as its own model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, make_input, make_model, randomize_trainable

import peftvision as pv
from peftvision.errors import (
    AdapterExistsError,
    BaseMismatchError,
    ConfigError,
    UnknownAdapterError,
)
from peftvision.methods import get_method
from peftvision.serving.multi import MultiAdapterModel


def _adapters(base, tmp_path, methods=None):
    """Every registered method with each of its example option sets, trained-looking (randomised),
    with head sizes that differ between adapters; {name: (dir, its own model)}."""
    out = {}
    for i, method in enumerate(methods or pv.list_methods()):
        for j, options in enumerate([{}, *get_method(method).examples]):
            model = copy.deepcopy(base)
            model.reset_classifier(3 + (i + j) % 4)
            model = pv.inject(model, method, **options)
            randomize_trainable(model, seed=10 * i + j)
            name = f"{method}-{j}"
            classes = [f"{name}-class{c}" for c in range(model.num_classes)]
            out[name] = (pv.save_adapter(model, tmp_path / name, class_names=classes), model.eval())
    return out


@pytest.fixture(params=FAMILIES)
def served(request, tmp_path):
    base = make_model(request.param, num_classes=7)
    adapters = _adapters(base, tmp_path)
    multi = MultiAdapterModel(base, {n: d for n, (d, _) in adapters.items()})
    return request.param, base, adapters, multi


def test_mixed_batch_equals_each_adapters_own_model(served):
    kind, base, adapters, multi = served
    names = [*adapters, "base"]
    order = names + names[::-1] + names[1::2]  # every adapter, both orders, repeats
    x = make_input(kind, batch=len(order), seed=3)
    out = multi(x, order)
    assert out.shape == (len(order), 7)  # the widest head: the base's 7 classes
    for i, name in enumerate(order):
        ref = (base if name == "base" else adapters[name][1])(x[i : i + 1])[0]
        torch.testing.assert_close(out[i, : ref.numel()], ref, rtol=0, atol=1e-5, msg=f"{kind} {name}")
        assert torch.isneginf(out[i, ref.numel() :]).all()  # classes this adapter does not have: probability 0


def test_the_order_adapters_are_loaded_in_does_not_matter(served):
    kind, base, adapters, multi = served
    backwards = MultiAdapterModel(base, {n: d for n, (d, _) in reversed(adapters.items())})
    names = [*adapters, "base"]
    x = make_input(kind, batch=len(names), seed=8)
    torch.testing.assert_close(backwards(x, names), multi(x, names), rtol=0, atol=1e-5)


def test_single_adapter_batches_and_the_base_stay_plain(served):
    kind, base, adapters, multi = served
    x = make_input(kind, batch=3, seed=4)
    for name, (_, model) in adapters.items():
        torch.testing.assert_close(multi(x, name), model(x), rtol=0, atol=1e-5)
    plain = base(x)
    assert torch.equal(multi(x), plain) and torch.equal(multi.base(x), plain)  # hooks act only inside forward


def test_merged_lora_equals_the_mixed_batch(tmp_path):
    base = make_model("vit", num_classes=4)
    adapters = _adapters(base, tmp_path, methods=["lora"])
    multi = MultiAdapterModel(base, {n: d for n, (d, _) in adapters.items()})
    names = list(adapters) * 2
    x = make_input("vit", batch=len(names), seed=5)
    out = multi(x, names)
    for i, name in enumerate(names):
        merged = pv.merge(adapters[name][1]).eval()
        torch.testing.assert_close(out[i, : merged.num_classes], merged(x[i : i + 1])[0], rtol=0, atol=1e-5)


def test_adapters_added_and_removed_at_run_time(tmp_path):
    base = make_model("vit", num_classes=4)
    adapters = _adapters(base, tmp_path, methods=["lora", "adapter"])
    (a, (dir_a, model_a)), (b, (dir_b, model_b)) = list(adapters.items())[:2]
    multi = MultiAdapterModel(base)
    assert multi.adapters == []
    multi.add_adapter(a, dir_a)
    info = multi.add_adapter(b, dir_b)
    assert info.method == "lora" and info.classes[0] == f"{b}-class0"
    assert info.trainable_params == pv.param_report(model_b).trainable
    x = make_input("vit", batch=2, seed=6)
    torch.testing.assert_close(multi(x, [a, b])[1, : model_b.num_classes], model_b(x[1:])[0], rtol=0, atol=1e-5)
    with pytest.raises(AdapterExistsError, match="already loaded"):
        multi.add_adapter(a, dir_a)
    multi.remove_adapter(a)
    with pytest.raises(UnknownAdapterError, match=f"no adapter named '{a}'"):
        multi(x, [a, b])
    torch.testing.assert_close(multi(x, b), model_b(x), rtol=0, atol=1e-5)  # the others are untouched
    multi.add_adapter(a, dir_a)
    torch.testing.assert_close(multi(x, a)[:, : model_a.num_classes], model_a(x), rtol=0, atol=1e-5)


def test_adapters_of_another_base_are_refused_naming_both(tmp_path):
    base = make_model("vit", num_classes=4)
    other = make_model("vit", num_classes=4, seed=1)  # same architecture, other weights
    pv.save_adapter(pv.inject(copy.deepcopy(other), "lora"), tmp_path / "other")
    pv.save_adapter(pv.inject(make_model("swin"), "lora"), tmp_path / "swin")
    multi = MultiAdapterModel(base)
    with pytest.raises(BaseMismatchError, match=r"other weights of test_vit .*than this base test_vit"):
        multi.add_adapter("other", tmp_path / "other")
    with pytest.raises(BaseMismatchError, match="different architecture"):
        multi.add_adapter("swin", tmp_path / "swin")
    assert multi.adapters == []
    MultiAdapterModel(base, ignore_fingerprint=True).add_adapter("other", tmp_path / "other")  # asked for


def test_built_from_adapter_directories_over_a_checkpoint(tmp_path, base_checkpoint):
    ckpt = base_checkpoint("vit")
    base = pv.create_model("test_vit", checkpoint=ckpt, num_classes=5, img_size=64)
    adapters = _adapters(base, tmp_path, methods=["vpt-deep", "bitfit"])
    multi = MultiAdapterModel.from_adapters({n: d for n, (d, _) in adapters.items()}, checkpoint=ckpt)
    names = list(adapters)
    x = make_input("vit", batch=len(names), seed=7)
    out = multi(x, names)
    for i, name in enumerate(names):
        ref = adapters[name][1](x[i : i + 1])[0]
        torch.testing.assert_close(out[i, : ref.numel()], ref, rtol=0, atol=1e-5)


def test_bad_requests_get_one_line(tmp_path):
    base = make_model("vit", num_classes=4)
    (name, (directory, _)), = _adapters(base, tmp_path, methods=["linear"]).items()
    multi = MultiAdapterModel(base, {name: directory})
    with pytest.raises(ConfigError, match=r"images must be \(B, 3, 64, 64\)"):
        multi(torch.zeros(1, 3, 32, 32), [name])
    with pytest.raises(ConfigError, match="2 adapter names for a batch of 1"):
        multi(make_input("vit", batch=1), [name, name])
    with pytest.raises(ConfigError, match="bad adapter name"):
        multi.add_adapter("base", directory)


def test_a_part_kind_owns_its_stacking_and_applying(tmp_path, monkeypatch):
    """A new kind of part is one class: its key, stack and apply; MultiAdapterModel serves it per sample
    without knowing it (here: a per-channel gain on one MLP output, on top of the linear method)."""
    from dataclasses import dataclass

    from peftvision.methods._parts import SitePart, stack_rows

    @dataclass
    class Gain(SitePart):
        order = 2  # a class attribute (not annotated: not a field)
        site: str
        gain: torch.Tensor  # (C,)

        @classmethod
        def stack(cls, parts, module, ref):
            gains = stack_rows(parts, "gain", parts[0].gain.shape, ref, slot0=1.0)  # (S, C); slot 0: none

            def apply(slots, x, out):
                return out * gains[slots].view(slots.numel(), *[1] * (out.dim() - 2), -1)

            return apply

    base = make_model("vit", num_classes=4)
    adapters = _adapters(base, tmp_path, methods=["linear"])
    site = "blocks.1.mlp.fc2"
    width = base.get_submodule(site).out_features
    gains = {name: 1 + torch.rand(width, generator=torch.Generator().manual_seed(i)) for i, name in enumerate(adapters)}
    loading: list[str] = []  # the adapter being loaded: its gain is what its "method" adds

    def serve_parts(self, model, backbone, config):
        return [Gain(site, gains[loading[-1]].clone())]

    monkeypatch.setattr(type(get_method("linear")), "serve_parts", serve_parts)
    multi = MultiAdapterModel(base)
    for name, (directory, _) in adapters.items():
        loading.append(name)
        multi.add_adapter(name, directory)
    names = [*adapters, "base", *adapters]
    x = make_input("vit", batch=len(names), seed=9)
    out = multi(x, names)
    for i, name in enumerate(names):
        own = copy.deepcopy(base if name == "base" else adapters[name][1])
        if name != "base":
            own.get_submodule(site).register_forward_hook(lambda m, a, o, g=gains[name]: o * g)
        ref = own(x[i : i + 1])[0]
        torch.testing.assert_close(out[i, : ref.numel()], ref, rtol=0, atol=1e-5, msg=name)
