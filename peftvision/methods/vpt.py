"""Visual Prompt Tuning (Jia et al., 2022): learnable prompt tokens, shallow (input only) or deep (every block).

The backbone's modules are not copied or subclassed: prompts enter through forward hooks on timm's own
blocks, so the unprompted path is timm's code, unchanged, and state-dict keys keep timm's names.

ViT family
    Prompts go right after the prefix tokens (class, register, distillation), without position
    embeddings. Shallow: inserted before the first block and carried through. Deep: before every block
    the prompt slots are overwritten by that block's own prompts. After the last block the prompt slots
    are removed, so the final norm, pooling and head read exactly the tokens they read before.

Swin family (the VPT authors' design for windowed attention)
    Prompts are prepended to *every* attention window: they act as queries and keys there, with the
    relative-position bias and the shifted-window mask padded with zeros for them. Their outputs are
    averaged over the windows of their image, added to their input (the block's residual) and sent
    through the block's MLP like any token. Shallow prompts are carried from block to block and, at a
    patch-merging step, into the next stage by repeating their channels 4x through the merge's own norm
    and reduction. Deep prompts are new at every block, each with its stage's width; their outputs are
    not used. Image tokens never contain prompts, so the head sees timm's usual features.
    Windows are ordered image-major as timm's `window_partition` orders them (the authors' code
    interleaves images there, mixing samples' shallow prompts when the batch is larger than 1).
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.backbone import Backbone
from ..errors import ConfigError, UnsupportedModelError
from ._parts import Part, Prompts
from ._registry import Method, PeftModule, register_method


@dataclass
class VPTConfig:
    num_tokens: int = 10  # prompts per layer; VPT reports 1-200 per task, 10 is its common middle ground
    dropout: float = 0.0  # dropout on the prompt embeddings (VPT searches 0.0 and 0.1)
    # the prompts' start. xavier: VPT's uniform noise. prototypes: k-means centres of each layer's patch
    # tokens on the training images (SPT, Wang et al., ICML 2024), so a prompt starts as a token the layer
    # already knows. Measured on real photos (benchmarks/RESULTS.md): prototypes +7 points on 60 photos,
    # 3-4.5 points lower from 250 up (token-sized prompts barely move at VPT's lr), so not the default
    init: str = "xavier"
    # gate: every block weighs what its attention reads from the prompts by a learned per-head gate that
    # starts at 0 (zero-init gated attention: LLaMA-Adapter, Zhang et al. 2023; gated prompts, Yoo et al.,
    # ICML 2023). Image tokens attend to the image as before, plus gate x their attention over the prompts
    # alone, so the model computes exactly the base's output until the first step, as LoRA's does. The
    # default since measuring it on real photos (benchmarks/RESULTS.md): ungated random prompts in every
    # block start 10 points below the linear probe on 60 photos, and few photos cannot win that back.
    gate: bool = True
    gate_lr_ratio: float = 10.0  # gates' lr = lr x this: a gate must travel O(1), a prompt entry O(0.05)

    def __post_init__(self) -> None:
        if int(self.num_tokens) != self.num_tokens or self.num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive integer, got {self.num_tokens}")
        if self.init not in ("prototypes", "xavier"):
            raise ValueError(f"init must be prototypes or xavier, got {self.init!r}")
        if not self.gate_lr_ratio > 0:
            raise ValueError(f"gate_lr_ratio must be positive, got {self.gate_lr_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _xavier_prompts(shape: tuple[int, ...], patch_size: tuple[int, int], ref: torch.Tensor) -> nn.Parameter:
    """VPT's init: uniform(-v, v) with v = sqrt(6 / (3 * patch_area + width)), Xavier for the patch embedding."""
    val = math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + shape[-1]))
    p = torch.empty(shape, device=ref.device, dtype=ref.dtype)
    nn.init.uniform_(p, -val, val)
    return nn.Parameter(p)


def _check_vit_fits(model: nn.Module, backbone: Backbone) -> None:
    """Prompts change the sequence length: attentions with per-position terms cannot take them."""
    block = model.get_submodule(backbone.blocks[0].name)
    attn = getattr(block, "attn", None)
    per_position = [
        n for n in ("relative_position_bias_table", "rel_pos") if getattr(attn, n, None) is not None
    ] + [n for n in ("rope", "rel_pos_bias") if getattr(model, n, None) is not None]
    if per_position:
        raise UnsupportedModelError(
            f"{backbone.architecture}: its attention has position-dependent terms ({', '.join(per_position)}) "
            f"that extra prompt tokens would break; use lora or adapter with this model"
        )


class _Owner:
    """What a patched attention reads its gate from (a plain object, so no module gets registered twice)."""

    def __init__(self, prompts: "ViTPrompts | SwinPrompts", layer: int) -> None:
        self.prompts, self.layer = prompts, layer


def _own_positions(prefix: int, prompts: int, length: int, device: torch.device) -> torch.Tensor | slice:
    """The sequence's own token positions around the prompt slots [prefix, prefix + prompts): a slice (a view,
    no copy) when they are contiguous, else an index tensor."""
    if prefix == 0:
        return slice(prompts, length)
    return torch.cat([torch.arange(prefix, device=device), torch.arange(prefix + prompts, length, device=device)])


def _gated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, own: torch.Tensor | slice, extra: slice,
                     gate: torch.Tensor, bias: torch.Tensor | None, attn: nn.Module, fused: bool = True) -> torch.Tensor:
    """softmax over the sequence's own keys (`own`: positions, or a slice when contiguous, which indexes as
    a view; additive `bias` for them) + gate x softmax over the prompt keys alone (`extra`); q, k, v and
    the result are (B, heads, L, d). Unfused (timm's `fused_attn` off, as `explain` sets it), the mixing matrix [own
    softmax | gate x prompt softmax] goes through `attn_drop` like timm's attention matrix, so attention
    maps see what the values are mixed by."""
    if fused:
        drop = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k[:, :, own], v[:, :, own], attn_mask=bias,
                                             dropout_p=drop, scale=attn.scale)
        return out + gate * F.scaled_dot_product_attention(q, k[:, :, extra], v[:, :, extra], dropout_p=drop, scale=attn.scale)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, heads, L, L)
    own_logits = logits[..., own]
    if bias is not None:
        own_logits = own_logits + bias
    mix = torch.zeros_like(logits)
    mix[..., own] = own_logits.softmax(-1)
    mix[..., extra] = gate * logits[..., extra].softmax(-1)
    return attn.attn_drop(mix) @ v


def _check_gateable(attn: nn.Module, architecture: str, name: str) -> None:
    needed = ("qkv", "num_heads", "scale", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")
    missing = [n for n in needed if not hasattr(attn, n)]
    if missing or not isinstance(attn.qkv, nn.Linear):
        raise UnsupportedModelError(
            f"{architecture}: {name} is not timm's fused-qkv Attention, which gated prompts need; "
            f"set gate=false (--set vpt-deep.gate=false) or use lora or adapter with this model"
        )


def _gated_vit_attention(attn: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
    """timm's ViT Attention on a prompted sequence, with the prompts' share gated; timm's own when off."""
    owner: _Owner = attn._vpt_owner
    prompts = owner.prompts
    if prompts.off:
        return type(attn).forward(attn, x, attn_mask=attn_mask, is_causal=is_causal)
    if attn_mask is not None or is_causal:
        raise UnsupportedModelError("gated prompts take no attention mask; set gate=false for this model")
    b, n, _ = x.shape
    s, p = prompts.npt, prompts.prompts.shape[1]
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = _gated_attention(q, k, v, _own_positions(s, p, n, x.device), slice(s, s + p), prompts.gate(owner.layer),
                           None, attn, fused=getattr(attn, "fused_attn", True))
    out = out.transpose(1, 2).reshape(b, n, -1)
    out = getattr(attn, "norm", nn.Identity())(out)
    if getattr(attn, "gate", None) is not None:  # timm's own output gate (gated attention variants)
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _heads(model: nn.Module, backbone: Backbone) -> list[int]:
    return [int(model.get_submodule(b.name).attn.num_heads) for b in backbone.blocks]


class ViTPrompts(PeftModule):
    """Prompt tokens for a ViT-family model; `prompts` is (layers, P, D) with layers = 1 (shallow) or depth."""

    def __init__(self, model: nn.Module, backbone: Backbone, config: VPTConfig, deep: bool) -> None:
        super().__init__()
        ref = next(model.parameters())
        layers = len(backbone.blocks) if deep else 1
        self.prompts = _xavier_prompts((layers, int(config.num_tokens), backbone.blocks[0].dim), backbone.patch_size, ref)
        # gate=True: (blocks, heads) zeros, the weight of each head's attention over the prompts
        self.gates = nn.Parameter(torch.zeros(len(backbone.blocks), max(_heads(model, backbone)), device=ref.device,
                                              dtype=ref.dtype)) if config.gate else None
        self.dropout = nn.Dropout(config.dropout)
        self.npt = backbone.num_prefix_tokens
        self.deep = deep
        self.off = False  # True: the hooks pass tokens through untouched (the prototypes' capture)
        # serving many adapters (`stacked`): every member's prompts, and which member each sample uses
        self.bank: torch.Tensor | None = None  # (members, layers, P, D)
        self.gate_bank: torch.Tensor | None = None  # (members, blocks, heads)
        self.rows: torch.Tensor | None = None  # (B,)

    @classmethod
    def stacked(cls, members: list["ViTPrompts"]) -> "ViTPrompts":
        routed = copy.deepcopy(members[0])
        routed.bank = torch.stack([m.prompts.detach() for m in members])
        if routed.gates is not None:
            routed.gate_bank = torch.stack([m.gates.detach() for m in members])
        return routed

    def gate(self, layer: int) -> torch.Tensor:
        """(B or 1, heads, 1, 1): block `layer`'s weight on each head's attention over the prompts."""
        g = self.gate_bank[self.rows, layer] if self.rows is not None else self.gates[layer].unsqueeze(0)
        return g[:, :, None, None]

    def _prompt(self, layer: int, batch: int) -> torch.Tensor:
        if self.rows is not None:
            return self.bank[self.rows, layer]  # (B, P, D)
        return self.dropout(self.prompts[layer]).unsqueeze(0).expand(batch, -1, -1)  # (B, P, D)

    def insert(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.off:
            return None
        x = args[0]  # (B, npt + N, D)
        p = self._prompt(0, x.shape[0])
        return (torch.cat([x[:, : self.npt], p, x[:, self.npt :]], dim=1), *args[1:]), kwargs

    def replace(self, layer: int) -> Any:
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self.off:
                return None
            x = args[0]  # (B, npt + P + N, D)
            p = self._prompt(layer, x.shape[0])
            n = self.npt + self.prompts.shape[1]
            return (torch.cat([x[:, : self.npt], p, x[:, n:]], dim=1), *args[1:]), kwargs

        return hook

    def remove(self, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.off:
            return None
        n = self.npt + self.prompts.shape[1]
        return torch.cat([output[:, : self.npt], output[:, n:]], dim=1)

    def attach(self, model: nn.Module, backbone: Backbone) -> Callable[[], None]:
        """Hook the prompts into `model`'s blocks; the returned callable unhooks them."""
        blocks = [model.get_submodule(b.name) for b in backbone.blocks]
        if self.gates is not None:  # before any hook goes in: a refused model is left as it was
            for info, block in zip(backbone.blocks, blocks):
                _check_gateable(block.attn, backbone.architecture, f"{info.name}.attn")
        handles = [blocks[0].register_forward_pre_hook(self.insert, with_kwargs=True)]
        if self.deep:
            for i, block in enumerate(blocks[1:], start=1):
                handles.append(block.register_forward_pre_hook(self.replace(i), with_kwargs=True))
        handles.append(blocks[-1].register_forward_hook(self.remove))
        gated: list[nn.Module] = []
        if self.gates is not None:
            for i, block in enumerate(blocks):
                block.attn._vpt_owner = _Owner(self, i)
                block.attn.forward = types.MethodType(_gated_vit_attention, block.attn)
                gated.append(block.attn)

        def detach() -> None:
            for h in handles:
                h.remove()
            for attn in gated:  # back to the class's own forward
                del attn.forward, attn._vpt_owner

        return detach


class _SwinCarry:
    """Per-forward state shared by the hooks and the patched attentions (not a module: no parameters)."""

    def __init__(self) -> None:
        self.prompts: torch.Tensor | None = None  # (B, P, C) prompts entering the current block
        self.normed: torch.Tensor | None = None  # norm1(prompts), read by the block's attention
        self.attn_out: torch.Tensor | None = None  # (B, P, C) attention output, averaged over windows
        self.gate: torch.Tensor | None = None  # (B or 1, heads, 1, 1) the current block's gate (gate=True)


def _prompted_window_attention(attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm's WindowAttention with prompts prepended to every window; timm's own forward when unprompted."""
    carry: _SwinCarry = attn._vpt_carry
    if carry.normed is None:
        return type(attn).forward(attn, x, mask=mask)
    prompts, carry.normed = carry.normed, None
    b, p, c = prompts.shape
    bw, n, _ = x.shape  # (B * nW, N, C), windows image-major
    num_windows = bw // b
    x = torch.cat([prompts.repeat_interleave(num_windows, dim=0), x], dim=1)  # (B*nW, P+N, C)
    qkv = attn.qkv(x).reshape(bw, p + n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B*nW, heads, P+N, head_dim)
    bias = F.pad(attn._get_rel_pos_bias(), (p, 0, p, 0))  # (1, heads, P+N, P+N), zero for prompts
    if mask is not None:  # (nW, N, N) shift mask: prompts see and are seen by every token
        mask = F.pad(mask, (p, 0, p, 0)).to(bias.dtype)
        bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)).expand(bw // mask.shape[0], -1, -1, -1, -1)
        bias = bias.reshape(bw, attn.num_heads, p + n, p + n)
    if carry.gate is not None:  # image keys as timm has them, plus the gated prompts (same gate in every window)
        gate = carry.gate.repeat_interleave(num_windows, dim=0) if carry.gate.shape[0] > 1 else carry.gate
        out = _gated_attention(q, k, v, _own_positions(0, p, p + n, x.device), slice(0, p), gate,
                               bias[..., p:].to(q.dtype), attn)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale)
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(bw, p + n, -1)))  # (B*nW, P+N, C)
    carry.attn_out = out[:, :p].reshape(b, num_windows, p, c).mean(dim=1)
    return out[:, p:]


class SwinPrompts(PeftModule):
    """Prompt tokens for a Swin-family model: shallow (1, P, C0), or deep, one (blocks, P, C_s) per stage."""

    def __init__(self, model: nn.Module, backbone: Backbone, config: VPTConfig, deep: bool) -> None:
        super().__init__()
        ref = next(model.parameters())
        tokens = int(config.num_tokens)
        if deep:
            shapes = [
                (sum(b.stage == s for b in backbone.blocks), tokens, next(b.dim for b in backbone.blocks if b.stage == s))
                for s in range(len(backbone.stage_names))
            ]
        else:
            shapes = [(1, tokens, backbone.blocks[0].dim)]
        self.prompts = nn.ParameterList(_xavier_prompts(s, backbone.patch_size, ref) for s in shapes)
        # gate=True: per stage (blocks, heads) zeros, as for ViT
        heads = _heads(model, backbone)
        self.gates = nn.ParameterList(
            nn.Parameter(torch.zeros(len(idx), heads[idx[0]], device=ref.device, dtype=ref.dtype))
            for idx in ([i for i, b in enumerate(backbone.blocks) if b.stage == s] for s in range(len(backbone.stage_names)))
        ) if config.gate else None
        self.dropout = nn.Dropout(config.dropout)
        self.deep = deep
        self.off = False  # True: the hooks pass tokens through untouched (the prototypes' capture)
        self.carry = _SwinCarry()
        # serving many adapters (`stacked`): per stage, every member's prompts; which member each sample uses
        self.bank: list[torch.Tensor] | None = None  # per stage (members, blocks, P, C)
        self.gate_bank: list[torch.Tensor] | None = None  # per stage (members, blocks, heads)
        self.rows: torch.Tensor | None = None  # (B,)

    @classmethod
    def stacked(cls, members: list["SwinPrompts"]) -> "SwinPrompts":
        routed = copy.deepcopy(members[0])
        routed.bank = [torch.stack([m.prompts[s].detach() for m in members]) for s in range(len(routed.prompts))]
        if routed.gates is not None:
            routed.gate_bank = [torch.stack([m.gates[s].detach() for m in members]) for s in range(len(routed.gates))]
        return routed

    def gate(self, stage: int, index: int) -> torch.Tensor:
        """(B or 1, heads, 1, 1): the gate of block `index` of `stage` (B rows when serving many adapters)."""
        g = self.gate_bank[stage][self.rows, index] if self.rows is not None else self.gates[stage][index].unsqueeze(0)
        return g[:, :, None, None]

    def _prompt(self, stage: int, index: int, batch: int) -> torch.Tensor:
        if self.rows is not None:
            return self.bank[stage][self.rows, index]  # (B, P, C)
        return self.dropout(self.prompts[stage][index]).unsqueeze(0).expand(batch, -1, -1)

    def attach(self, model: nn.Module, backbone: Backbone) -> Callable[[], None]:
        """Hook the prompts into `model`'s blocks and attentions; the returned callable undoes it."""
        first, last = (model.get_submodule(b.name) for b in (backbone.blocks[0], backbone.blocks[-1]))
        handles = [first.register_forward_pre_hook(self._start)]  # before the first block's own hook
        patched: list[nn.Module] = []
        if not self.deep:
            for stage in backbone.stage_names[1:]:
                downsample = getattr(model.get_submodule(stage), "downsample", None)
                if downsample is None or not hasattr(downsample, "reduction"):
                    raise UnsupportedModelError(
                        f"{backbone.architecture}: {stage} has no patch merging with norm and reduction; "
                        f"use vpt-deep, lora or adapter with this model"
                    )
                handles.append(downsample.register_forward_pre_hook(self._merge))
        index_in_stage: dict[int, int] = {}
        for info in backbone.blocks:
            j = index_in_stage[info.stage] = index_in_stage.get(info.stage, -1) + 1
            block = model.get_submodule(info.name)
            attn = block.attn
            if not hasattr(attn, "_get_rel_pos_bias") or not hasattr(attn, "qkv"):
                raise UnsupportedModelError(
                    f"{backbone.architecture}: {info.name}.attn is not timm's WindowAttention; "
                    f"use lora or adapter with this model"
                )
            attn._vpt_carry = self.carry
            attn.forward = types.MethodType(_prompted_window_attention, attn)
            patched.append(attn)
            handles.append(block.register_forward_pre_hook(self._before_block(info.stage, j)))
            if not self.deep and block is not last:  # deep prompts' outputs are never read
                handles.append(block.register_forward_hook(self._after_block))
        handles.append(last.register_forward_hook(self._end))

        def detach() -> None:
            for h in handles:
                h.remove()
            for attn in patched:  # back to the class's own forward
                del attn.forward, attn._vpt_carry

        return detach

    # -- hooks; shapes: prompts (B, P, C)
    def _start(self, block: nn.Module, args: tuple) -> None:
        self.carry.prompts = self.carry.normed = self.carry.attn_out = self.carry.gate = None
        if not self.deep and not self.off:  # args[0]: (B, H, W, C)
            self.carry.prompts = self._prompt(0, 0, args[0].shape[0])

    def _end(self, block: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.carry.prompts = self.carry.normed = self.carry.attn_out = self.carry.gate = None  # free the graph's references

    def _merge(self, downsample: nn.Module, args: tuple) -> None:
        p = self.carry.prompts
        if p is not None:  # the 2x2 neighbours of a prompt are itself
            self.carry.prompts = downsample.reduction(downsample.norm(torch.cat([p, p, p, p], dim=-1)))

    def _before_block(self, stage: int, index: int) -> Any:
        def hook(block: nn.Module, args: tuple) -> None:
            if self.deep and not self.off:
                self.carry.prompts = self._prompt(stage, index, args[0].shape[0])
            if self.carry.prompts is not None:
                self.carry.normed = block.norm1(self.carry.prompts)
                self.carry.gate = self.gate(stage, index) if self.gates is not None else None

        return hook

    def _after_block(self, block: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.carry.prompts is None:
            return
        p = self.carry.prompts + block.drop_path1(self.carry.attn_out)
        self.carry.prompts = p + block.drop_path2(block.mlp(block.norm2(p)))


_PROTO_IMAGES = 256  # training images whose tokens the prototypes are drawn from
_PROTO_TOKENS = 16  # random patch tokens kept per image and layer (4,096 points per layer at most)


def _kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iters: int = 100) -> torch.Tensor:
    """(k, D) centres of `points` (N, D): k-means++ seeding, then Lloyd's steps until no point changes
    cluster (at most `iters`); an emptied cluster keeps its centre. With fewer than k points, centres
    repeat points."""
    n = points.shape[0]
    if n <= k:
        return points[torch.arange(k) % n].clone()
    centres = [points[torch.randint(n, (1,), generator=generator)].squeeze(0)]
    dist = torch.full((n,), float("inf"))
    for _ in range(1, k):
        dist = torch.minimum(dist, (points - centres[-1]).pow(2).sum(1))
        centres.append(points[torch.multinomial(dist + 1e-12, 1, generator=generator)].squeeze(0))
    c = torch.stack(centres)
    assign = None
    for _ in range(iters):
        previous, assign = assign, torch.cdist(points, c).argmin(1)
        if previous is not None and torch.equal(assign, previous):
            break
        sums = torch.zeros_like(c).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    return c


def _prompt_slots(prompts: ViTPrompts | SwinPrompts, backbone: Backbone) -> list[tuple[str, torch.Tensor]]:
    """(block name, its (P, D) prompt tensor) for every layer that has prompts: each block (deep) or the first."""
    if isinstance(prompts, ViTPrompts):
        return [(b.name, prompts.prompts[i]) for i, b in enumerate(backbone.blocks[: prompts.prompts.shape[0]])]
    if not prompts.deep:
        return [(backbone.blocks[0].name, prompts.prompts[0][0])]
    index: dict[int, int] = {}
    slots = []
    for b in backbone.blocks:
        j = index[b.stage] = index.get(b.stage, -1) + 1
        slots.append((b.name, prompts.prompts[b.stage][j]))
    return slots


class _VPT(Method):
    config_cls = VPTConfig
    deep: bool
    default_lr = 3e-3  # prompts start from scratch, like a head (the VPT paper's SGD grid reaches far higher)
    embedded_lr = 3e-2  # on the embedded 32-px backbones (benchmarks/default-lr.md)
    identity_at_init = False  # ungated prompts join the attention from the first step (`starts_as_base`)
    saved_defaults = {"gate": False}  # adapter files written before the gate existed are ungated
    # after a probe start the head learns at lr x 0.1 (shallow; deep keeps it, below): the prompts move the
    # features off the probe's slowly, and a head at full lr mostly added noise (real photos,
    # benchmarks/RESULTS.md; shallow, 7 regimes x 3 seeds: 89.0 mean vs 88.8 at 1)
    probe_head_lr_ratio = 0.1

    def expected_params(self, model: nn.Module, backbone: Backbone, config: VPTConfig) -> int:
        """num_tokens x width at the input (shallow), or before every block at that block's width (deep);
        with gate, one per head of every block (ViT: blocks x the widest block's heads)."""
        widths = [b.dim for b in backbone.blocks] if self.deep else [backbone.blocks[0].dim]
        heads = _heads(model, backbone)
        gates = (len(heads) * max(heads) if backbone.family == "vit" else sum(heads)) if config.gate else 0
        return int(config.num_tokens) * sum(widths) + gates

    def starts_as_base(self, config: VPTConfig) -> bool:
        """Gated prompts start closed (gate 0): the base's output exactly; ungated ones change it at once."""
        return bool(config.gate)

    def lr_multipliers(self, model: nn.Module, backbone: Backbone, config: VPTConfig) -> dict[str, float]:
        if not config.gate or config.gate_lr_ratio == 1:
            return {}
        return {n: float(config.gate_lr_ratio) for n, _ in model.named_parameters() if n.startswith("vpt.gates")}

    def silent_parameters(self, config: VPTConfig) -> tuple[str, ...]:
        return ("vpt.prompts",) if config.gate else ()  # behind a zero gate until the gate moves

    def inject(self, model: nn.Module, backbone: Backbone, config: VPTConfig) -> None:
        if backbone.family == "vit":
            _check_vit_fits(model, backbone)
            prompts: ViTPrompts | SwinPrompts = ViTPrompts(model, backbone, config, self.deep)
        else:
            prompts = SwinPrompts(model, backbone, config, self.deep)
        prompts.attach(model, backbone)
        model.vpt = prompts

    def prepare(self, model: nn.Module, backbone: Backbone, config: VPTConfig,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """SPT's start (init="prototypes"): each layer's prompts become k-means centres of the patch
        tokens that layer receives in the frozen model (prompts off), sampled from the training images."""
        if config.init != "prototypes":
            return
        vit = backbone.family == "vit"
        slots = _prompt_slots(model.vpt, backbone)
        generator = torch.Generator().manual_seed(0)
        kept: dict[str, list[torch.Tensor]] = {name: [] for name, _ in slots}

        def capture(name: str) -> Callable[[nn.Module, tuple], None]:
            def hook(block: nn.Module, args: tuple) -> None:
                x = args[0]  # ViT (B, prefix + N, D); Swin (B, H, W, C)
                tokens = (x[:, backbone.num_prefix_tokens:] if vit else x.flatten(1, 2)).detach().float().cpu()
                pick = torch.rand(tokens.shape[:2], generator=generator).argsort(1)[:, :_PROTO_TOKENS]
                kept[name].append(torch.gather(tokens, 1, pick.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])).flatten(0, 1))

            return hook

        handles = [model.get_submodule(name).register_forward_pre_hook(capture(name)) for name, _ in slots]
        was_training, model.vpt.off = model.training, True
        seen = 0
        try:
            model.eval()
            with torch.no_grad():
                for images, _ in batches:
                    model.forward_features(images[: _PROTO_IMAGES - seen])
                    seen += min(images.shape[0], _PROTO_IMAGES - seen)
                    if seen >= _PROTO_IMAGES:
                        break
        finally:
            for h in handles:
                h.remove()
            model.vpt.off = False
            model.train(was_training)
        if seen == 0:
            raise ConfigError(f"{self.name} with init=prototypes needs training images: no batches were given")
        with torch.no_grad():
            for name, prompt in slots:
                centres = _kmeans(torch.cat(kept[name]), prompt.shape[0], generator)
                prompt.copy_(centres.to(prompt.dtype))

    def serve_parts(self, model: nn.Module, backbone: Backbone, config: VPTConfig) -> list[Part]:
        # one length (and gated or not) per group: one pass
        return [Prompts((self.name, int(config.num_tokens), bool(config.gate)), model.vpt)]

    def prompt_tokens(self, model: nn.Module, backbone: Backbone, config: VPTConfig) -> tuple[int, bool]:
        return int(config.num_tokens), self.deep

    def grad_checkpointing_unsupported(self, backbone: Backbone, config: VPTConfig) -> str | None:
        if backbone.family == "swin" and not self.deep:
            return "shallow Swin prompts travel beside the blocks' inputs, so recomputed blocks would see the wrong prompts"
        return None

    def mergeable(self, config: VPTConfig) -> str | None:
        return f"{self.name} adds prompt tokens to the input sequence, which no weight of the base can hold; ship the adapter file instead"


@register_method
class VPTShallow(_VPT):
    name = "vpt-shallow"
    deep = False
    examples = (dict(num_tokens=2, gate=False),)


@register_method
class VPTDeep(_VPT):
    name = "vpt-deep"
    deep = True
    # the probe's head is kept as fitted (real photos, benchmarks/RESULTS.md, 3 seeds: 92.2 mean over 7
    # regimes vs 92.0 at 0.1 and 91.5 at 1; 60 photos, 10 seeds: 97.7, level with the probe, vs 97.4 and
    # 96.1; 800 photos, 15 epochs, seed 0: 90.5 vs 87.5 and 90.5): deep prompts adapt the features to it
    probe_head_lr_ratio = 0.0
    examples = (dict(num_tokens=3), dict(num_tokens=2, gate=False))
