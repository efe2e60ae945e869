"""The trainer's parts in isolation: optimizer groups, schedule, pickle-free checkpoints, config parsing."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_input, make_model

import peftvision as pv
from peftvision.data import EpochSampler
from peftvision.errors import ConfigError, PeftVisionError
from peftvision.training.checkpoint import load_checkpoint, save_checkpoint
from peftvision.training.config import TrainConfig, parse_overrides
from peftvision.training.loop import build_optimizer, build_scheduler


def test_optimizer_takes_only_trainable_and_decays_only_matrices():
    model = pv.inject(make_model("vit"), "lora")
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05, lr=1e-3))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    assert decayed | plain == set(trainable)
    assert all(trainable[i].dim() >= 2 for i in decayed) and all(trainable[i].dim() < 2 for i in plain)
    assert plain, "the head's bias is not decayed"


def test_schedule_warms_up_then_decays_to_zero():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=20)
    lrs = []
    for step in range(1, 21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step_update(step)
    # timm's linear warm-up from lr/4 (not 0: no wasted first step), then cosine to 0 over the other 16
    assert lrs[:5] == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1.0])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.01
    assert lrs[12] == pytest.approx(0.5)  # half-way through the cosine


def test_optimizer_is_timms_with_layer_decay():
    model = pv.inject(make_model("vit"), "lora")
    depth = len(model.blocks)
    opt = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.05, layer_decay=0.5))
    sched = build_scheduler(opt, 0, 10)
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(scale_of) == {id(p) for p in trainable.values()}
    for name, p in trainable.items():
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            # timm's group_matcher: layer 0 is the stem, block i is layer i + 1, the head is layer depth + 1
            assert scale_of[id(p)] == pytest.approx(0.5 ** (depth - i)), name
        elif name.startswith("head."):
            assert scale_of[id(p)] == 1.0
        assert lr_of[id(p)] == pytest.approx(1e-3 * scale_of[id(p)]), "the scheduler applies lr_scale"
    sched.step_update(5)
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(0.5e-3)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 1.0])
def test_head_lr_ratio_scales_the_head_alone(ratio):
    """head_lr_ratio multiplies the head's lr (on top of layer decay) and nothing else's; at 0 a real
    AdamW step leaves the head exactly as it was while the method's tensors move."""
    model = pv.inject(make_model("vit"), "lora", init="pissa")  # B != 0: every LoRA tensor gets a gradient
    state = pv.get_state(model)
    opt = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.05, layer_decay=0.5, head_lr_ratio=ratio))
    scale_of = {id(p): g.get("lr_scale", 1.0) for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert set(state.head_names) and all(scale_of[id(named[n])] == pytest.approx(ratio) for n in state.head_names)
    depth = len(model.blocks)
    for name in state.trainable_names:
        if name not in state.head_names:
            assert scale_of[id(named[name])] == pytest.approx(0.5 ** (depth - int(name.split(".")[1]))), name
    build_scheduler(opt, 0, 10)  # timm's scheduler applies lr_scale, as in training
    before = {n: named[n].detach().clone() for n in state.trainable_names}
    model.train()
    torch.nn.functional.cross_entropy(model(make_input("vit")), torch.tensor([0, 1])).backward()
    opt.step()
    moved = {n for n in state.trainable_names if not torch.equal(before[n], named[n])}
    assert moved - set(state.head_names), "the method's tensors learn"
    assert (set(state.head_names) <= moved) == (ratio > 0), "the head moves unless its ratio is 0"


def test_head_lr_ratio_is_checked():
    with pytest.raises(ConfigError, match="head_lr_ratio"):
        TrainConfig(head_lr_ratio=-1)


def test_head_lr_ratio_help_names_every_methods_own_ratio():
    """The flag's help is written by hand (the CLI builds it without importing torch or the methods), so
    it has to say what the registry says: each ratio other than 1, with the methods that take it."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "head_lr_ratio")
    help_text = " ".join(field.metadata["help"].split())
    by_ratio: dict[float, list[str]] = {}
    for name in pv.list_methods():
        method = pv.get_method(name)
        if method.probe_head and method.probe_head_lr_ratio != 1.0:
            by_ratio.setdefault(method.probe_head_lr_ratio, []).append(name)
    said = ", ".join(f"{r:g} for {' and '.join(sorted(names))}" for r, names in sorted(by_ratio.items()))
    assert f"({said}, 1 for the rest)" in help_text


@pytest.mark.parametrize("name", ["sgd", "lamb", "lion"])
def test_any_timm_optimizer_by_name(name):
    model = pv.inject(make_model("vit"), "lora")
    opt = build_optimizer(model, TrainConfig(lr=1e-3, optimizer=name))
    assert type(opt).__name__.lower().startswith({"sgd": "sgd"}.get(name, name))


def test_unknown_optimizer_is_one_line():
    from peftvision.training.loop import check_optimizer

    with pytest.raises(ConfigError, match="unknown optimizer 'adamx'; timm has: .*adamw"):
        check_optimizer("adamx")


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    torch.manual_seed(123)  # the global RNG must not matter
    first = list(a)
    torch.manual_seed(456)
    assert first == list(b) and sorted(first) == list(range(50))
    b.set_epoch(3)
    assert list(b) != first


@pytest.mark.parametrize("optimizer", ["adamw", "lamb", "adafactorbv"])  # tensors / dtypes in their groups
def test_checkpoint_round_trip_restores_training_exactly(tmp_path, optimizer):
    def run(model, opt, sched, steps, done=0):
        x = make_input("vit")
        for step in range(done + 1, done + steps + 1):
            loss = model(x).logsumexp(-1).mean() + 0.01 * torch.randn(()).item()  # consumes the global RNG
            loss.backward()
            opt.step()
            sched.step_update(step)
            opt.zero_grad()
        return model(x).detach()

    def fresh():
        torch.manual_seed(0)
        model = pv.inject(make_model("vit"), "lora", dropout=0.1)
        opt = build_optimizer(model, TrainConfig(lr=1e-3, optimizer=optimizer))
        return model, opt, build_scheduler(opt, 2, 10)

    model, opt, sched = fresh()
    random.seed(1), np.random.seed(1)
    run(model, opt, sched, 2)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    save_checkpoint(tmp_path / "ckpt", params, opt, sched, {"epoch": 2})
    expected = run(model, opt, sched, 3, done=2)
    after_rng = (random.random(), np.random.rand())

    model2, opt2, sched2 = fresh()
    params2 = {n: p for n, p in model2.named_parameters() if p.requires_grad}
    assert load_checkpoint(tmp_path / "ckpt", params2, opt2, sched2) == {"epoch": 2}
    torch.testing.assert_close(run(model2, opt2, sched2, 3, done=2), expected, rtol=0, atol=0)
    assert (random.random(), np.random.rand()) == after_rng


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = pv.inject(make_model("vit"), "linear")
    opt = build_optimizer(model, TrainConfig(lr=1e-3))
    sched = build_scheduler(opt, 1, 5)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    save_checkpoint(tmp_path / "ckpt", params, opt, sched, {"epoch": 1})
    import peftvision.training.checkpoint as ck

    monkeypatch.setattr(ck, "save_tensors", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ckpt", params, opt, sched, {"epoch": 2})
    assert load_checkpoint(tmp_path / "ckpt", params, opt, sched) == {"epoch": 1}


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    model = pv.inject(make_model("vit"), "linear")
    opt = build_optimizer(model, TrainConfig(lr=1e-3))
    with pytest.raises(PeftVisionError, match="no checkpoint in"):
        load_checkpoint(tmp_path, {}, opt, build_scheduler(opt, 1, 2))


def test_overrides_and_config_validation():
    assert parse_overrides(["lora.r=16", "lora.targets=[q,k,v]", "epochs=3", "lr=1e-3"]) == {
        "lora": {"r": 16, "targets": ["q", "k", "v"]}, "epochs": 3, "lr": 1e-3,
    }
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ConfigError, match="mixed_precision must be no, bf16 or fp16"):
        TrainConfig(mixed_precision="fp8")


@pytest.mark.parametrize("method", pv.list_methods())
def test_lr_defaults_to_the_methods_own_and_a_given_lr_wins(method):
    from peftvision.methods import get_method
    from peftvision.training.config import resolve_config

    assert TrainConfig(method=method).lr is None
    # the method's own lr is for real pretrained timm backbones; on the embedded 32-px ones, the method's
    # `embedded_lr` (measured on them), or 10x its own where it declares none
    from peftvision.backbones.weights import ARCHITECTURES

    own, declared = get_method(method).default_lr, get_method(method).embedded_lr
    assert resolve_config(TrainConfig(method=method, model="vit_base_patch16_224.augreg2_in21k_ft_in1k")).lr == own > 0
    embedded = declared if declared is not None else own * ARCHITECTURES["pv_vit_tiny_32"]["lr_scale"]
    assert resolve_config(TrainConfig(method=method)).lr == pytest.approx(embedded)  # pv_vit_tiny_32
    assert resolve_config(TrainConfig(method=method, model="pv_swin_tiny_32")).lr == pytest.approx(embedded)
    assert resolve_config(TrainConfig(method=method, lr=0.123)).lr == 0.123
    with pytest.raises(ConfigError, match="lr must be > 0"):
        TrainConfig(method=method, lr=0.0)
    with pytest.raises(ConfigError, match="lr is unset"):
        build_optimizer(torch.nn.Linear(2, 2), TrainConfig(method=method))


@pytest.mark.skipif(torch.cuda.is_available() or not __import__("os").path.exists("/proc/self/clear_refs"),
                    reason="the CPU peak (VmHWM) reset is Linux-only")
def test_peak_memory_restarts_per_run():
    """Runs that share a process (compare) must each report their own peak, not the largest so far."""
    # in a fresh process: here, garbage collection of earlier tests' models could free memory mid-test
    code = """
import numpy as np
from peftvision.training.report import peak_memory_mb, reset_peak_memory
reset_peak_memory()
start = peak_memory_mb()
big = np.ones(200 * 2**20 // 8)  # 200 MB, touched, then given back to the OS
del big
before = peak_memory_mb()
reset_peak_memory()
print(start, before, peak_memory_mb())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    start, before, after = map(float, out.split())
    assert before > start + 150 and after < before - 150


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """Files written through a temp file are readable as files written directly are (not mkstemp's 0600)."""
    from peftvision.files import atomic_write_text

    atomic_write_text(tmp_path / "a.json", "{}")
    (tmp_path / "b.json").write_text("{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777


def test_checkpoint_from_an_older_format_is_one_clear_error(tmp_path):
    import json

    model = pv.inject(make_model("vit"), "linear")
    opt = build_optimizer(model, TrainConfig(lr=1e-3))
    sched = build_scheduler(opt, 1, 5)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    save_checkpoint(tmp_path / "ckpt", params, opt, sched, {"epoch": 1})
    meta = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    meta["optimizer"] = {"param_groups": meta["optimizer"]["param_groups"], "scalars": {}}  # the old layout
    (tmp_path / "ckpt" / "state.json").write_text(json.dumps(meta))
    with pytest.raises(PeftVisionError, match="written by an older peftvision"):
        load_checkpoint(tmp_path / "ckpt", params, opt, sched)


def test_checkpoint_of_other_method_options_is_one_clear_error(tmp_path):
    """A run started with LoRA on q, v cannot resume as q, k, v (same names, other shapes): one line."""
    def parts(targets):
        model = pv.inject(make_model("vit"), "lora", targets=targets)
        opt = build_optimizer(model, TrainConfig(lr=1e-3))
        return {n: p for n, p in model.named_parameters() if p.requires_grad}, opt, build_scheduler(opt, 1, 5)

    save_checkpoint(tmp_path / "ckpt", *parts(("q", "v")), {"epoch": 1})
    params, opt, sched = parts(("q", "k", "v"))
    with pytest.raises(PeftVisionError, match=r"does not match this run's method options \(.*lora_A is \(16, \d+\) there, \(24, \d+\) here\)"):
        load_checkpoint(tmp_path / "ckpt", params, opt, sched)


@pytest.mark.parametrize("method", pv.list_methods())
def test_resolved_config_holds_every_method_option(method):
    """config.yaml records the options' values, not only the given ones, so a run resumes and reruns
    the same way after a method's defaults change."""
    from dataclasses import fields

    from peftvision.methods import build_config, get_method
    from peftvision.training.config import resolve_config

    options = resolve_config(TrainConfig(method=method)).options
    assert set(options) == {f.name for f in fields(get_method(method).config_cls)}
    assert build_config(method, options) == build_config(method, {})
    if method == "lora":
        given = resolve_config(TrainConfig(method=method, options={"r": 4, "targets": "q,v"})).options
        assert given == {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "v"], "use_rslora": False,
                         "lr_ratio": 1.0, "init": "default"}
        assert resolve_config(TrainConfig(method=method, options=given)).options == given  # as resume reads it back
