"""The model-selection policy at every size, and the linear probe that starts (or is) the head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peftvision.data.protocol import Pool, benchmark_aliases, protocol_splits
from peftvision.data.task import Task
from peftvision.training.probe import (
    L2_GRID,
    extract_features,
    fit_probe,
    head_linear,
    scale_head,
    set_head,
)
from peftvision.training.selection import MIN_SELECTION_IMAGES, choose_selection


def _task(n_train: int, n_val: int = 0, n_test: int = 50, classes: int = 2, benchmark: bool = False) -> Task:
    """A task over a fake source, laid out as an image folder with train/ (+ val/) + test/ would be."""
    source = object()
    labels = np.arange(n_train + n_val + n_test) % classes
    pool = lambda lo, hi: Pool(source, np.arange(lo, hi), labels[lo:hi])  # noqa: E731
    val = pool(n_train, n_train + n_val) if n_val else None
    splits, notes, meta = protocol_splits(pool(0, n_train), pool(n_train + n_val, len(labels)), val=val, seed=0)
    if benchmark:
        benchmark_aliases(splits, meta)
    return Task("t", "natural", tuple(str(c) for c in range(classes)), splits, tuple(notes), meta)


@pytest.mark.parametrize("n_train", [20, 60, 245, 800, 1990])
def test_small_sets_without_val_train_on_everything_and_keep_the_last_epoch(n_train):
    """The case that lost 4-6 points: a 10% slice of a few hundred photos picks noise and costs data."""
    task = _task(n_train)
    assert len(task.split("val")) < MIN_SELECTION_IMAGES
    s = choose_selection(task, "train", "auto")
    assert (s.train_split, s.val_split, s.keep) == ("trainval", None, "last")
    assert len(task.split(s.train_split)) == n_train  # every training photo trains
    assert "too few" in s.why and str(n_train) in s.why


@pytest.mark.parametrize("n_train", [2000, 5000])
def test_large_sets_without_val_carve_a_slice_and_keep_the_best_epoch(n_train):
    task = _task(n_train)
    s = choose_selection(task, "train", "auto")
    assert (s.train_split, s.val_split, s.keep) == ("train", "val", "best")
    assert len(task.split("val")) >= MIN_SELECTION_IMAGES
    assert len(task.split("train")) + len(task.split("val")) == n_train


@pytest.mark.parametrize("n_val, keep", [(30, "last"), (199, "last"), (200, "best"), (600, "best")])
def test_a_val_folder_is_always_reported_and_picks_the_epoch_when_big_enough(n_val, keep):
    task = _task(250, n_val=n_val)
    s = choose_selection(task, "train", "auto")
    assert (s.train_split, s.val_split, s.keep) == ("train", "val", keep)
    assert len(task.split("train")) == 250  # val/ never costs training photos


def test_benchmark_tasks_keep_the_vtab_protocol():
    task = _task(1500, benchmark=True)
    s = choose_selection(task, "train", "auto")
    assert (s.train_split, s.val_split, s.keep) == ("train", "val", "best")
    assert len(task.split("val")) == 200 and len(task.split("train")) == 800


def test_explicit_settings_pass_through():
    task = _task(245)
    assert choose_selection(task, "train", None).keep == "last"
    old = choose_selection(task, "train", "val", "best")  # the policy before: carve a slice, keep the best
    assert (old.train_split, old.val_split, old.keep) == ("train", "val", "best")
    assert choose_selection(task, "train", "val").keep == "last"  # asked for the slice; too small to pick on
    with pytest.raises(ValueError):
        choose_selection(task, "train", "auto", "sometimes")


# ----------------------------------------------------------------------------- the probe

def _blobs(n: int, d: int, classes: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.arange(n) % classes
    x = centres[y] + spread * torch.randn(n, d, generator=g) + 5.0  # an offset and scale standardising must undo
    return x * torch.linspace(0.1, 10, d), y


def test_probe_fits_separable_features_and_generalises():
    train, test = _blobs(120, 16, 3, 0), _blobs(600, 16, 3, 1)
    fit = fit_probe(train, 3)
    acc = ((test[0] @ fit.weight.T + fit.bias).argmax(1) == test[1]).float().mean()
    assert acc > 0.95 and "fold" in fit.chosen_on and fit.l2 in L2_GRID


def test_probe_matches_sklearn_logistic_regression_at_the_same_l2():
    """The same objective as scikit-learn's (C = 1 / (l2 * n) on standardised features): same predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (x, y), (xt, yt) = _blobs(200, 8, 4, 2, spread=3.0), _blobs(400, 8, 4, 3, spread=3.0)
    fit = fit_probe((x, y), 4, val=(xt[:100], yt[:100]))
    scaler = StandardScaler().fit(x.double().numpy())
    # sklearn's population std vs torch's sample std: rescale l2 by the ratio squared
    ratio = (len(x) - 1) / len(x)
    clf = LogisticRegression(C=1 / (fit.l2 * ratio * len(x)), max_iter=10_000, tol=1e-10).fit(scaler.transform(x.numpy()), y)
    ours = (xt @ fit.weight.T + fit.bias).argmax(1).numpy()
    theirs = clf.predict(scaler.transform(xt.numpy()))
    assert (ours == theirs).mean() >= 0.99


def test_probe_l2_comes_from_val_when_given_and_a_noisy_task_gets_a_stronger_l2():
    clean = fit_probe(_blobs(60, 32, 2, 4, spread=0.5), 2)
    noisy = fit_probe(_blobs(60, 32, 2, 4, spread=8.0), 2)
    assert noisy.l2 > clean.l2
    assert fit_probe(_blobs(60, 32, 2, 4), 2, val=_blobs(30, 32, 2, 5)).chosen_on == "val (30 images)"


def test_probe_head_reproduces_its_own_logits_in_the_model():
    """Features are captured at the head's input, so a head set from the fit computes the fit's logits."""
    import timm

    model = timm.create_model("test_vit", num_classes=3, pretrained=False).eval()
    head = head_linear(model, ("head",))
    x, y = torch.randn(12, 3, 160, 160), torch.arange(12) % 3
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    feats, labels = extract_features(model, head, loader)
    assert feats.shape == (12, head.in_features) and torch.equal(labels, y)
    fit = fit_probe((feats, labels), 3)
    set_head(head, fit)
    with torch.no_grad():
        assert torch.allclose(model(x), feats @ fit.weight.T + fit.bias, atol=1e-4)


def test_scaled_probe_head_keeps_every_prediction_and_scales_the_logits():
    """probe_head_scale: a zero-init method's model computes head(features), so scaling the head's weights
    and bias scales its logits exactly; the argmax (the probe's predictions) is unchanged."""
    import peftvision as pv
    from conftest import make_input, make_model

    model = pv.inject(make_model("vit"), "lora").eval()
    x = make_input("vit")
    with torch.no_grad():
        before = model(x)
        scale_head(model, 0.3)
        after = model(x)
    assert torch.allclose(after, 0.3 * before, atol=1e-6) and torch.equal(after.argmax(1), before.argmax(1))


def test_probe_head_scale_is_checked():
    from peftvision.errors import ConfigError
    from peftvision.training.config import TrainConfig

    with pytest.raises(ConfigError, match="probe_head_scale"):
        TrainConfig(probe_head_scale=0)
    assert TrainConfig().probe_head_scale == 1  # not a default: measured, not adopted (RESULTS.md)
