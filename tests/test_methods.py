"""Every registered method on every backbone family: shapes, trainable sets, identities at init, eval policy."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import FAMILIES, make_input, make_model, randomize_trainable
from torch import nn

import peftvision as pv
from peftvision.errors import ConfigError, PeftVisionError, UnsupportedModelError
from peftvision.methods import build_config, get_method

METHODS = pv.list_methods()


def head_params(base: nn.Module) -> int:
    return sum(p.numel() for n, p in base.named_parameters() if n.startswith("head"))


# every method with its defaults, plus the option sets it declares: a new method is tested as it lands
CASES = [(m, {}) for m in METHODS] + [(m, dict(o)) for m in METHODS for o in get_method(m).examples]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" if o else m for m, o in CASES]


def test_every_method_declares_its_parameter_count_and_capabilities():
    base = make_model("vit")
    for name in METHODS:
        m = get_method(name)
        assert m.expected_params(base, pv.describe(base), build_config(m)) >= 0, name
        for options in ({}, *m.examples):
            build_config(m, dict(options))  # the declared examples are valid options
        assert m.kind in ("baseline", "peft")
    assert METHODS[:3] == ["linear", "full", "bitfit"], "baselines are listed first"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_trainable_set_and_counts(family, method, opts):
    base = make_model(family)
    m = get_method(method)
    expected = m.expected_params(base, pv.describe(base), build_config(m, opts))  # from the plain base
    model = pv.inject(copy.deepcopy(base), method, **opts)
    report = pv.param_report(model)
    assert report.method_params == expected
    assert report.head_params == head_params(base) > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(pv.get_state(model).trainable_names)
    # head always trains; frozen backbone weights never do (except where the method unfreezes them)
    assert {n for n in trainable if n.startswith("head")} == {n for n, _ in base.named_parameters() if n.startswith("head")}
    added = {id(p) for mod in model.modules() if isinstance(mod, pv.methods.PeftModule) for p in mod.adapter_parameters()}
    params = dict(model.named_parameters())
    if not m.trains_base_weights:  # everything but the head is a parameter of a module the method added
        assert all(id(params[n]) in added for n in trainable if not n.startswith("head"))
    assert report.total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_forward_backward_and_init_identity(family, method, opts):
    base = make_model(family).eval()
    x = make_input(family)
    with torch.no_grad():
        y0 = base(x)
    model = pv.inject(copy.deepcopy(base), method, **opts)
    model.eval()
    with torch.no_grad():
        y1 = model(x)
    assert y1.shape == (2, 5)
    config = build_config(method, opts)
    if not get_method(method).starts_as_base(config):
        assert not torch.allclose(y0, y1, atol=1e-4), "the method says it changes what the model computes"
    else:  # zero-initialised (LoRA B = 0, adapter up = 0) or no new modules at all
        torch.testing.assert_close(y1, y0, rtol=0, atol=1e-6)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    # what sits before a zero-initialised factor (LoRA's A while B = 0, as in the paper) gets no gradient
    # yet; every other trainable tensor does
    silent = get_method(method).silent_parameters(config)
    nonzero = {n for n, g in grads.items() if g.abs().sum() > 0}
    assert nonzero >= {n for n in grads if not any(s in n for s in silent)}


def _deterministic(method: str) -> dict[str, float]:
    """Options that switch off a method's own regularisers (its dropout, adapter-plus's stochastic
    depth), random by design, for tests that compare two training-mode forward passes."""
    return {f.name: 0.0 for f in dataclasses.fields(get_method(method).config_cls) if f.name in ("dropout", "drop_path")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_frozen_backbone_stays_in_eval(family, method):
    # with drop-path and dropout on, a training-mode forward is random wherever the backbone runs in train
    # mode -- also inside the modules a method wraps (an adapter wraps timm's whole `mlp`)
    model = pv.inject(make_model(family, drop_path_rate=0.5, drop_rate=0.0, proj_drop_rate=0.3, attn_drop_rate=0.3), method, **_deterministic(method))
    model.train()
    x = make_input(family)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    if not get_method(method).freeze_backbone:
        assert not torch.allclose(a, b), "full fine-tuning keeps timm's drop-path"
        assert all(m.training for m in model.modules())
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        peft_modules = [m for m in model.modules() if isinstance(m, pv.methods.PeftModule)]
        assert all(m.training for m in peft_modules)
        wrapped = [m for p in peft_modules if isinstance(getattr(p, "base_layer", None), nn.Module) for m in p.base_layer.modules()]
        assert not any(m.training for m in wrapped), "a wrapped backbone module is still the frozen backbone"
        assert model.training, "the root keeps reporting training mode to trainers"
    model.eval()
    assert not any(m.training for m in model.modules())


def _gated_attention_reference(attn: nn.Module, x: torch.Tensor, prompts: slice, gate: torch.Tensor) -> torch.Tensor:
    """Zero-init gated attention by hand: softmax over the own keys + gate x softmax over the prompt keys.
    x (B, L, D) is the normed sequence, `prompts` the prompts' positions in it, gate (heads,)."""
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, heads, L, L)
    extra = torch.zeros(n, dtype=torch.bool)
    extra[prompts] = True
    out = logits[..., ~extra].softmax(-1) @ v[:, :, ~extra] + gate.view(1, -1, 1, 1) * (logits[..., extra].softmax(-1) @ v[:, :, extra])
    return attn.proj(out.transpose(1, 2).reshape(b, n, -1))


def _vit_reference(model: nn.Module, x: torch.Tensor, prompts: torch.Tensor, deep: bool,
                   gates: torch.Tensor | None = None) -> torch.Tensor:
    """VPT on a ViT written out by hand from timm's own pieces, hooks removed (gates: (blocks, heads))."""
    npt = model.num_prefix_tokens
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    p = prompts.shape[1]
    for i, blk in enumerate(model.blocks):
        if i == 0:
            h = torch.cat([h[:, :npt], prompts[0].expand(len(x), -1, -1), h[:, npt:]], 1)
        elif deep:
            h = torch.cat([h[:, :npt], prompts[i].expand(len(x), -1, -1), h[:, npt + p:]], 1)
        if gates is None:
            h = blk.forward(h)  # .forward, not __call__: bypass peftvision's hooks
        else:  # timm's pre-norm block, with the attention written out
            h = h + blk.ls1(_gated_attention_reference(blk.attn, blk.norm1(h), slice(npt, npt + p), gates[i]))
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    h = torch.cat([h[:, :npt], h[:, npt + p:]], 1)
    return model.forward_head(model.norm(h))


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("kind", ["vit", "vit-map", "vit-gap"])
@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_vpt_vit_matches_hand_written_reference(kind, method, gate):
    # vit-gap: no class token, average pooling -- no prefix tokens, the prompts lead the sequence
    base = make_model("vit", class_token=False, global_pool="avg") if kind == "vit-gap" else make_model(kind)
    assert base.num_prefix_tokens == (0 if kind == "vit-gap" else 1)
    model = pv.inject(base, method, num_tokens=4, gate=gate).eval()
    x = make_input("vit" if kind == "vit-gap" else kind)
    with torch.no_grad():
        if gate:  # open the gates: zero gates are the base model, tested with every method
            model.vpt.gates.normal_()
        expected = _vit_reference(model, x, model.vpt.prompts, deep=method == "vpt-deep",
                                  gates=model.vpt.gates if gate else None)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_vpt_vit_head_reads_the_same_tokens_with_registers_and_distillation():
    for name, kwargs, npt in [
        ("vit_small_patch16_224", dict(img_size=32, embed_dim=32, depth=2, num_heads=2, reg_tokens=4), 5),
        ("deit_small_distilled_patch16_224", dict(img_size=32, embed_dim=32, depth=2, num_heads=2), 2),
    ]:
        model = pv.create_model(name, num_classes=3, **kwargs)
        seen = []
        model.norm.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
        x = torch.randn(2, 3, 32, 32)
        model.eval()(x)
        pv.inject(model, "vpt-deep", num_tokens=7).eval()(x)
        assert model.num_prefix_tokens == npt
        assert seen[0] == seen[1] == npt + 4, "prompts must be gone before the final norm and head"


def _swin_block_reference(block, x, prompts, gate=None):
    """One prompted Swin block as the VPT authors' PromptedSwinTransformerBlock computes it; with `gate`
    (heads,), zero-init gated attention: softmax over the window's tokens + gate x softmax over the prompts.

    x: (B, H, W, C); prompts: (B, P, C). Returns (x_out, prompts_out).
    """
    import torch.nn.functional as F
    from timm.models.swin_transformer import window_partition, window_reverse

    b, hh, ww, c = x.shape
    p = prompts.shape[1]
    attn = block.attn
    shortcut_x, shortcut_p = x, prompts
    xn, pn = block.norm1(x), block.norm1(prompts)
    sh = block.shift_size
    if any(sh):
        xn = torch.roll(xn, shifts=(-sh[0], -sh[1]), dims=(1, 2))
    win = window_partition(xn, block.window_size).reshape(-1, block.window_area, c)  # (B*nW, N, C)
    nw = win.shape[0] // b
    tokens = torch.cat([pn.repeat_interleave(nw, 0), win], 1)
    n = tokens.shape[1]
    qkv = attn.qkv(tokens).reshape(b * nw, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B*nW, h, P+N, P+N)
    bias = torch.zeros(attn.num_heads, n, n)
    bias[:, p:, p:] = attn._get_rel_pos_bias()[0]
    logits = logits + bias
    if block.attn_mask is not None:
        mask = torch.zeros(nw, n, n)
        mask[:, p:, p:] = block.attn_mask
        logits = (logits.view(b, nw, attn.num_heads, n, n) + mask[None, :, None]).view(-1, attn.num_heads, n, n)
    if gate is None:
        out = F.softmax(logits, -1) @ v
    else:
        out = F.softmax(logits[..., p:], -1) @ v[:, :, p:] + gate.view(1, -1, 1, 1) * (F.softmax(logits[..., :p], -1) @ v[:, :, :p])
    out = out.transpose(1, 2).reshape(b * nw, n, -1)
    out = attn.proj(out)
    p_out = out[:, :p].reshape(b, nw, p, c).mean(1)
    xw = window_reverse(out[:, p:].reshape(-1, *block.window_size, c), block.window_size, hh, ww)
    if any(sh):
        xw = torch.roll(xw, shifts=sh, dims=(1, 2))
    x = shortcut_x + xw
    x = x + block.mlp(block.norm2(x))
    prompts = shortcut_p + p_out
    prompts = prompts + block.mlp(block.norm2(prompts))
    return x, prompts


@pytest.mark.parametrize("gate", [False, True])
def test_vpt_swin_shallow_matches_the_authors_block_math(gate):
    model = pv.inject(make_model("swin"), "vpt-shallow", num_tokens=3, gate=gate).eval()
    x = make_input("swin")
    with torch.no_grad():
        if gate:
            [g.normal_() for g in model.vpt.gates]
        h = model.patch_embed(x)
        prompts = model.vpt.prompts[0][0].expand(len(x), -1, -1)
        for s, stage in enumerate(model.layers):
            if s > 0:
                ds = stage.downsample
                prompts = ds.reduction(ds.norm(torch.cat([prompts] * 4, -1)))
                h = ds(h)
            for j, blk in enumerate(stage.blocks):
                h, prompts = _swin_block_reference(blk, h, prompts, model.vpt.gates[s][j] if gate else None)
        expected = model.forward_head(model.norm(h))
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gate", [False, True])
def test_vpt_swin_deep_uses_a_new_prompt_per_block(gate):
    model = pv.inject(make_model("swin"), "vpt-deep", num_tokens=3, gate=gate).eval()
    assert [tuple(p.shape) for p in model.vpt.prompts] == [(2, 3, 24), (2, 3, 48), (2, 3, 96)]
    x = make_input("swin")
    with torch.no_grad():
        if gate:
            assert [tuple(g.shape) for g in model.vpt.gates] == [(2, blk.attn.num_heads) for blk in (s.blocks[0] for s in model.layers)]
            [g.normal_() for g in model.vpt.gates]
        h = model.patch_embed(x)
        for s, stage in enumerate(model.layers):
            h = stage.downsample(h)
            for j, blk in enumerate(stage.blocks):
                h, _ = _swin_block_reference(blk, h, model.vpt.prompts[s][j].expand(len(x), -1, -1),
                                             model.vpt.gates[s][j] if gate else None)
        expected = model.forward_head(model.norm(h))
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gate", [False, True])
def test_vpt_swin_prompts_do_not_mix_images_in_a_batch(gate):
    model = pv.inject(make_model("swin"), "vpt-shallow", num_tokens=3, gate=gate).eval()
    x = make_input("swin", batch=3)
    with torch.no_grad():
        if gate:
            [g.normal_() for g in model.vpt.gates]
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_only_the_requested_slices(family):
    model = pv.inject(make_model(family), "lora", targets=("k",), r=2)
    randomize_trainable(model)
    qkv = model.get_submodule(pv.get_state(model).backbone.blocks[0].name + ".attn.qkv")
    delta = qkv.delta_weight()
    width = delta.shape[0] // 3
    assert delta[:width].abs().sum() == 0 and delta[2 * width:].abs().sum() == 0
    assert delta[width:2 * width].abs().sum() > 0
    x = torch.randn(4, qkv.in_features)
    torch.testing.assert_close(qkv(x), torch.nn.functional.linear(x, qkv.base_layer.weight + delta, qkv.bias))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_bf16_autocast_trains_every_parameter(family, method, opts):
    """--mixed-precision bf16 on CPU runs each method's forward under autocast: dtypes must line up, and
    the method must add no more rounding error than the backbone has on its own."""

    def bf16_error(model: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        y32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = model(x)
        return ((y16.float() - y32).norm() / y32.norm()).item(), y16

    x = make_input(family)
    base = make_model(family).train()
    base_error, _ = bf16_error(base, x)  # ~0.5% on the tiny ViT, ~30% on the tiny Swin (1% on Swin-T)
    model = pv.inject(base, method, **{**opts, **_deterministic(method)})
    randomize_trainable(model)
    error, y16 = bf16_error(model, x)
    assert error <= 2 * base_error + 0.01
    torch.nn.functional.cross_entropy(y16.float(), torch.tensor([0, 1])).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("slices,num_slices", [((0, 2), 3), ((1,), 3), ((0, 1, 2), 3), ((0,), 1)])
def test_lora_linear_output_and_gradients_equal_the_dense_update(slices, num_slices):
    """The fused forward (one matmul for A, an in-place addmm for B) is W + scaling * B @ A, gradients too."""
    from peftvision.methods.lora import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(12, 18).requires_grad_(False)
    layer = LoRALinear(base, slices, num_slices, r=2, alpha=3.0, dropout=0.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 12, requires_grad=True)  # (batch, tokens, dim) as in a timm block
    g = torch.randn(2, 5, 18)
    layer(x).backward(g)
    got = (x.grad, layer.lora_A.grad, layer.lora_B.grad)
    x2 = x.detach().clone().requires_grad_(True)
    a, b = layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True)
    rows = torch.zeros(num_slices, 18 // num_slices, len(slices), 2)
    for i, s in enumerate(slices):
        rows[s, :, i, :] = b[i]  # the dense B written out independently of block_b()
    dense = torch.nn.functional.linear(x2, base.weight + 1.5 * rows.reshape(18, -1) @ a, base.bias)
    torch.testing.assert_close(layer(x), dense)
    dense.backward(g)
    for mine, ref in zip(got, (x2.grad, a.grad, b.grad)):
        torch.testing.assert_close(mine, ref)


FUNCTIONAL_QKV = {  # attentions that call F.linear(x, attn.qkv.weight, own q/v biases) instead of attn.qkv(x)
    "beit_base_patch16_224": dict(img_size=32, embed_dim=32, depth=2, num_heads=2),
    "eva02_tiny_patch14_224": dict(img_size=28, embed_dim=32, depth=2, num_heads=2),
    "swinv2_tiny_window8_256": dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 2)),
}


@pytest.mark.parametrize("name", FUNCTIONAL_QKV)
def test_lora_works_where_timm_calls_qkv_weight_functionally(name):
    kwargs = FUNCTIONAL_QKV[name]
    model = pv.create_model(name, num_classes=3, **kwargs).eval()
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    y0 = model(x)
    pv.inject(model, "lora").eval()
    torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-6)
    randomize_trainable(model)
    y1 = model(x)
    assert not torch.allclose(y0, y1, atol=1e-4)
    torch.testing.assert_close(pv.merge(model)(x), y1, rtol=0, atol=1e-5)
    # prompts do not fit these attentions (relative positions, RoPE, SwinV2's own windows): say so
    with pytest.raises(UnsupportedModelError, match="use lora or adapter with this model"):
        pv.inject(pv.create_model(name, num_classes=3, **kwargs), "vpt-deep")


def test_unmerge_restores_weights():
    model = pv.inject(make_model("vit"), "lora", targets=("q", "v", "fc1")).eval()
    randomize_trainable(model)
    x = make_input("vit")
    y = model(x)
    layers = [m for m in model.modules() if isinstance(m, pv.methods.PeftModule)]
    before = [m.base_layer.weight.clone() for m in layers]
    for m in layers:
        m.merge()
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
    for m in layers:
        m.unmerge()
    for m, w in zip(layers, before):
        torch.testing.assert_close(m.base_layer.weight, w, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- bad input

def test_unknown_method_and_options():
    with pytest.raises(ConfigError, match="unknown method 'lorax'; choose one of: linear, full"):
        pv.inject(make_model("vit"), "lorax")
    with pytest.raises(ConfigError, match="lora has no option rank; its options are: alpha, dropout, init, lr_ratio, r, targets, use_rslora"):
        pv.inject(make_model("vit"), "lora", rank=4)
    with pytest.raises(ConfigError, match="targets must be distinct names among q, k, v"):
        pv.inject(make_model("vit"), "lora", targets=("q", "x"))
    with pytest.raises(ConfigError, match="target qkv .* excludes q, k, v"):
        pv.inject(make_model("vit"), "lora", targets=("qkv", "q"))
    with pytest.raises(ConfigError, match="placement must be one of"):
        pv.inject(make_model("vit"), "adapter", placement="sideways")
    with pytest.raises(ConfigError, match="num_tokens must be a positive integer"):
        pv.inject(make_model("vit"), "vpt-deep", num_tokens=0)


def test_models_without_transformer_blocks_are_refused():
    with pytest.raises(UnsupportedModelError, match="test_resnet: no transformer blocks found"):
        pv.inject(pv.create_model("test_resnet"), "lora")


def test_vpt_refuses_position_dependent_attention():
    with pytest.raises(UnsupportedModelError, match="test_vit_relpos: .*position-dependent.*use lora or adapter"):
        pv.inject(pv.create_model("test_vit_relpos"), "vpt-shallow")


def test_double_injection_and_unknown_model_are_refused():
    model = pv.inject(make_model("vit"), "lora")
    with pytest.raises(PeftVisionError, match="already has lora injected"):
        pv.inject(model, "adapter")
    with pytest.raises(ConfigError, match="unknown timm model 'vit_nonexistent_patch16'"):
        pv.create_model("vit_nonexistent_patch16")


def test_offline_hub_download_gives_one_line_hint():
    # conftest gives the session an empty Hugging Face cache: the weights cannot be there, whatever the user's holds
    with pytest.raises(PeftVisionError, match="no network.*--checkpoint FILE"):
        pv.create_model("test_vit", pretrained=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,options", CASES, ids=IDS)
def test_inject_keeps_the_mode_it_found(family, method, options):
    """torch creates modules in training mode: injected into a model in eval mode, they must be in eval
    mode too (else an eval call runs a new module's dropout / drop-path, and two identical calls differ)."""
    model = make_model(family).eval()
    try:
        pv.inject(model, method, **options)
    except UnsupportedModelError:
        pytest.skip(f"{method} does not support {family}")
    randomize_trainable(model)
    assert not any(m.training for m in model.modules()), [n for n, m in model.named_modules() if m.training][:3]
    x = make_input(family)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    trained = pv.inject(make_model(family).train(), method, **options)
    assert trained.training and all(m.training for m in trained.modules() if isinstance(m, pv.methods.PeftModule))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_grad_checkpointing_gives_the_same_gradients_or_a_clear_error(family, method):
    from peftvision.methods.inject import enable_grad_checkpointing

    x = make_input(family)

    def grads(checkpointing: bool):
        model = pv.inject(make_model(family), method)
        randomize_trainable(model)
        if checkpointing:
            enable_grad_checkpointing(model)
        model.train()
        model(x).square().sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    base = make_model(family)
    m = get_method(method)
    if m.grad_checkpointing_unsupported(pv.describe(base), build_config(m)):
        with pytest.raises(PeftVisionError, match=f"does not work with {method}"):
            grads(True)
        return
    plain, recomputed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-4, atol=1e-5)
