"""The frozen-feature cache: computed once, reused, invalidated by any change, bounded; and the runs on it
(the linear probe, and LP-FT's starting head) compute what they compute without it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import peftvision as pv
from peftvision.training import features as F
from peftvision.training.config import TrainConfig
from peftvision.training.finetune import finetune


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTVISION_CACHE", str(tmp_path / "cache"))


class _Counter:
    """A stand-in for the backbone: row i's feature is (i, 2i), and it counts what it was asked for."""

    def __init__(self) -> None:
        self.asked: list[list[int]] = []

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        self.asked.append(rows.tolist())
        r = torch.from_numpy(rows).float()
        return torch.stack([r, 2 * r], 1)


def test_rows_are_computed_once_and_returned_in_the_order_asked():
    compute = _Counter()
    out = F.cached_features("k1", np.array([5, 1, 3]), compute)
    assert out[:, 0].tolist() == [5, 1, 3] and compute.asked == [[1, 3, 5]]
    out = F.cached_features("k1", np.array([3, 5, 1, 3]), compute)  # all cached: nothing computed
    assert out[:, 0].tolist() == [3, 5, 1, 3] and len(compute.asked) == 1
    out = F.cached_features("k1", np.array([7, 1]), compute)  # only the missing row is computed
    assert out[:, 0].tolist() == [7, 1] and compute.asked[-1] == [7]
    assert F.cached_features(None, np.array([2]), compute)[:, 1].tolist() == [4.0]  # no key: live


def test_a_damaged_entry_is_recomputed_not_an_error():
    compute = _Counter()
    F.cached_features("k2", np.arange(4), compute)
    path = F.cache_dir() / "k2.safetensors"
    path.write_bytes(path.read_bytes()[:40])  # truncated
    assert F.cached_features("k2", np.arange(4), compute)[:, 0].tolist() == [0, 1, 2, 3]
    assert len(compute.asked) == 2


def test_the_cache_keeps_under_its_cap_least_recently_used_first(monkeypatch):
    compute = lambda rows: torch.zeros(len(rows), 1000)  # noqa: E731  -- 4 KB per row
    F.cached_features("old", np.arange(50), compute)
    F.cached_features("mid", np.arange(50), compute)
    os.utime(F.cache_dir() / "old.safetensors", (1, 1))
    monkeypatch.setenv("PEFTVISION_FEATURE_CACHE_GB", str(450_000 / 1e9))  # room for two entries of ~200 KB
    F.cached_features("new", np.arange(50), compute)
    names = sorted(p.stem for p in F.cache_dir().glob("*.safetensors"))
    assert names == ["mid", "new"]


def test_eviction_survives_entries_another_process_removed(monkeypatch):
    """Two runs share the cache: an entry listed by one and deleted by the other before its stat() is
    skipped, not a FileNotFoundError that ends the run."""
    compute = lambda rows: torch.zeros(len(rows), 1000)  # noqa: E731
    F.cached_features("a", np.arange(50), compute)
    F.cached_features("b", np.arange(50), compute)
    gone = F.cache_dir() / "a.safetensors"
    real_glob = Path.glob

    def glob_then_delete(self: Path, pattern: str):  # the listing, then the other process's unlink
        found = list(real_glob(self, pattern))
        gone.unlink(missing_ok=True)
        return iter(found)

    monkeypatch.setattr(Path, "glob", glob_then_delete)
    monkeypatch.setenv("PEFTVISION_FEATURE_CACHE_GB", str(250_000 / 1e9))
    F.cached_features("c", np.arange(50), compute)
    monkeypatch.setattr(Path, "glob", real_glob)
    assert sorted(p.stem for p in F.cache_dir().glob("*.safetensors")) == ["c"]


def test_the_key_changes_with_the_model_the_preprocessing_and_the_files(tmp_path):
    from peftvision.data.images import FileSource

    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(b"x" * (i + 1))
    source = FileSource(files)
    model = {"weights": "abc", "architecture": "sig", "transform": "Resize(224)"}
    key = F.feature_key(model, source)
    assert key == F.feature_key(dict(model), FileSource(files))  # the same inputs: the same key
    assert key != F.feature_key({**model, "weights": "abd"}, source)
    assert key != F.feature_key({**model, "transform": "Resize(256)"}, source)
    os.utime(files[1], (5, 5))  # a photo replaced in place
    assert key != F.feature_key(model, source)
    assert F.feature_key(model, object()) is None  # a source we cannot fingerprint is never cached


# ----------------------------------------------------------------------------- in runs

def _photos(root: Path, n: int = 12) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 6)):
        for k, cls in enumerate(("cool", "warm")):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 150, (32, 32, 3))
                pixels[..., 0 if k else 2] += 100
                Image.fromarray(pixels.astype("uint8")).save(root / split / cls / f"{i}.png")


def _cfg(tmp_path: Path, backbone: str, data: Path, name: str, **kw) -> TrainConfig:
    kw = {"epochs": 1, **kw}
    return TrainConfig(model="pv_vit_tiny_32", checkpoint=backbone, dataset=f"imagefolder:{data}",
                       batch_size=8, num_workers=0, quiet=True, output=str(tmp_path / name), **kw)


def _head(run: Path, backbone: str) -> dict[str, torch.Tensor]:
    model = pv.load_adapter(run, checkpoint=backbone)
    return {k: v for k, v in model.state_dict().items() if k.startswith("head.")}


def test_the_linear_probe_is_the_same_from_the_cache_and_without_it(tmp_path, backbone_checkpoint):
    data = tmp_path / "photos"
    _photos(data)
    first = finetune(_cfg(tmp_path, backbone_checkpoint, data, "first", method="linear"))
    entries = list(F.cache_dir().glob("*.safetensors"))
    assert len(entries) == 1  # one entry per source of images: the folder, train and test rows alike
    inodes = [p.stat().st_ino for p in entries]  # a rewrite is a new file renamed into place
    again = finetune(_cfg(tmp_path, backbone_checkpoint, data, "again", method="linear", seed=1))
    assert [p.stat().st_ino for p in entries] == inodes  # read, not rewritten
    live = finetune(_cfg(tmp_path, backbone_checkpoint, data, "live", method="linear", feature_cache="off"))
    assert first["head_init"]["cached"] and not live["head_init"]["cached"]
    heads = [_head(tmp_path / n, backbone_checkpoint) for n in ("first", "again", "live")]
    for other in heads[1:]:
        assert all(torch.allclose(heads[0][k], other[k], atol=1e-5) for k in heads[0])
    assert first["test_top1"] == again["test_top1"] == live["test_top1"]
    # the test number read from cached features is what the saved adapter computes on the test photos
    from peftvision.data import build_loader, load_task, make_transform

    model = pv.load_adapter(tmp_path / "first", checkpoint=backbone_checkpoint)
    task = load_task(f"imagefolder:{data}")
    loader = build_loader(task.dataset("test", make_transform(model, resize=first["resize"])), batch_size=4)
    assert pv.evaluate_model(model, loader, task.num_classes)["top1"] == pytest.approx(first["test_top1"])


def test_lp_ft_starts_the_head_from_the_probe(tmp_path, backbone_checkpoint):
    """head_init=probe: the LoRA run's head starts where the linear probe ended (B = 0 at init, so the
    features it was fitted on are the injected model's own); random: timm's init, no probe."""
    data = tmp_path / "photos"
    _photos(data)
    probe = finetune(_cfg(tmp_path, backbone_checkpoint, data, "probe", method="linear"))
    zero = dict(lr=1e-12)  # a step too small to move anything: the kept head is the start
    lpft = finetune(_cfg(tmp_path, backbone_checkpoint, data, "lpft", method="lora", head_init="probe", **zero))
    rand = finetune(_cfg(tmp_path, backbone_checkpoint, data, "rand", method="lora", head_init="random", **zero))
    assert lpft["head_init"]["init"] == "probe" and lpft["head_init"]["l2"] == probe["head_init"]["l2"]
    assert rand["head_init"] == {"init": "random", "lr_ratio": 1.0}
    a, b, c = (_head(tmp_path / n, backbone_checkpoint) for n in ("probe", "lpft", "rand"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not torch.allclose(a["head.weight"], c["head.weight"], atol=1e-3)
    assert lpft["test_top1"] == pytest.approx(probe["test_top1"])
    log = [json.loads(line) for line in (tmp_path / "lpft" / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "probe" for e in log)


def test_probe_head_scale_softens_the_start_and_keeps_its_predictions(tmp_path, backbone_checkpoint):
    """--probe-head-scale: the run's head starts at the probe's times the scale (a step too small to
    move anything shows the start), so every prediction is the probe's; a probe-only run ignores it."""
    data = tmp_path / "photos"
    _photos(data)
    probe = finetune(_cfg(tmp_path, backbone_checkpoint, data, "probe", method="linear", probe_head_scale=0.5))
    soft = finetune(_cfg(tmp_path, backbone_checkpoint, data, "soft", method="lora", lr=1e-12, probe_head_scale=0.5))
    assert "scale" not in probe["head_init"] and soft["head_init"]["scale"] == 0.5
    a, b = _head(tmp_path / "probe", backbone_checkpoint), _head(tmp_path / "soft", backbone_checkpoint)
    assert all(torch.allclose(0.5 * a[k], b[k], atol=1e-5) for k in a)
    assert soft["test_top1"] == pytest.approx(probe["test_top1"])
    from peftvision.ui import _head_start

    assert "; its logits x 0.5" in _head_start(soft["head_init"])


@pytest.mark.parametrize("method", ["vpt-deep", "lora"])
def test_head_lr_ratio_keeps_or_trains_the_probe_head(tmp_path, backbone_checkpoint, method):
    """The method's own head lr after a probe start applies when the run sets none; at 0 the kept head
    is the probe's exactly, however far the method's own tensors travel; 1 trains it with the rest."""
    data = tmp_path / "photos"
    _photos(data)
    finetune(_cfg(tmp_path, backbone_checkpoint, data, "probe", method="linear"))
    probe = _head(tmp_path / "probe", backbone_checkpoint)
    own = finetune(_cfg(tmp_path, backbone_checkpoint, data, "own", method=method, lr=1e-2))
    assert own["head_init"]["lr_ratio"] == pv.get_method(method).probe_head_lr_ratio
    kept = finetune(_cfg(tmp_path, backbone_checkpoint, data, "kept", method=method, lr=1e-2, head_lr_ratio=0))
    trained = finetune(_cfg(tmp_path, backbone_checkpoint, data, "trained", method=method, lr=1e-2, head_lr_ratio=1))
    assert kept["head_init"]["lr_ratio"] == 0 and trained["head_init"]["lr_ratio"] == 1
    from peftvision.ui import _head_start  # the summary's "head start" line says it

    assert _head_start(kept["head_init"]).endswith("; kept as fitted (head lr 0)")
    assert _head_start(trained["head_init"]) == trained["head_init"]["about"]
    ratio = own["head_init"]["lr_ratio"]
    assert _head_start(own["head_init"]).endswith(f"; head lr x {ratio:g}") == (ratio not in (0, 1))
    a, b = _head(tmp_path / "kept", backbone_checkpoint), _head(tmp_path / "trained", backbone_checkpoint)
    assert all(torch.allclose(probe[k], a[k], atol=1e-6) for k in probe), "the probe's head, kept"
    assert not torch.allclose(probe["head.weight"], b["head.weight"], atol=1e-4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # same head, so other logits mean the method's own tensors trained
        logits = [pv.load_adapter(tmp_path / n, checkpoint=backbone_checkpoint).eval()(x) for n in ("kept", "probe")]
    assert not torch.allclose(*logits, atol=1e-4), "the method trained while the head stood still"


def test_a_linear_run_with_augment_trains_epochs_on_augmented_images(tmp_path, backbone_checkpoint):
    """The probe fits once on un-augmented features, so `--method linear --augment` would silently
    ignore the flag: with augment on, the head trains by SGD through the epochs instead."""
    data = tmp_path / "photos"
    _photos(data)
    run = finetune(_cfg(tmp_path, backbone_checkpoint, data, "aug", method="linear", augment=True, epochs=2))
    assert run["head_init"] == {"init": "random", "lr_ratio": 1.0} and run["epochs_run"] == 2
    assert not list(F.cache_dir().glob("*.safetensors"))  # nothing fitted on frozen features


def test_runs_of_other_precisions_follow_each_other_in_one_process(tmp_path, backbone_checkpoint):
    """accelerate's process-wide state would refuse the second run's bf16 ("restart your runtime"): a
    notebook or benchmark running fp32 then bf16 must get both runs."""
    data = tmp_path / "photos"
    _photos(data)
    fp32 = finetune(_cfg(tmp_path, backbone_checkpoint, data, "fp32", method="lora"))
    bf16 = finetune(_cfg(tmp_path, backbone_checkpoint, data, "bf16", method="lora", mixed_precision="bf16"))
    again = finetune(_cfg(tmp_path, backbone_checkpoint, data, "again", method="lora"))
    assert fp32["test_top1"] == again["test_top1"] and bf16["epochs_run"] == 1
