"""Pretrain a shipped backbone on procedural scenes: `python -m tools.pretrain --recipe recipes/pretrain-<name>.yaml`.

The task (see `scenes.py`): classify the main object's shape (the timm head, shipped with the
weights) and, through auxiliary linear heads dropped after pretraining, regress its position, size and
rotation, classify how many objects the image holds and which texture lies behind them (all from the
pooled features that PEFT methods and linear probes start from), and classify what covers every patch
token (a dense signal that gets a small transformer off its initial plateau sooner).

Deterministic from the recipe: the model is initialised from `seed`, training batch `i` is image
batch `i` of stream `seed`, evaluation uses a disjoint stream. Writes `<output>/<name>.safetensors`
(fp16, atomically) and `<output>/<name>.json` (recipe, data, steps, wall time, upstream accuracy).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from peftvision.backbones.weights import (
    ARCHITECTURES,
    INPUT_SIZE,
    MEAN,
    STD,
    WEIGHTS_DIR,
)
from peftvision.errors import ConfigError, PeftVisionError

from .scenes import NUM_POSE, SceneConfig, SceneTask

EVAL_STREAM = 1_000_003  # image stream of the held-out evaluation; training uses stream `seed`


@dataclass
class PretrainSchedule:
    steps: int = 1500  # ~190k images at batch 128: 25-35 minutes for the ViT on 2 cores
    batch_size: int = 128
    lr: float = 1e-3  # AdamW peak; small ViTs trained from scratch tolerate 1e-3 at batch 128
    min_lr: float = 1e-5  # end of the cosine
    warmup_steps: int = 100  # linear warm-up: transformers from scratch diverge without it
    weight_decay: float = 0.05  # on matrices only (p.dim() >= 2), as in DeiT
    betas: tuple[float, float] = (0.9, 0.999)
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    pose_weight: float = 1.0  # MSE on (x, y, log-size, cos, sin) of the main object
    count_weight: float = 0.5  # cross-entropy on the number of objects
    texture_weight: float = 0.5  # cross-entropy on the background's texture
    dense_weight: float = 1.0  # cross-entropy per patch token: what covers it (dense signal: learns fast)
    num_workers: int = 1  # renders batches while the main process trains
    log_every: int = 50
    eval_batches: int = 20  # held-out images for the upstream accuracy: eval_batches x batch_size


@dataclass
class Recipe:
    model: str
    seed: int = 0
    threads: int = 2
    data: SceneConfig = field(default_factory=SceneConfig)
    train: PretrainSchedule = field(default_factory=PretrainSchedule)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Recipe":
        raw = dict(raw)
        data = _build(SceneConfig, raw.pop("data", {}) or {}, "data")
        train = _build(PretrainSchedule, raw.pop("train", {}) or {}, "train")
        return _build(cls, {**raw, "data": data, "train": train}, "recipe")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(names)}")
    out = {}
    for k, v in values.items():
        out[k] = tuple(v) if isinstance(v, list) else v
    return cls(**out)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def load_pretrain_recipe(path: str | None, overrides: dict[str, Any] | None = None, model: str | None = None) -> Recipe:
    from peftvision.training.config import load_recipe

    raw = _merge(load_recipe(path) if path else {}, overrides or {})
    if model:
        raw["model"] = model
    if "model" not in raw:
        raise ConfigError("no model: give --model NAME or `model:` in the recipe")
    if raw["model"] not in ARCHITECTURES:
        raise ConfigError(f"unknown model {raw['model']!r}; pretrainable: {', '.join(ARCHITECTURES)}")
    return Recipe.from_dict(raw)


# ----------------------------------------------------------------------------- data

class _Stream(torch.utils.data.IterableDataset):
    """Batches `start, start + 1, ..., stop - 1` of one image stream, rendered in DataLoader workers."""

    def __init__(self, cfg: SceneConfig, seed: int, start: int, stop: int, batch_size: int) -> None:
        self.cfg, self.seed, self.start, self.stop, self.batch_size = cfg, seed, start, stop, batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        task = SceneTask(self.cfg)
        # Worker w renders batches w, w + workers, ...; the loader takes them round-robin, in order.
        for i in range(self.start + worker, self.stop, workers):
            yield {k: torch.from_numpy(v) for k, v in task.batch(self.seed, i, self.batch_size).items()}


def _loader(recipe: Recipe, seed: int, start: int, stop: int) -> torch.utils.data.DataLoader:
    workers = recipe.train.num_workers
    stream = _Stream(recipe.data, seed, start, stop, recipe.train.batch_size)
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None
    )


def to_input(image: Any) -> Any:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float normalised with the model's mean / std."""
    x = image.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- model and objective

def _build_model(recipe: Recipe) -> tuple[Any, Any]:
    import timm

    from peftvision.backbones.embedded import register_default_models

    register_default_models()
    torch.manual_seed(recipe.seed)
    model = timm.create_model(recipe.model, pretrained=False, num_classes=recipe.data.num_classes)
    sincos_pos_embed_(model)
    width = model.num_features
    # Auxiliary heads, dropped after pretraining: one on the pooled features (pose, count, texture),
    # one on every patch token (what covers that patch: a texture or a shape).
    aux = torch.nn.ModuleDict(dict(
        pooled=torch.nn.Linear(width, NUM_POSE + recipe.data.num_counts + recipe.data.num_textures),
        dense=torch.nn.Linear(width, recipe.data.num_segments),
    ))
    return model, aux


def _patch_grid(model: Any, feats: Any) -> Any:
    """(B, h, w, D) patch tokens of `forward_features`: a ViT's sequence without its prefix tokens, or
    a Swin's last stage (already NHWC)."""
    if feats.ndim == 4:
        return feats
    grid = model.patch_embed.grid_size
    return feats[:, model.num_prefix_tokens:].reshape(feats.shape[0], grid[0], grid[1], feats.shape[-1])


def sincos_pos_embed_(model: Any) -> bool:
    """Start a ViT's learned position table from 2-D sin-cos values (MAE, MoCo v3) instead of
    N(0, 0.02) noise: position is then readable from the first step, and a small ViT leaves the
    plateau where attention ignores position several times sooner (measured: a left/right task
    learnt in 75 steps instead of ~200). Returns whether the model has such a table."""
    from timm.layers import build_sincos2d_pos_embed

    pos = getattr(model, "pos_embed", None)
    if pos is None:
        return False  # Swin: relative position bias only
    grid = model.patch_embed.grid_size
    prefix = pos.shape[1] - grid[0] * grid[1]
    with torch.no_grad():
        pos[0, prefix:] = build_sincos2d_pos_embed(list(grid), pos.shape[-1]).to(pos.dtype)
    return True


def _losses(model: Any, aux: Any, batch: dict[str, Any], recipe: Recipe) -> tuple[Any, dict[str, Any]]:
    import torch.nn.functional as F

    x = to_input(batch["image"])
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)  # (B, D): what linear probes and PEFT heads read
    logits = model.forward_head(feats)  # (B, num_classes)
    extra = aux["pooled"](pre)
    tokens = _patch_grid(model, feats)  # (B, h, w, D)
    step = batch["segment"].shape[1] // tokens.shape[1]
    target = batch["segment"][:, step // 2::step, step // 2::step].long()  # what covers each token's centre
    dense = F.cross_entropy(aux["dense"](tokens).flatten(0, 2), target.flatten())
    t = recipe.train
    cls = F.cross_entropy(logits, batch["label"], label_smoothing=t.label_smoothing)
    mask = batch["pose_mask"]
    pose = (((extra[:, :NUM_POSE] - batch["pose"]) ** 2) * mask).sum() / mask.sum()
    counts = extra[:, NUM_POSE:NUM_POSE + recipe.data.num_counts]
    textures = extra[:, NUM_POSE + recipe.data.num_counts:]
    count = F.cross_entropy(counts, batch["count"])
    texture = F.cross_entropy(textures, batch["texture"])
    loss = cls + t.pose_weight * pose + t.count_weight * count + t.texture_weight * texture + t.dense_weight * dense
    return loss, dict(logits=logits, counts=counts, textures=textures, pose_out=extra[:, :NUM_POSE],
                      cls=cls, pose=pose, count=count, texture=texture, dense=dense)


def _lr_at(step: int, t: PretrainSchedule) -> float:
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(params: list[Any], t: PretrainSchedule) -> Any:
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params if p.requires_grad and p.dim() < 2]  # biases, norms, tokens' scale
    groups = [dict(params=decay, weight_decay=t.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)


def evaluate(model: Any, aux: Any, recipe: Recipe) -> dict[str, float]:
    """Upstream metrics on held-out images: class / count accuracy, pose R^2 (1 = perfect)."""
    model.eval()
    correct = count_ok = texture_ok = n = 0
    preds, poses, masks = [], [], []
    with torch.no_grad():
        for batch in _loader(recipe, EVAL_STREAM + recipe.seed, 0, recipe.train.eval_batches):
            _, out = _losses(model, aux, batch, recipe)
            correct += (out["logits"].argmax(1) == batch["label"]).sum().item()
            count_ok += (out["counts"].argmax(1) == batch["count"]).sum().item()
            texture_ok += (out["textures"].argmax(1) == batch["texture"]).sum().item()
            preds.append(out["pose_out"].numpy())
            poses.append(batch["pose"].numpy())
            masks.append(batch["pose_mask"].numpy())
            n += len(batch["label"])
    model.train()
    p, q, m = np.concatenate(poses), np.concatenate(preds), np.concatenate(masks)
    mean = (p * m).sum(0) / np.maximum(m.sum(0), 1)
    r2 = 1 - (((q - p) ** 2) * m).sum(0) / np.maximum((((p - mean) ** 2) * m).sum(0), 1e-9)
    return dict(
        images=n,
        class_accuracy=round(correct / n, 4),
        count_accuracy=round(count_ok / n, 4),
        texture_accuracy=round(texture_ok / n, 4),
        position_r2=round(float(r2[:2].mean()), 4),
        scale_r2=round(float(r2[2]), 4),
        rotation_r2=round(float(r2[3:].mean()), 4),
    )


# ----------------------------------------------------------------------------- saving

def _atomic_write(path: Path, write: Any) -> None:
    from peftvision.files import atomic_write

    def write_readable(tmp: str) -> None:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # temp files are 0600; weights are package data

    atomic_write(path, write_readable)


def save(model: Any, recipe: Recipe, output: Path, record: dict[str, Any]) -> tuple[Path, Path]:
    """fp16 safetensors of the timm model (head included) + a JSON record, each written atomically."""
    from safetensors.torch import save_file

    output.mkdir(parents=True, exist_ok=True)
    weights = output / f"{recipe.model}.safetensors"
    tensors = {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
        for k, v in model.state_dict().items()
    }
    _atomic_write(weights, lambda p: save_file(tensors, str(p), metadata={"format": "pt", "dtype": "float16"}))
    record = dict(record)
    record["file"] = dict(
        name=weights.name,
        bytes=weights.stat().st_size,
        sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
        dtype="float16",
    )
    meta = output / f"{recipe.model}.json"
    _atomic_write(meta, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    return weights, meta


# ----------------------------------------------------------------------------- training loop

def pretrain(recipe: Recipe, output: Path, log: Any = print, command: str | None = None) -> dict[str, Any]:
    """Run the recipe and save the weights; returns the JSON record."""
    import timm

    if recipe.data.image_size != ARCHITECTURES[recipe.model]["kwargs"]["img_size"]:
        raise ConfigError(f"data.image_size must equal the model's input size ({INPUT_SIZE[1]})")
    torch.set_num_threads(recipe.threads)
    model, aux = _build_model(recipe)
    t = recipe.train
    params = list(model.parameters()) + list(aux.parameters())
    opt = _optimizer(params, t)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{recipe.model}: {n_params:,} parameters; {t.steps} steps x {t.batch_size} scene images")

    # --------------------------------------------------------------- train
    model.train()
    start = time.time()
    last = start
    running: dict[str, float] = {}
    for step, batch in enumerate(_loader(recipe, recipe.seed, 0, t.steps)):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, t)
        loss, out = _losses(model, aux, batch, recipe)
        if not torch.isfinite(loss):
            raise PeftVisionError(f"loss is {loss.item()} at step {step}: lower train.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        acc = (out["logits"].argmax(1) == batch["label"]).float().mean().item()
        for k in ("cls", "pose", "count", "texture", "dense"):
            running[k] = running.get(k, 0.0) + out[k].item()
        for k, v in (("loss", loss.item()), ("acc", acc)):
            running[k] = running.get(k, 0.0) + v
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            n = (step % t.log_every) + 1
            now = time.time()
            ips = n * t.batch_size / (now - last)
            last = now
            msg = " ".join(f"{k} {v / n:.3f}" for k, v in running.items())
            log(f"step {step + 1}/{t.steps} lr {_lr_at(step, t):.2e} {msg} | {ips:.0f} img/s {now - start:.0f}s")
            running = {}
    train_seconds = time.time() - start

    # --------------------------------------------------------------- evaluate and save
    upstream = evaluate(model, aux, recipe)
    log(f"upstream (held-out scenes): {upstream}")
    record = dict(
        model=recipe.model,
        architecture=ARCHITECTURES[recipe.model],
        parameters=n_params,
        pretrained_cfg=dict(input_size=INPUT_SIZE, mean=MEAN, std=STD, num_classes=recipe.data.num_classes),
        command=command or f"python -m tools.pretrain --recipe recipes/pretrain-{recipe.model}.yaml",
        recipe=recipe.to_dict(),
        data=dict(
            kind="procedural scenes of geometric objects over textures, tools.pretrain.scenes",
            classes=recipe.data.num_classes,
            images_seen=t.steps * t.batch_size,
            stream_seed=recipe.seed,
            eval_stream_seed=EVAL_STREAM + recipe.seed,
        ),
        steps=t.steps,
        train_seconds=round(train_seconds, 1),
        upstream=upstream,
        environment=dict(
            python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
            threads=recipe.threads, cpu_count=os.cpu_count(), machine=platform.machine(),
        ),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    weights, meta = save(model, recipe, output, record)
    log(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB) and {meta}")
    return json.loads(meta.read_text())


def main(argv: list[str] | None = None) -> int:
    from peftvision.training.config import parse_overrides

    p = argparse.ArgumentParser(
        prog="python -m tools.pretrain",
        description="Pretrain a shipped peftvision backbone on procedurally generated scenes.",
    )
    p.add_argument("--recipe", help="YAML recipe (recipes/pretrain-<model>.yaml)")
    p.add_argument("--model", help=f"model to pretrain (overrides the recipe): {', '.join(ARCHITECTURES)}")
    p.add_argument("--output", default=str(WEIGHTS_DIR), help="directory for <model>.safetensors/.json "
                   "(default: the package's weights directory)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, e.g. train.steps=10")
    args = p.parse_args(argv)
    try:
        recipe = load_pretrain_recipe(args.recipe, parse_overrides(args.set), args.model)
        command = "python -m tools.pretrain " + " ".join(argv if argv is not None else sys.argv[1:])
        pretrain(recipe, Path(args.output), log=lambda s: print(s, flush=True), command=command)
    except PeftVisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
