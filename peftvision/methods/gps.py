"""GPS (Zhang et al., CVPR 2024): train, for every output neuron, only its top-K input weights by
gradient magnitude on the task's own training data.

Before training (`Method.prepare`, which `finetune` runs once on the training batches), the gradient of
the loss over one pass of the training data is accumulated on the frozen weights of each targeted
Linear; each output row then keeps the K inputs of largest |gradient|. Training updates exactly those
weights: the module holds a sparse update `delta` (out, K) at `indices` (out, K) and computes
`(W + S) x + b`, S = delta scattered at the indices, with a backward that takes delta's gradient at the
selected inputs only (a gather: no dense weight gradient is formed), plus, as the authors' code, the
targeted layers' biases (a `bias_delta`).
Merging scatters delta into W: exact by construction. The indices are a persistent buffer: the adapter
file and the training checkpoint carry them, so `load_adapter` and `--resume` rebuild the same update.

The selection loss is the authors' supervised contrastive loss on the pre-logits features (the head
is new and random, so its cross-entropy gradients would mostly say what that random head wants); the
two views each image needs are the image and its horizontal flip (the authors use two augmentations).
`loss="ce"` uses cross-entropy through the head instead. The authors select in every weight matrix,
the patch embedding included; we select in the blocks' Linears (qkv, proj, fc1, fc2 by default).

Until `prepare` runs, each row holds its K inputs of largest |W| (a data-free placeholder, so a model
injected by hand still works); `peftvision.methods.inject.prepare(model, batches)` runs the selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.backbone import Backbone, BlockInfo
from ..errors import ConfigError
from ._linears import linear_sites, parse_targets
from ._registry import Method, PeftModule, register_method

LOSSES = ("supcon", "ce")


@dataclass
class GPSConfig:
    k: int = 1  # inputs trained per output neuron: the authors' VTAB-1k scripts use 1 (`--times_para 1`)
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")  # every Linear of the blocks
    bias: bool = True  # also train the targeted Linears' biases, as the authors' code does
    loss: str = "supcon"  # selection loss: supcon (the paper's) | ce
    temperature: float = 0.07  # of the contrastive loss: the authors' (SupCon's) default
    batches: int = 0  # training batches the gradient is accumulated over; 0 = one whole pass (the paper)

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        if int(self.k) != self.k or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if int(self.batches) != self.batches or self.batches < 0:
            raise ValueError(f"batches must be a non-negative integer, got {self.batches}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


class _SparseLinear(torch.autograd.Function):
    """`F.linear(x, W + S, b)`, S the sparse update (delta at `index`, zero elsewhere), whose backward
    computes the gradient of delta only at the selected inputs (a gather, O(K * tokens * out)) instead
    of the dense weight gradient (a GEMM as large as the layer's forward); W's gradient only when it is
    asked for (GPS's selection pass). W + S is rebuilt in backward rather than saved (a weight-sized copy
    per layer)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor,
                delta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, index, delta)
        ctx.has_bias = bias is not None
        return F.linear(x, _with_update(weight, index, delta), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, index, delta = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        grad_x = grad_weight = grad_bias = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ _with_update(weight, index, delta).to(grad.dtype)).to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        if ctx.needs_input_grad[4]:  # sum over tokens of grad[t, o] * x[t, index[o, k]]
            gf = g.float()
            grad_delta = torch.stack([(gf * x2.index_select(1, index[:, k]).float()).sum(0) for k in range(index.shape[1])], 1)
            grad_delta = grad_delta.to(delta.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (g.t() @ x2.to(g.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[2] and ctx.has_bias:
            grad_bias = g.sum(0).to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None, grad_delta


def _with_update(weight: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + S as a new dense tensor: delta added at `index` (indices are distinct within a row)."""
    return weight.scatter_add(1, index.long(), delta.to(weight.dtype))


class GPSLinear(PeftModule):
    """A frozen Linear plus trainable values at K selected inputs per output row (and a bias update)."""

    def __init__(self, base_layer: nn.Linear, config: GPSConfig) -> None:
        super().__init__()
        out_features, in_features = base_layer.weight.shape
        if config.k > in_features:
            raise ConfigError(f"gps: k={config.k} is more than the {in_features} inputs of a targeted Linear")
        self.base_layer = base_layer
        factory = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        with torch.no_grad():  # placeholder until `prepare` selects by gradient: the K largest |W| per row
            index = base_layer.weight.abs().topk(int(config.k), dim=1).indices
        self.register_buffer("gps_index", index.to(torch.int32))  # (out, K); persistent: saved with the adapter
        self.gps_delta = nn.Parameter(torch.zeros(out_features, int(config.k), **factory))  # (out, K)
        has_bias = config.bias and base_layer.bias is not None
        self.bias_delta = nn.Parameter(torch.zeros(out_features, **factory)) if has_bias else None
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:  # what attentions calling F.linear(x, qkv.weight, ...) must use
        w = self.base_layer.weight
        return w if self.merged else _with_update(w, self.gps_index, self.gps_delta)

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.base_layer.bias
        return b if self.merged or self.bias_delta is None else b + self.bias_delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        out = _SparseLinear.apply(x, base.weight, base.bias, self.gps_index, self.gps_delta)
        return out if self.bias_delta is None else out + self.bias_delta.to(out.dtype)

    @torch.no_grad()
    def select(self, score: torch.Tensor) -> None:
        """Keep, per output row, the K inputs of largest `score` (out, in); the update restarts at zero."""
        self.gps_index.copy_(score.topk(self.gps_index.shape[1], dim=1).indices.to(self.gps_index.dtype))
        self.gps_delta.zero_()

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight.copy_(_with_update(self.base_layer.weight, self.gps_index, self.gps_delta))
            if self.bias_delta is not None:
                self.base_layer.bias += self.bias_delta
            self.merged = True

    def extra_repr(self) -> str:
        return f"k={self.gps_index.shape[1]}, bias={self.bias_delta is not None}"


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) over (N, D) features: each sample is pulled to
    the others of its class, pushed from the rest; samples without a positive are skipped."""
    z = F.normalize(features, dim=1)
    logits = z @ z.t() / temperature  # (N, N)
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positive.sum(1)
    keep = count > 0
    mean_log_prob = log_prob.masked_fill(~positive, 0.0).sum(1)[keep] / count[keep]
    return -mean_log_prob.mean()


def _sites(model: nn.Module, backbone: Backbone, config: GPSConfig) -> list[tuple[BlockInfo, str, nn.Linear]]:
    return linear_sites(model, backbone, config.targets)


@register_method
class GPS(Method):
    name = "gps"
    config_cls = GPSConfig
    # By analogy, not measured on a real backbone: the selected values start at zero like LoRA's B and are
    # few (K per neuron) -- the authors train them with Adam at 1e-2 on VTAB-1k (100 epochs); for our
    # short runs LoRA's 3e-3 is the cautious choice
    default_lr = 3e-3
    embedded_lr = 3e-3  # embedded backbone: 73.25 at 3e-3, 69.75 at 1e-2, 59.75 at 3e-2 (benchmarks/default-lr.md)
    examples = (dict(k=3, targets=("qkv", "fc2"), bias=False, loss="ce", batches=1),)

    def expected_params(self, model: nn.Module, backbone: Backbone, config: GPSConfig) -> int:
        """Per targeted Linear: K per output row, plus the bias (one per output row) if trained."""
        return sum(lin.out_features * (int(config.k) + int(config.bias and lin.bias is not None))
                   for _, _, lin in _sites(model, backbone, config))

    def inject(self, model: nn.Module, backbone: Backbone, config: GPSConfig) -> None:
        for block, child, linear in _sites(model, backbone, config):
            model.set_submodule(f"{block.name}.{child}", GPSLinear(linear, config))

    def prepare(self, model: nn.Module, backbone: Backbone, config: GPSConfig,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Accumulate the selection loss's gradient on the targeted frozen weights over the training
        batches (the model in eval mode: no dropout), then keep the top K |gradient| inputs per row."""
        layers = [m for m in model.modules() if isinstance(m, GPSLinear)]
        weights = [m.base_layer.weight for m in layers]
        trainable = [p for p in model.parameters() if p.requires_grad]
        was_training = model.training
        model.eval()
        for w in weights:
            w.grad = None
            w.requires_grad_(True)
        seen = 0
        try:
            for images, labels in batches:
                if config.loss == "supcon":
                    views = torch.cat([images, images.flip(-1)])  # the image and its mirror: two views
                    features = model.forward_head(model.forward_features(views), pre_logits=True)
                    loss = supcon_loss(features.flatten(1).float(), torch.cat([labels, labels]), config.temperature)
                else:
                    loss = F.cross_entropy(model(images), labels)
                loss.backward()
                seen += 1
                if config.batches and seen >= config.batches:
                    break
            if seen == 0:
                raise ConfigError("gps needs training data to select its weights: no batches were given")
            for m, w in zip(layers, weights):
                m.select(w.grad.abs())
        finally:
            for w in weights:
                w.grad = None
                w.requires_grad_(False)
            for p in trainable:  # the head and the updates got gradients too: training starts clean
                p.grad = None
            model.train(was_training)

    def mergeable(self, config: GPSConfig) -> str | None:
        return None

    def merge(self, model: nn.Module, backbone: Backbone, config: GPSConfig) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, GPSLinear):
                module.merge()
                model.set_submodule(name, module.base_layer)
