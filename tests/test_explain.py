"""`peftvision.explain` and `peftvision explain`: attention maps, rollout, Grad-CAM, on base, adapted and
merged models; the model is left exactly as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BACKBONES, make_input, make_model, randomize_trainable
from PIL import Image

import peftvision as pv
from peftvision.cli import main
from peftvision.errors import ConfigError, UnsupportedModelError
from peftvision.explain import attention_maps, explain, grad_cam, token_layout

SHARED = Path(__file__).resolve().parents[2] / "shared"
BACKBONE = SHARED / "backbones" / "vit_tiny_patch16_224.in1k_tin200.safetensors"
PHOTO = SHARED / "data" / "imagenet-sample-coarse4" / "dog" / "207_n02099601.jpg"


def adapted(kind: str, method: str, **options) -> torch.nn.Module:
    model = pv.inject(make_model(kind), method, **options)
    randomize_trainable(model, std=0.2)  # prompts and adapters that change what the model attends to
    return model.eval()


# ----------------------------------------------------------------------------- an independent reference

def reference_rollout(maps, prefix, prompts, fresh, grid, readout, fusion="mean", discard=0.0):
    """Abnar & Zuidema, one image at a time, written out: fuse heads, drop the lowest entries (never a
    prefix token's self-attention), add I, renormalise rows, multiply; prompts are sources outside
    the image (new at every block when `fresh`); read the class row or the mean patch row."""
    n = maps[0].shape[-1]
    patches = range(prefix + prompts, n)
    out = []
    for b in range(maps[0].shape[0]):
        joint = torch.eye(n, dtype=torch.float64)
        for layer, a in enumerate(maps):
            heads = [a[b, h].double() for h in range(a.shape[1])]
            fused = heads[0].clone()
            for h in heads[1:]:
                fused = {"mean": fused + h, "max": torch.maximum(fused, h), "min": torch.minimum(fused, h)}[fusion]
            if fusion == "mean":
                fused = fused / len(heads)
            protected = {(i, i) for i in range(prefix)}
            order = sorted(((fused[i, j].item(), i, j) for i in range(n) for j in range(n) if (i, j) not in protected))
            for _, i, j in order[: int(n * n * discard)]:
                fused[i, j] = 0.0
            fused = fused + torch.eye(n, dtype=torch.float64)
            for i in range(n):
                fused[i] = fused[i] / fused[i].sum()
            if fresh and layer > 0:
                for p in range(prefix, prefix + prompts):
                    joint[p] = torch.eye(n, dtype=torch.float64)[p]
            joint = fused @ joint
        row = joint[0] if readout == "token" else torch.stack([joint[i] for i in patches]).mean(0)
        weights = torch.tensor([row[j].item() for j in patches], dtype=torch.float64)
        out.append((weights / weights.sum()).reshape(grid))
    return torch.stack(out)


@pytest.mark.parametrize("kind,readout", [("vit", "token"), ("vit-map", "patches")])
@pytest.mark.parametrize("fusion,discard", [("mean", 0.0), ("max", 0.0), ("min", 0.5), ("mean", 0.9)])
def test_rollout_equals_a_direct_reference(kind, readout, fusion, discard):
    model = make_model(kind).eval()
    x = make_input(kind)
    maps = attention_maps(model, x)
    layout = token_layout(model, x)
    assert layout.readout == readout and layout.prompts == 0
    assert len(maps) == len(pv.describe(model).blocks) and maps[0].shape[1] == model.blocks[0].attn.num_heads
    for a in maps:  # probabilities: rows sum to 1
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
    got = pv.attention_rollout(model, x, head_fusion=fusion, discard_ratio=discard)
    want = reference_rollout(maps, layout.prefix, 0, False, layout.grid, readout, fusion, discard)
    assert got.shape == (2, *layout.grid)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6)
    # rollout through block 2 is the reference over the first three blocks only
    torch.testing.assert_close(
        pv.attention_rollout(model, x, head_fusion=fusion, discard_ratio=discard, block=2).double(),
        reference_rollout(maps[:3], layout.prefix, 0, False, layout.grid, readout, fusion, discard).double(),
        rtol=1e-4, atol=1e-6,
    )


def test_attention_maps_equal_the_fused_attention_they_replace():
    """The probabilities, times v, are what timm's fused attention computed: hooks read the real thing."""
    model = make_model("vit").eval()
    x = make_input("vit")
    maps = attention_maps(model, x)
    seen = {}
    model.blocks[3].attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    model(x)
    attn = model.blocks[3].attn
    b, n, c = seen["x"].shape
    q, k, v = attn.qkv(seen["x"]).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(maps[3] @ v, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the model stays as it was

def test_hooks_leave_outputs_bitwise_unchanged_and_flags_restored():
    model = adapted("vit", "adapter", placement="attn+ffn")  # attn is wrapped: flags live on base_layer
    x = make_input("vit")
    y = model(x)
    attentions = [b.attn.base_layer for b in model.blocks]
    assert all(a.fused_attn for a in attentions)
    model.train()
    modes = [m.training for m in model.modules()]
    grads = {n: p.grad for n, p in model.named_parameters()}
    for mode in ("rollout", "attention", "gradcam"):
        e = explain(model, x, mode)
        torch.testing.assert_close(e.logits, model.eval()(x), rtol=0, atol=1e-5)  # unfused math, same model
        model.train()
    assert [m.training for m in model.modules()] == modes
    assert all(a.fused_attn for a in attentions)
    assert not any(a.attn_drop._forward_hooks for a in attentions)
    assert {n: p.grad for n, p in model.named_parameters()} == grads  # Grad-CAM adds no parameter gradients
    assert all(p.requires_grad == (n in pv.get_state(model).trainable_names) for n, p in model.named_parameters())
    assert torch.equal(model.eval()(x), y)

    with pytest.raises(RuntimeError):  # a failing forward still restores every flag and removes the hooks
        attention_maps(model, torch.randn(2, 5, 64, 64))
    assert all(a.fused_attn for a in attentions) and not any(a.attn_drop._forward_hooks for a in attentions)
    assert torch.equal(model(x), y)


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_prompts_are_part_of_the_attention_but_not_of_the_map(method, gate):
    model = adapted("vit", method, num_tokens=3, gate=gate)
    if gate:  # open gates: the maps are what the values are mixed by, [own softmax | gate x prompt softmax]
        with torch.no_grad():
            model.vpt.gates.abs_()
    x = make_input("vit")
    maps = attention_maps(model, x)
    layout = token_layout(model, x)
    assert (layout.prefix, layout.prompts, layout.fresh_prompts, layout.grid) == (1, 3, method == "vpt-deep", (4, 4))
    assert maps[0].shape[-1] == 1 + 3 + 16
    e = explain(model, x, "rollout")
    assert e.heatmap.shape == (2, 4, 4)
    torch.testing.assert_close(e.heatmap.sum((1, 2)), torch.ones(2))
    want = reference_rollout(maps, 1, 3, method == "vpt-deep", (4, 4), "token")
    torch.testing.assert_close(e.heatmap.double(), want, rtol=1e-4, atol=1e-6)
    # the share of the class token's attention on the prompts, per block, from the raw maps
    share = [float(a.mean(1)[:, 0, 1:4].sum(-1).mean()) for a in maps]
    assert e.prompt_share == pytest.approx(share, abs=1e-6)
    assert len(share) == len(model.blocks) and all(0.0 < s < 1.0 for s in share)
    assert explain(model, x, "attention").prompt_share == pytest.approx(share, abs=1e-6)
    # without prompts there is nothing to report
    assert explain(make_model("vit"), x).prompt_share is None


@pytest.mark.parametrize("method", pv.list_methods())
def test_every_method_explains(method):
    model = adapted("vit", method)
    x = make_input("vit")
    y = model(x)
    for mode in ("rollout", "attention"):
        e = explain(model, x, mode)
        assert e.heatmap.shape == (2, 4, 4) and torch.isfinite(e.heatmap).all()
        assert (e.heatmap >= 0).all()
    assert torch.equal(model(x), y)


def test_a_merged_model_explains_as_the_adapted_one():
    model = adapted("vit", "lora")
    x = make_input("vit")
    merged = pv.merge(model).eval()
    for mode in ("rollout", "attention"):
        torch.testing.assert_close(explain(merged, x, mode).heatmap, explain(model, x, mode).heatmap, rtol=0, atol=1e-5)


def test_wrapped_models_are_explained_through_unwrap(tmp_path):
    """torch.compile (`._orig_mod`) and DDP (`.module`) wrappers: the eager model inside is explained."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = adapted("vit", "lora")
    x = make_input("vit")
    want = pv.attention_rollout(model, x)
    compiled = torch.compile(model)  # lazy: never called, so nothing compiles
    assert torch.equal(pv.attention_rollout(compiled, x), want)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        assert torch.equal(pv.attention_rollout(ddp, x), want)
        assert torch.equal(explain(ddp, x, "gradcam").heatmap, explain(model, x, "gradcam").heatmap)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- Grad-CAM and Swin

@pytest.mark.parametrize("method", [None, "linear", "lora", "vpt-deep"])
def test_swin_gets_grad_cam_from_the_last_stage(method):
    model = adapted("swin", method) if method else make_model("swin").eval()
    x = make_input("swin")
    y = model(x)
    flags = [p.requires_grad for p in model.parameters()]
    heatmap, logits = pv.grad_cam(model, x)
    assert heatmap.shape == (2, 32, 32) and torch.isfinite(heatmap).all()
    assert heatmap.min() >= 0 and heatmap.amax((1, 2)).allclose(torch.ones(2))  # per-image [0, 1]
    torch.testing.assert_close(logits, y, rtol=0, atol=1e-5)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model(x), y)
    e = explain(model, x)  # default mode for Swin
    assert e.mode == "gradcam" and e.block == len(pv.describe(model).blocks) - 1
    # an earlier block of the first stage: a map too (the reshape follows the block's own grid)
    assert grad_cam(model, x, block=0)[0].shape == (2, 32, 32)


def test_swin_refuses_rollout_and_bad_options_fail_in_one_line():
    x = make_input("swin")
    with pytest.raises(UnsupportedModelError, match="windowed.*gradcam"):
        explain(make_model("swin"), x, "rollout")
    vit, xv = make_model("vit"), make_input("vit")
    with pytest.raises(ConfigError, match="block 6 is out of range: the model has 6 blocks"):
        explain(vit, xv, "attention", block=6)
    with pytest.raises(ConfigError, match="head_fusion"):
        explain(vit, xv, head_fusion="median")
    with pytest.raises(ConfigError, match="discard_ratio"):
        explain(vit, xv, discard_ratio=1.0)
    assert explain(vit, xv, "attention", block=-1).block == 5


# ----------------------------------------------------------------------------- the command line

def write_photos(root: Path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for folder in ("a", "b"):  # the same file name twice: two PNGs, not one overwritten
        (root / folder).mkdir(parents=True)
        path = root / folder / "photo.jpg"
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_cli_writes_one_png_per_image_with_the_base_beside_it(tmp_path, base_checkpoint, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = base_checkpoint("vit")
    name, kwargs, _ = BACKBONES["vit"]
    model = pv.inject(pv.create_model(name, checkpoint=ckpt, num_classes=5, **kwargs), "vpt-deep", num_tokens=2)
    randomize_trainable(model)
    pv.save_adapter(model, "adapter", class_names=["cat", "dog", "cow", "owl", "eel"])
    photos = write_photos(tmp_path / "in")
    assert main(["explain", "--adapter", "adapter", "--checkpoint", ckpt, *photos, "--output", "out", "--compare-base"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo-1.png", "photo.png"]
    assert len(lines) == 2 and all(len(line) <= 100 for line in lines), lines
    assert lines[0].startswith("wrote out/photo.png: rollout block 5, top-1 ") and "prompts get" in lines[0]
    assert any(c in lines[0] for c in ("cat", "dog", "cow", "owl", "eel"))
    with Image.open(tmp_path / "out" / "photo.png") as png:
        assert png.format == "PNG" and png.width > 2 * png.height  # four panels side by side
    assert main(["explain", "--adapter", "adapter", "--checkpoint", ckpt, photos[0], "--output", "o2",
                 "--mode", "attention", "--block", "2"]) == 0
    assert "attention block 2" in capsys.readouterr().out


def test_cli_explains_a_merged_checkpoint_with_its_own_head(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = pv.inject(pv.create_model("test_vit", num_classes=7), "lora")  # timm's default size: --model rebuilds it
    randomize_trainable(model)
    pv.save_merged(model, "merged.safetensors")
    loaded = pv.load_model("test_vit", checkpoint="merged.safetensors").eval()
    x = torch.randn(1, 3, 160, 160)
    torch.testing.assert_close(loaded(x), pv.merge(model).eval()(x), rtol=0, atol=1e-5)  # head included
    photo = write_photos(tmp_path / "in")[0]
    assert main(["explain", "--model", "test_vit", "--checkpoint", "merged.safetensors", photo, "--output", "m",
                 "--mode", "gradcam"]) == 0
    assert capsys.readouterr().out.startswith("wrote m/photo.png: gradcam block 5, top-1 ")


@pytest.fixture
def saved(tmp_path, base_checkpoint):
    """(adapter directory, base checkpoint) for a family."""

    def save(kind: str) -> tuple[str, str]:
        ckpt = base_checkpoint(kind)
        name, kwargs, _ = BACKBONES[kind]
        model = pv.inject(pv.create_model(name, checkpoint=ckpt, num_classes=5, **kwargs), "linear")
        pv.save_adapter(model, tmp_path / f"adapter-{kind}")
        return str(tmp_path / f"adapter-{kind}"), ckpt

    return save


@pytest.mark.parametrize(
    "case,message",
    [
        ("not-an-image", "cannot read image"),
        ("missing-image", "image file not found"),
        ("block", "block 9 is out of range: the model has 6 blocks (0..5)"),
        ("swin-rollout", "use --mode gradcam"),
        ("both-sources", "give exactly one of --adapter DIR and --model NAME"),
        ("base-without-adapter", "--compare-base compares an adapter with its base"),
        ("damaged-checkpoint", "is truncated or not a safetensors file"),
        ("other-architecture", "is not a complete 'test_vit' checkpoint"),  # a 64-px model's weights
    ],
)
def test_cli_bad_input_gives_one_line(tmp_path, saved, capsys, case, message):
    photo = write_photos(tmp_path / "in")[0]
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    vit, ckpt = saved("vit")
    argv = {
        "not-an-image": ["--adapter", vit, "--checkpoint", ckpt, str(text)],
        "missing-image": ["--adapter", vit, "--checkpoint", ckpt, str(tmp_path / "nope.jpg")],
        "block": ["--adapter", vit, "--checkpoint", ckpt, photo, "--block", "9"],
        "swin-rollout": ["--adapter", saved("swin")[0], "--checkpoint", saved("swin")[1], photo, "--mode", "rollout"],
        "both-sources": ["--adapter", vit, "--model", "test_vit", photo],
        "base-without-adapter": ["--model", "test_vit", "--checkpoint", ckpt, photo, "--compare-base"],
        "damaged-checkpoint": ["--model", "test_vit", "--checkpoint", str(text.with_suffix(".safetensors")), photo],
        "other-architecture": ["--model", "test_vit", "--checkpoint", ckpt, photo],
    }[case]
    text.with_suffix(".safetensors").write_bytes(b"\x00" * 64)
    assert main(["explain", *argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------- the real backbone

@pytest.mark.skipif(not (BACKBONE.is_file() and PHOTO.is_file()), reason=f"the real backbone and photos are not in {SHARED}")
def test_real_backbone_looks_at_the_dog():
    """The real ViT-Tiny on a golden retriever standing on grass (the dog fills patch columns 2-9 of
    the 14x14 centre crop, grass the top right): the rollout weighs a dog patch about twice a grass patch."""
    from peftvision.data import make_transform, open_image

    model = pv.load_model("vit_tiny_patch16_224", checkpoint=str(BACKBONE)).eval()
    assert model.num_classes == 200  # the checkpoint's own head, not a new one
    x = make_transform(model)(open_image(PHOTO)).unsqueeze(0)
    e = explain(model, x)
    assert e.heatmap.shape == (1, 14, 14)
    dog, grass = e.heatmap[0, :, 2:10].mean(), e.heatmap[0, :9, 10:].mean()
    assert dog > 1.5 * grass, (float(dog), float(grass))
    assert e.logits.softmax(-1).max() > 0.3  # a confident prediction: the head was loaded
