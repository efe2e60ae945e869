"""Where a model looks: attention maps, attention rollout and Grad-CAM, for a base or an adapted model.

ViT family
    timm's attention runs fused (`scaled_dot_product_attention`), which never forms the attention
    matrix, so hooks on `attn_drop` -- what attention-rollout scripts use -- silently see nothing.
    `attention_maps` switches `fused_attn` off for the one forward pass it makes, reads the input of
    `attn_drop` (the softmax probabilities, before any dropout) and restores every flag afterwards,
    even on error: the model computes exactly what it computed before.

    A block's sequence is [prefix tokens (class, register, distillation), prompts, patches]; prompts
    are there only when a method added them (VPT). Maps cover the patch grid only. The class token's
    row is read for token-pooled models; mean-pooled models (`global_pool='avg'`) and attention-pool
    heads (`'map'`, whose latent query runs fused without a hook point) read the mean of the patch
    tokens' rows, the tokens the head pools.

    Rollout (Abnar & Zuidema, 2020): per block, fuse the heads (mean, max or min), zero the lowest
    `discard_ratio` of the entries, add the identity (the residual path) and renormalise each row,
    then multiply the blocks together. Prompts stay in the product -- the class token reaches the
    patches through them too -- and are treated as sources outside the image: prompts that are
    replaced before every block (deep prompts) start each block as fresh sources, and whatever flow
    ends on a prompt or a prefix token is left out. The map is the rest, renormalised to sum to 1.
    `prompt_share` is, per block, the share of the read-out rows' raw attention (mean over heads)
    that goes to the prompts.

Swin family
    Window attention has no global attention matrix to roll out, so Swin is explained with Grad-CAM
    (pytorch-grad-cam) on a block's output, by default the last block of the last stage. The reshape
    to (B, C, h, w) comes from `describe(model)`: Swin blocks give NHWC maps; ViT blocks give tokens,
    whose last h*w are the patches. Gradients are taken with respect to the input only: parameters
    are frozen for the call (their `requires_grad` and `.grad` are restored), so a fully frozen
    adapted model works and nothing accumulates in the model's gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .backbones.backbone import Backbone, describe
from .errors import ConfigError, UnsupportedModelError
from .methods.freeze import unwrap

MODES = ("rollout", "attention", "gradcam")
HEAD_FUSIONS = ("mean", "max", "min")


@dataclass
class Explanation:
    """One explanation of a batch: where the model looked, and what it predicted."""

    mode: str  # rollout | attention | gradcam
    heatmap: torch.Tensor  # (B, h, w): patch grid (rollout, attention) or input pixels (gradcam)
    logits: torch.Tensor  # (B, num_classes) of the same forward pass
    block: int  # the last block used (rollout: through it; attention, gradcam: that block)
    prompt_share: list[float] | None = None  # per block, mean over the batch; None without prompts


@dataclass(frozen=True)
class TokenLayout:
    """Where each kind of token sits in a ViT block's sequence: [prefix, prompts, patches]."""

    prefix: int  # class + register + distillation tokens
    prompts: int  # prompt tokens a method inserted after the prefix (0 without)
    fresh_prompts: bool  # prompts are replaced before every block (deep) instead of carried along
    grid: tuple[int, int]  # patch grid (h, w)
    readout: str  # "token": the class token's row; "patches": the mean of the patch tokens' rows

    @property
    def num_tokens(self) -> int:
        return self.prefix + self.prompts + self.grid[0] * self.grid[1]

    @property
    def prompt_slice(self) -> slice:
        return slice(self.prefix, self.prefix + self.prompts)

    @property
    def patch_slice(self) -> slice:
        return slice(self.prefix + self.prompts, self.num_tokens)

    def read(self, a: torch.Tensor) -> torch.Tensor:
        """(B, N, N) -> (B, N): the row(s) the head reads."""
        return a[:, 0] if self.readout == "token" else a[:, self.patch_slice].mean(dim=1)


# ----------------------------------------------------------------------------- model structure

def _prompts(model: nn.Module) -> tuple[int, bool]:
    """(prompt tokens per block, replaced before every block?) of the model's method, (0, False) without:
    the method knows how it attaches prompts (`Method.prompt_tokens`)."""
    from .methods import get_method
    from .methods.freeze import get_state

    state = get_state(model)
    if state is None:
        return 0, False
    return get_method(state.method).prompt_tokens(unwrap(model), state.backbone, state.config)


def _vit_attentions(model: nn.Module, backbone: Backbone) -> list[nn.Module]:
    """timm's attention module of every block (through wrappers' `base_layer`), or a one-line refusal."""
    if backbone.family != "vit":
        raise UnsupportedModelError(
            f"{backbone.architecture}: its attention is windowed ({backbone.family} family), so there is "
            f"no attention over the whole image to read; use --mode gradcam / mode='gradcam'"
        )
    found = []
    for info in backbone.blocks:
        attn = backbone.block_module(model, info, "attn")
        while isinstance(getattr(attn, "base_layer", None), nn.Module):
            attn = attn.base_layer
        if not (hasattr(attn, "fused_attn") and isinstance(getattr(attn, "attn_drop", None), nn.Module)):
            raise UnsupportedModelError(
                f"{backbone.architecture}: {info.name}.attn ({type(attn).__name__}) has no `fused_attn` switch "
                f"and `attn_drop` to read attention from; use --mode gradcam / mode='gradcam'"
            )
        found.append(attn)
    return found


def token_layout(model: nn.Module, x: torch.Tensor) -> TokenLayout:
    """The token layout of a ViT-family model on input `x` (B, C, H, W)."""
    model = unwrap(model)
    return _layout(model, describe(model), x)


def _layout(model: nn.Module, backbone: Backbone, x: torch.Tensor) -> TokenLayout:
    prompts, fresh = _prompts(model)
    grid = (x.shape[-2] // backbone.patch_size[0], x.shape[-1] // backbone.patch_size[1])
    pool = getattr(model, "global_pool", "token" if backbone.num_prefix_tokens else "avg")
    readout = "token" if pool == "token" and backbone.num_prefix_tokens else "patches"
    return TokenLayout(backbone.num_prefix_tokens, prompts, fresh, grid, readout)


def _check_options(head_fusion: str, discard_ratio: float) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise ConfigError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ConfigError(f"discard_ratio must be in [0, 1), got {discard_ratio}")


def _block_index(block: int | None, count: int) -> int:
    """A block index (negative counts from the end; None: the last), or a one-line error."""
    if block is None:
        return count - 1
    if not -count <= block < count:
        raise ConfigError(f"block {block} is out of range: the model has {count} blocks (0..{count - 1})")
    return block % count


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate without dropout, then give every module back the mode it had."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# ----------------------------------------------------------------------------- ViT attention

def _capture(model: nn.Module, backbone: Backbone, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass of the unwrapped `model` with unfused attention: (logits, per block (B, heads,
    N, N) probabilities)."""
    attentions = _vit_attentions(model, backbone)
    maps: list[torch.Tensor | None] = [None] * len(attentions)

    def keep(i: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            maps[i] = args[0].detach()  # softmax output, before dropout

        return hook

    flags = [a.fused_attn for a in attentions]
    handles = []
    try:
        for i, a in enumerate(attentions):
            a.fused_attn = False
            handles.append(a.attn_drop.register_forward_hook(keep(i)))
        with torch.no_grad(), _eval_mode(model):
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
        for a, flag in zip(attentions, flags):
            a.fused_attn = flag
    missing = [i for i, m in enumerate(maps) if m is None]
    if missing:
        raise UnsupportedModelError(
            f"blocks {missing} computed no attention matrix through `attn_drop`; use --mode gradcam / mode='gradcam'"
        )
    return logits, maps  # type: ignore[return-value]


def attention_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per block, the (B, heads, N, N) attention probabilities of a ViT-family model on `x`.

    N counts every token: prefix, prompts (if any), patches (see `token_layout`). The model is left
    exactly as it was (fused attention flags, hooks, train/eval mode).
    """
    model = unwrap(model)  # compiled / DDP models run their eager module: flags change no graph
    return _capture(model, describe(model), x)[1]


def _fuse(a: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N)."""
    if head_fusion == "mean":
        return a.mean(dim=1)
    if head_fusion == "max":
        return a.amax(dim=1)
    return a.amin(dim=1)


def _discard(a: torch.Tensor, ratio: float, prefix: int) -> torch.Tensor:
    """Zero the lowest `ratio` of each image's (N, N) entries; prefix tokens' self-attention is kept
    (jacobgil/vit-explain keeps the class token's, so its row never loses its own path)."""
    b, n, _ = a.shape
    k = int(n * n * ratio)
    if k == 0:
        return a
    flat = a.reshape(b, n * n).clone()
    rank = flat.clone()
    keep = torch.arange(prefix, device=a.device) * (n + 1)  # diagonal entries of the prefix tokens
    rank[:, keep] = float("inf")
    flat.scatter_(1, rank.topk(k, dim=1, largest=False).indices, 0.0)
    return flat.reshape(b, n, n)


def _to_grid(rows: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(B, N) read-out weights -> (B, h, w) over the patches, summing to 1."""
    patches = rows[:, layout.patch_slice]
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(patches.dtype).tiny)
    return patches.reshape(-1, *layout.grid)


def _check_layout(maps: Sequence[torch.Tensor], layout: TokenLayout) -> None:
    n = maps[0].shape[-1]
    if n != layout.num_tokens:
        raise UnsupportedModelError(
            f"the attention covers {n} tokens, but {layout.prefix} prefix + {layout.prompts} prompts + "
            f"{layout.grid[0]}x{layout.grid[1]} patches make {layout.num_tokens}: unknown token layout"
        )


def rollout(
    maps: Sequence[torch.Tensor], layout: TokenLayout, head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout of `attention_maps` output: (B, h, w) over the patch grid, summing to 1."""
    _check_options(head_fusion, discard_ratio)
    _check_layout(maps, layout)
    b, _, n, _ = maps[0].shape
    eye = torch.eye(n, dtype=maps[0].dtype, device=maps[0].device)
    joint = eye.expand(b, n, n).clone()  # (B, N, N): what each token holds of each source token
    prompts = layout.prompt_slice
    for i, a in enumerate(maps):
        if layout.fresh_prompts and i > 0:
            joint[:, prompts] = eye[prompts]  # replaced prompts carry nothing of earlier blocks
        a = _discard(_fuse(a, head_fusion), discard_ratio, layout.prefix) + eye  # (B, N, N), + residual
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a @ joint
    return _to_grid(layout.read(joint), layout)


def block_attention(
    maps: Sequence[torch.Tensor], layout: TokenLayout, block: int, head_fusion: str = "mean"
) -> torch.Tensor:
    """One block's raw attention from the read-out row(s) to the patches: (B, h, w), summing to 1."""
    _check_options(head_fusion, 0.0)
    _check_layout(maps, layout)
    return _to_grid(layout.read(_fuse(maps[block], head_fusion)), layout)


def prompt_share(maps: Sequence[torch.Tensor], layout: TokenLayout) -> list[float] | None:
    """Per block, the share of the read-out rows' attention (mean over heads and batch) on prompts."""
    if not layout.prompts:
        return None
    return [float(layout.read(a.mean(dim=1))[:, layout.prompt_slice].sum(dim=-1).mean()) for a in maps]


def attention_rollout(
    model: nn.Module, x: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0, block: int | None = None
) -> torch.Tensor:
    """(B, h, w) attention rollout over the patch grid of a ViT-family model, through `block` (default: all)."""
    return explain(model, x, "rollout", block=block, head_fusion=head_fusion, discard_ratio=discard_ratio).heatmap


# ----------------------------------------------------------------------------- Grad-CAM

@contextlib.contextmanager
def _input_gradients_only(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter for the call and restore `requires_grad` and `.grad` afterwards."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    for p, _, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad


def _nchw(backbone: Backbone, grid: tuple[int, int]) -> Any:
    """pytorch-grad-cam's reshape_transform for a block's output, from the backbone's family."""
    if backbone.family == "swin":
        return lambda t: t.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
    h, w = grid

    def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, N, C): prefix, prompts (blocks before the last), patches
        return t[:, -h * w :].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)

    return tokens


def grad_cam(
    model: nn.Module, x: torch.Tensor, block: int | None = None, target: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM on a block's output: ((B, H, W) maps at input resolution in [0, 1], (B, K) logits).

    Args:
        model: a ViT- or Swin-family model (base, adapted, merged).
        x: (B, C, H, W) input.
        block: index into `describe(model).blocks` (default: the last block, of the last stage).
        target: class to explain (default: each image's top-1 prediction).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = unwrap(model)
    backbone = describe(model)
    index = _block_index(block, len(backbone.blocks))
    layer = model.get_submodule(backbone.blocks[index].name)
    grid = (x.shape[-2] // backbone.patch_size[0], x.shape[-1] // backbone.patch_size[1])
    targets = None if target is None else [ClassifierOutputTarget(target)] * x.shape[0]
    with _eval_mode(model), _input_gradients_only(model), torch.enable_grad():
        cam = GradCAM(model=model, target_layers=[layer], reshape_transform=_nchw(backbone, grid))
        try:
            # the input carries the graph: parameters are frozen, and a frozen backbone would leave
            # the block's output without gradients
            heatmap = torch.from_numpy(cam(input_tensor=x.detach().clone().requires_grad_(True), targets=targets))
            logits = cam.outputs.detach()
        finally:
            cam.activations_and_grads.release()  # its __exit__ would swallow an IndexError
    return heatmap, logits


# ----------------------------------------------------------------------------- one call for all modes

def explain(
    model: nn.Module,
    x: torch.Tensor,
    mode: str | None = None,
    block: int | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> Explanation:
    """Where `model` looks on `x` (B, C, H, W), and its logits from the same forward pass.

    Args:
        mode: "rollout" (ViT family; through `block`), "attention" (one block's raw attention), or
            "gradcam" (any family; on `block`'s output). Default: rollout for ViT, gradcam for Swin.
        block: block index (negative from the end); default the last.
        head_fusion: how rollout and attention combine heads: mean, max or min.
        discard_ratio: rollout only: fraction of the lowest attention entries zeroed per block.
    """
    inner = unwrap(model)
    backbone = describe(inner)
    mode = mode or ("rollout" if backbone.family == "vit" else "gradcam")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    index = _block_index(block, len(backbone.blocks))
    if mode == "gradcam":
        heatmap, logits = grad_cam(inner, x, index)
        return Explanation(mode, heatmap, logits, index)
    _check_options(head_fusion, discard_ratio)  # before the forward pass
    logits, maps = _capture(inner, backbone, x)
    layout = _layout(inner, backbone, x)
    if mode == "rollout":
        heatmap = rollout(maps[: index + 1], layout, head_fusion, discard_ratio)
    else:
        heatmap = block_attention(maps, layout, index, head_fusion)
    return Explanation(mode, heatmap, logits, index, prompt_share(maps, layout))


def base_of(model: nn.Module, checkpoint: str | None = None) -> nn.Module:
    """The plain base an adapted model was built on, with the adapted model's head.

    The head is copied so that both models score the same classes: Grad-CAM then explains the same
    class, and the difference of two maps shows what the method changed in the backbone.
    """
    from .backbones.backbone import create_model, model_spec
    from .methods.freeze import get_state

    inner = unwrap(model)
    state = get_state(inner)
    if state is None:
        raise ConfigError("comparing with the base needs an adapted model (an adapter), not a plain one")
    spec = model_spec(inner)
    base = create_model(spec.name, pretrained=True, checkpoint=checkpoint, num_classes=inner.num_classes, **spec.kwargs)
    params = dict(inner.named_parameters())
    with torch.no_grad():
        for name, p in base.named_parameters():
            if state.backbone.is_head(name.rsplit(".", 1)[0]):
                p.copy_(params[name])
    return base.eval()


# ----------------------------------------------------------------------------- figure

def top_classes(logits: torch.Tensor, names: Sequence[str] | None, k: int = 3) -> str:
    """"name 0.812, name 0.071, ..." for one image's (K,) logits, as `predict` and `serve` give them."""
    from .data.labels import format_top_k, top_k

    return format_top_k(top_k(logits.float().softmax(-1), names, k))


def figure(
    image: torch.Tensor,
    explanation: Explanation,
    base: Explanation | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Any:
    """A matplotlib figure: the image, its map overlaid, and with `base` the base's map and the difference.

    Args:
        image: (3, H, W) in [0, 1], what the model saw.
        explanation: of a batch of one image.
        base: the base model's explanation of the same image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picture = image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()  # (H, W, 3)
    h, w = picture.shape[:2]
    panels = 2 if base is None else 4
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 3.0))
    fig.suptitle(f"{title}\ntop-3: {top_classes(explanation.logits[0], class_names)}", fontsize=9)

    def overlay(ax: Any, e: Explanation, label: str) -> None:
        m = e.heatmap[0].float()
        ax.imshow(picture)
        ax.imshow((m / m.max().clamp_min(1e-12)).cpu().numpy(), cmap="jet", alpha=0.5, extent=(0, w, h, 0),
                  interpolation="bilinear", vmin=0, vmax=1)
        ax.set_title(label, fontsize=8)

    axes[0].imshow(picture)
    axes[0].set_title("input", fontsize=8)
    what = f"{explanation.mode}, block {explanation.block}"
    overlay(axes[1], explanation, what if base is None else f"adapted: {what}")
    if base is not None:
        overlay(axes[2], base, f"base: top-1 {top_classes(base.logits[0], class_names, 1)}")
        share = lambda e: e.heatmap[0].float() / e.heatmap[0].float().sum()  # noqa: E731  (same scale)
        diff = share(explanation) - share(base)
        moved = 0.5 * float(diff.abs().sum())  # the share of the map that moved: 0 same, 1 disjoint
        lim = float(diff.abs().max()) or 1.0
        axes[3].imshow(picture.mean(axis=-1), cmap="gray", vmin=0, vmax=1)
        axes[3].imshow(diff.cpu().numpy(), cmap="bwr", vmin=-lim, vmax=lim, alpha=0.6, extent=(0, w, h, 0),
                       interpolation="bilinear")
        axes[3].set_title(f"adapted - base: {moved:.0%} moved (red: more)", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def display_image(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """(3, H, W) in [0, 1] from a normalised input image (3, H, W): what the model saw, crop included."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=unwrap(model))
    mean = torch.tensor(cfg["mean"]).view(-1, 1, 1)
    std = torch.tensor(cfg["std"]).view(-1, 1, 1)
    return (x.cpu() * std + mean).clamp(0, 1)
