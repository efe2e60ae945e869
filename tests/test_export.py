"""Adapter files, merging into plain timm models and HF PEFT export, on every method and family."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from conftest import BACKBONES, FAMILIES, make_input, make_model, randomize_trainable

import peftvision as pv
from peftvision.errors import AdapterFileError, PeftVisionError
from peftvision.methods import build_config, get_method

METHODS = pv.list_methods()


def trained(kind: str, method: str, checkpoint: str, **opts):
    """A model built from a local checkpoint, injected, with its trainable tensors moved off init."""
    name, kwargs, _ = BACKBONES[kind]
    model = pv.create_model(name, checkpoint=checkpoint, num_classes=5, **kwargs)
    pv.inject(model, method, **opts)
    randomize_trainable(model)
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(tmp_path, base_checkpoint, family, method):
    ckpt = base_checkpoint(family)
    model = trained(family, method, ckpt)
    x = make_input(family)
    y = model(x)
    out = pv.save_adapter(model, tmp_path / "adapter", class_names=list("abcde"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["method"] == method and config["model"]["num_classes"] == 5
    assert config["model"]["class_names"] == list("abcde")
    assert config["model"]["kwargs"] == json.loads(json.dumps(BACKBONES[family][1]))  # to rebuild the base
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter.safetensors"))
    state = pv.get_state(model)
    assert set(saved) == set(state.trainable_names) | set(state.state_names)  # the method's tensors and the head only

    loaded = pv.load_adapter(out, checkpoint=ckpt).eval()
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    assert pv.get_state(loaded).class_names == list("abcde")
    assert pv.param_report(loaded).trainable == pv.param_report(model).trainable


def test_a_compiled_or_wrapped_model_saves_merges_and_exports_like_the_plain_one(tmp_path, base_checkpoint):
    """torch.compile and DDP prefix parameter names (`_orig_mod.`, `module.`); adapter files must not."""
    ckpt = base_checkpoint("vit")
    model = trained("vit", "lora", ckpt)
    x = make_input("vit")
    y = model(x)
    compiled = torch.compile(model)  # lazy: nothing is compiled unless it is called, which we never do
    wrapped = torch.nn.Module()
    wrapped.module = compiled  # as DistributedDataParallel holds it
    for i, m in enumerate((compiled, wrapped)):
        assert pv.get_state(m) is pv.get_state(model)
        assert pv.param_report(m).trainable == pv.param_report(model).trainable
        out = pv.save_adapter(m, tmp_path / f"a{i}")
        torch.testing.assert_close(pv.load_adapter(out, checkpoint=ckpt).eval()(x), y, rtol=0, atol=0)
        merged = pv.merge(m)
        assert set(merged.state_dict()) == set(make_model("vit").state_dict())
        torch.testing.assert_close(merged.eval()(x), y, rtol=0, atol=1e-5)
        assert (pv.export_peft(m, tmp_path / f"p{i}") / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_load_onto_a_given_model(tmp_path, base_checkpoint, family):
    ckpt = base_checkpoint(family)
    model = trained(family, "lora", ckpt)
    pv.save_adapter(model, tmp_path)
    base = make_model(family)  # same weights as the checkpoint: same seed
    loaded = pv.load_adapter(tmp_path, model=base).eval()
    x = make_input(family)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v"), ("v", "proj", "fc1", "fc2")])
def test_merge_equals_unmerged_and_loads_in_timm(tmp_path, base_checkpoint, family, targets):
    ckpt = base_checkpoint(family)
    model = trained(family, "lora", ckpt, targets=targets, alpha=16)
    x = make_input(family)
    y = model(x)
    merged = pv.merge(model)
    assert not any(isinstance(m, pv.methods.PeftModule) for m in merged.modules())
    assert not hasattr(merged, "peftvision_state")
    name, kwargs, _ = BACKBONES[family]
    reference = timm.create_model(name, num_classes=5, **kwargs)
    assert list(merged.state_dict()) == list(reference.state_dict())
    torch.testing.assert_close(merged(x), y, rtol=0, atol=1e-5)
    # the unmerged model is untouched by default
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)

    path = pv.save_merged(model, tmp_path / "merged.safetensors")
    reloaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=5, **kwargs)
    # timm re-creates the head when num_classes is given; copy it, as users restore their head
    reloaded.get_classifier().load_state_dict(merged.get_classifier().state_dict())
    torch.testing.assert_close(reloaded.eval()(x), y, rtol=0, atol=1e-5)


MERGEABLE = [m for m in METHODS if get_method(m).mergeable(build_config(m)) is None]
EXPORTABLE = [m for m in METHODS if get_method(m).exportable(build_config(m)) is None]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", MERGEABLE)
def test_every_mergeable_method_merges_to_plain_timm(tmp_path, base_checkpoint, family, method):
    """What a method says it can merge, merges: a plain timm model (timm's keys, no method modules)
    computing what the adapted model computed, loadable by timm from the merged file."""
    model = trained(family, method, base_checkpoint(family))
    x = make_input(family)
    y = model(x)
    merged = pv.merge(model)
    torch.testing.assert_close(merged(x), y, rtol=0, atol=1e-5)
    assert not any(isinstance(m, pv.methods.PeftModule) for m in merged.modules())
    assert list(merged.state_dict()) == list(make_model(family).state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    path = pv.save_merged(model, tmp_path / "merged.safetensors")
    name, kwargs, _ = BACKBONES[family]
    reloaded = timm.create_model(name, num_classes=5, checkpoint_path=str(path), **kwargs).eval()
    torch.testing.assert_close(reloaded(x), y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in MERGEABLE])
def test_methods_that_cannot_merge_say_so(base_checkpoint, method):
    model = trained("vit", method, base_checkpoint("vit"))
    reason = get_method(method).mergeable(build_config(method))
    with pytest.raises(PeftVisionError, match=f"cannot merge: {reason}"):
        pv.merge(model)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [("q", "v"), ("k",), ("q", "k", "v", "proj", "fc2"), ("qkv",)])
@pytest.mark.parametrize("method", [m for m in EXPORTABLE if {"targets", "alpha"} <= set(get_method(m).config_cls.__dataclass_fields__)])
def test_peft_export_loads_in_peft_with_identical_outputs(tmp_path, base_checkpoint, family, targets, method):
    from peft import PeftModel

    ckpt = base_checkpoint(family)
    model = trained(family, method, ckpt, targets=targets, r=4, alpha=8)
    x = make_input(family)
    y = model(x)
    pv.export_peft(model, tmp_path)
    name, kwargs, _ = BACKBONES[family]
    base = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=ckpt), num_classes=5, **kwargs).eval()
    y_base = base(x)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    y_peft = peft_model(x)
    assert not torch.allclose(y_peft, y_base, atol=1e-4), "the exported LoRA and head must take effect"
    torch.testing.assert_close(y_peft, y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", EXPORTABLE)
def test_every_exportable_method_loads_in_peft_with_identical_outputs(tmp_path, base_checkpoint, method):
    from peft import PeftModel

    ckpt = base_checkpoint("vit")
    model = trained("vit", method, ckpt)
    x = make_input("vit")
    pv.export_peft(model, tmp_path)
    name, kwargs, _ = BACKBONES["vit"]
    base = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=ckpt), num_classes=5, **kwargs).eval()
    torch.testing.assert_close(PeftModel.from_pretrained(base, str(tmp_path)).eval()(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in EXPORTABLE])
def test_peft_export_refuses_methods_peft_lacks(tmp_path, base_checkpoint, method):
    model = trained("vit", method, base_checkpoint("vit"))
    with pytest.raises(PeftVisionError, match=f"{method} has no HF PEFT equivalent .methods that export: "):
        pv.export_peft(model, tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("targets,bound", [(("q", "v"), 1.5e6), (None, 2.2e6)], ids=["q,v", "default"])
def test_lora_adapter_for_vit_b_is_small(tmp_path, targets, bound):
    """Issue #2's size bound: LoRA r=8 on q, v of ViT-B/16 with a 100-class head is at most 1.5 MB; the
    default (q, k, v) 2.08 MB: half as many LoRA weights again."""
    model = pv.create_model("vit_base_patch16_224", num_classes=100)
    pv.inject(model, "lora", r=8, **({"targets": targets} if targets else {}))
    pv.save_adapter(model, tmp_path)
    size = os.path.getsize(tmp_path / "adapter.safetensors")
    assert size <= bound, size
    # 12 blocks x (A: 8t x 768 + B: t x 768 x 8) for t slices + head 768x100+100, in fp32, plus a small header
    t = len(targets or get_method("lora").config_cls().targets)
    assert size >= 4 * (12 * (8 * t * 768 + t * 768 * 8) + 768 * 100 + 100)


# ----------------------------------------------------------------------------- bad files

def test_adapter_for_another_architecture_is_refused(tmp_path, base_checkpoint):
    model = trained("vit", "lora", base_checkpoint("vit"))
    pv.save_adapter(model, tmp_path)
    other = pv.create_model("test_vit2", num_classes=5, img_size=64)
    with pytest.raises(AdapterFileError, match="trained on test_vit .* different architecture"):
        pv.load_adapter(tmp_path, model=other)


def test_adapter_for_other_base_weights_is_refused_unless_overridden(tmp_path, base_checkpoint):
    model = trained("vit", "lora", base_checkpoint("vit", seed=0))
    pv.save_adapter(model, tmp_path)
    other = base_checkpoint("vit", seed=7)
    with pytest.raises(AdapterFileError, match="base weights differ .* --ignore-fingerprint"):
        pv.load_adapter(tmp_path, checkpoint=other)
    loaded = pv.load_adapter(tmp_path, checkpoint=other, ignore_fingerprint=True)
    assert pv.get_state(loaded).method == "lora"


def test_wrong_head_size_is_refused(tmp_path, base_checkpoint):
    model = trained("vit", "lora", base_checkpoint("vit"))
    pv.save_adapter(model, tmp_path)
    with pytest.raises(AdapterFileError, match="has a 5-class head, the given model 7 .create it with num_classes=5."):
        pv.load_adapter(tmp_path, model=make_model("vit", num_classes=7))


@pytest.mark.parametrize("damage", ["truncate", "pickle", "garbage", "missing"])
def test_damaged_weights_file_is_refused_without_unpickling(tmp_path, base_checkpoint, damage):
    model = trained("vit", "lora", base_checkpoint("vit"))
    pv.save_adapter(model, tmp_path)
    weights = tmp_path / "adapter.safetensors"
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "pickle":
        marker = tmp_path / "unpickled"
        torch.save({"x": _Boom(str(marker))}, weights)
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    else:
        weights.unlink()
    with pytest.raises(AdapterFileError, match="adapter.safetensors (is truncated or not a safetensors file|not found)"):
        pv.load_adapter(tmp_path, model=make_model("vit"))
    assert not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_adapter_file_with_non_finite_values_is_refused(tmp_path, base_checkpoint, value):
    from safetensors.torch import load_file, save_file

    model = trained("vit", "lora", base_checkpoint("vit"))
    pv.save_adapter(model, tmp_path)
    weights = tmp_path / "adapter.safetensors"
    tensors = load_file(weights)
    name = next(n for n in tensors if "lora" in n)
    tensors[name].view(-1)[3] = value
    save_file(tensors, weights)
    with pytest.raises(AdapterFileError, match=f"tensor {name} holds NaN or infinite values; the file is damaged"):
        pv.load_adapter(tmp_path, model=make_model("vit"))


class _Boom:
    """Pickles to a call that creates a file: proof of unpickling if that file ever appears."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "is not valid JSON"),
        ('{"format": "something-else"}', "not a peftvision adapter config"),
        ('{"format": "peftvision-adapter", "format_version": 1}', "lacks the field 'method'"),
    ],
)
def test_damaged_config_is_refused(tmp_path, content, message):
    (tmp_path / "adapter_config.json").write_text(content)
    with pytest.raises(AdapterFileError, match=message):
        pv.load_adapter(tmp_path)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(AdapterFileError, match="adapter directory not found"):
        pv.load_adapter(tmp_path / "nope")
    with pytest.raises(AdapterFileError, match="has no adapter_config.json"):
        pv.load_adapter(tmp_path)


def test_saves_are_atomic(tmp_path, base_checkpoint, monkeypatch):
    model = trained("vit", "lora", base_checkpoint("vit"))
    out = tmp_path / "adapter"
    pv.save_adapter(model, out)
    before = (out / "adapter.safetensors").read_bytes()

    import safetensors.torch

    def crash(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    randomize_trainable(model, seed=9)
    with pytest.raises(KeyboardInterrupt):
        pv.save_adapter(model, out)
    assert (out / "adapter.safetensors").read_bytes() == before
    assert sorted(os.listdir(out)) == ["README.md", "adapter.safetensors", "adapter_config.json"]  # no temp file left
