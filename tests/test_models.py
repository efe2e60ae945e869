"""The backbones shipped in peftvision/weights: they load offline, are genuinely pretrained, take every
method, and the command that made them still runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

import peftvision as pv
from peftvision.backbones.embedded import (
    DEFAULT_MODEL,
    DEFAULT_MODELS,
    register_default_models,
)
from peftvision.backbones.weights import (
    ARCHITECTURES,
    INPUT_SIZE,
    PRETRAIN_CLASSES,
    weights_path,
)
from tools.pretrain.scenes import SHAPES, SceneConfig, SceneTask


def _random(name: str, num_classes: int = PRETRAIN_CLASSES, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def test_registration_is_idempotent_and_names_the_default():
    assert register_default_models() == register_default_models() == DEFAULT_MODELS
    assert DEFAULT_MODEL in DEFAULT_MODELS
    assert set(DEFAULT_MODELS) <= set(timm.list_models("pv_*"))
    assert all(timm.is_model_pretrained(n) for n in DEFAULT_MODELS)


@pytest.mark.parametrize("name", DEFAULT_MODELS)
def test_loads_offline_with_a_new_head(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = timm.create_model(name, pretrained=True, num_classes=7)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == INPUT_SIZE and cfg["num_classes"] == PRETRAIN_CLASSES
    assert cfg["classifier"] == ARCHITECTURES[name]["classifier"] and cfg["license"]
    assert model.get_classifier().out_features == 7
    assert model(torch.zeros(2, *INPUT_SIZE)).shape == (2, 7)

    # Every backbone tensor is the shipped one (fp16 on disk, fp32 in the model), far from a random init.
    from safetensors.torch import load_file

    shipped = load_file(str(weights_path(name)))
    fresh = _random(name).state_dict()
    head = cfg["classifier"]
    for key, value in model.state_dict().items():
        if key.startswith(head + "."):
            continue
        assert value.dtype == torch.float32 or not value.is_floating_point()
        torch.testing.assert_close(value, shipped[key].to(value.dtype))
        if value.is_floating_point() and value.numel() > 1 and not key.endswith("relative_position_index"):
            assert not torch.allclose(value, fresh[key], atol=1e-3), key

    # The full pretraining head loads too, and peftvision's own entry point agrees.
    full = pv.create_model(name, pretrained=True)
    assert full.get_classifier().out_features == PRETRAIN_CLASSES
    torch.testing.assert_close(full.get_classifier().weight, shipped[f"{head}.weight"].float())


@pytest.mark.parametrize("name", DEFAULT_MODELS)
def test_linear_probe_beats_random_init(name):
    """A cheap version of benchmarks/linear-probe.md on one built-in task: 300 train, 200 test images."""
    from peftvision.data import load_task, make_transform
    from tools.pretrain.probe import extract_features, fit_score

    torch.set_num_threads(2)
    task = load_task("builtin:landcover", seed=0)  # a clear gain for both models in linear-probe.md
    pretrained = timm.create_model(name, pretrained=True)
    transform = make_transform(pretrained)

    def arrays(split: str, n: int) -> tuple[torch.Tensor, np.ndarray]:
        ds = task.dataset(split, transform)
        items = [ds[i] for i in range(n)]
        return torch.stack([x for x, _ in items]), np.array([y for _, y in items])

    (xtr, ytr), (xte, yte) = arrays("train800", 300), arrays("test", 200)
    acc = {}
    for kind, model in (("random", _random(name)), ("pretrained", pretrained)):
        ftr, fte = extract_features(model, [xtr]), extract_features(model, [xte])
        acc[kind] = fit_score((ftr, ytr), (fte, yte), c=0.1)
    assert acc["pretrained"] > acc["random"] + 0.05, acc


@pytest.mark.parametrize("method", pv.list_methods())
@pytest.mark.parametrize("name", DEFAULT_MODELS)
def test_every_method_trains_on_the_shipped_backbones(name, method):
    model = pv.inject(timm.create_model(name, pretrained=True, num_classes=3), method)
    model.train()
    x = torch.randn(2, *INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 2]))
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)


def test_scene_stream_is_deterministic_and_labelled():
    cfg = SceneConfig()
    a = SceneTask(cfg).batch(seed=3, index=5, size=6)
    b = SceneTask(cfg).batch(seed=3, index=5, size=6)  # a fresh task object, as in another worker
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    assert a["image"].shape == (6, 32, 32, 3) and a["image"].dtype == np.uint8
    assert SceneTask(cfg).batch(seed=4, index=5, size=6)["image"].tobytes() != a["image"].tobytes()
    assert SceneTask(cfg).batch(seed=3, index=6, size=6)["image"].tobytes() != a["image"].tobytes()
    # Targets are in range, and the segment map shows the main object's shape where the pose puts it.
    assert PRETRAIN_CLASSES == cfg.num_classes == len(SHAPES)
    assert a["label"].max() < cfg.num_classes and a["count"].max() < cfg.num_counts
    assert a["texture"].max() < cfg.num_textures and a["segment"].max() < cfg.num_segments
    assert np.abs(a["pose"][:, :2]).max() <= 1 and np.abs(a["pose"][:, 3:]).max() <= 1
    # Some shapes (ring, ell, crescent) leave their centre empty, so look within the main object's radius.
    lo, hi = np.log(cfg.main_radius)
    yy, xx = np.mgrid[:32, :32] + 0.5
    for i in range(6):
        cx, cy = (a["pose"][i, :2] + 1) / 2 * 32
        r = np.exp(a["pose"][i, 2] * (hi - lo) / 2 + (lo + hi) / 2)
        near = np.hypot(xx - cx, yy - cy) <= r
        shown = a["segment"][i] == cfg.num_textures + a["label"][i]
        assert shown[near].sum() >= 0.2 * near.sum(), i  # drawn last, so nothing hides it


@pytest.mark.parametrize("name", DEFAULT_MODELS)
def test_pretraining_entry_point_runs(name, tmp_path):
    from tools.pretrain.run import main

    settings = ["threads=1", "data.max_objects=3", "train.steps=2", "train.batch_size=4", "train.warmup_steps=1",
                "train.eval_batches=1", "train.num_workers=0", "train.log_every=1"]
    argv = ["--recipe", f"recipes/pretrain-{name}.yaml", "--output", str(tmp_path)]
    assert main(argv + [a for s in settings for a in ("--set", s)]) == 0
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["steps"] == 2 and record["data"]["classes"] == PRETRAIN_CLASSES
    assert 0 <= record["upstream"]["class_accuracy"] <= 1
    weights = tmp_path / f"{name}.safetensors"
    assert record["file"]["bytes"] == weights.stat().st_size
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    assert model.get_classifier().out_features == PRETRAIN_CLASSES


def test_pretraining_rejects_unknown_fields(tmp_path, capsys):
    from tools.pretrain.run import main

    assert main(["--model", DEFAULT_MODEL, "--output", str(tmp_path), "--set", "train.stepz=2"]) == 2
    assert "unknown field(s) stepz" in capsys.readouterr().err
