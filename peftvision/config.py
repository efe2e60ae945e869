"""Run configuration: the `TrainConfig` dataclass, and dotted `key=value` overrides (`--set lora.r=16`).

No torch import here: the CLI builds its parser from these defaults and must stay instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass
class TrainConfig:
    """Everything a run needs; a recipe YAML holds the same keys, and CLI flags override it."""

    method: str = "lora"
    model: str = ""  # "" = peftvision's embedded default backbone
    checkpoint: str | None = None  # local weights file for the model (instead of the hub)
    dataset: str = ""  # "" = the default built-in task
    output: str = ""  # "" = runs/<method>-<task>
    options: dict[str, Any] = field(default_factory=dict)  # the method's options, e.g. {"r": 16}
    epochs: int = 7  # the default run (`make demo`) finishes in under 3 minutes on 2 CPU cores
    batch_size: int = 64  # VTAB-1k setting
    lr: float | None = None  # None = the method's own default (`peftvision info` lists them)
    weight_decay: float = 1e-4  # applied only to tensors with 2+ dims (not biases, norms, prompts' 1-d)
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0 (per step)
    grad_accum: int = 1
    clip_grad: float | None = 1.0  # max grad norm; None to disable
    mixed_precision: str = "no"  # no | bf16 | fp16
    label_smoothing: float = 0.0
    grad_checkpointing: bool = False  # recompute activations in backward: ViT-S 35-62% less memory, 1.3-1.5x time
    seed: int = 0
    patience: int | None = None  # early stopping after this many epochs without a better val top-1
    # Splits (peftvision/data/protocol.py): on your data (imagefolder:, hf:) train = every training image
    # but a 10% model-selection slice (val), and test = test/, else val/, else a fixed 20% hold-out;
    # on the benchmark tasks (builtin:, vtab:) train / val are VTAB-1k's train800 / val200.
    train_split: str = "train"  # trainval: every image but test; train800 / train800val200: VTAB-1k
    val_split: str | None = "val"  # picks the best epoch; None ("none"): no validation, the last epoch is kept
    test_split: str | None = "test"
    resize: str | None = None  # crop | squash; None: the source's own (crop for photos, squash for builtin:/vtab:)
    augment: bool = False  # VTAB-1k protocol: no augmentation
    num_workers: int = 2
    max_test: int | None = None  # cap the test set (large VTAB test sets)
    quiet: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.optimizer in ("adamw", "sgd"), "optimizer must be adamw or sgd"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be no, bf16 or fp16"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.patience is None or self.patience >= 1, "patience must be >= 1"),
            (self.resize in (None, "crop", "squash"), "resize must be crop or squash"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        values = {k: _coerce(k, v, types[k]) for k, v in values.items()}
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(str(e)) from None




def _coerce(key: str, value: Any, annotation: str) -> Any:
    """YAML and flags give "1e-3" or 3 where a float is meant: convert by the field's annotation."""
    if value is None or annotation.startswith("dict") or annotation == "str":
        return value
    if annotation.endswith("| None") and isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
        return None  # --val-split none
    base = annotation.replace(" | None", "")
    try:
        if base == "float":
            return float(value)
        if base == "int":
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if base == "bool" and not isinstance(value, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a {base}, got {value!r}") from None
    return value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["lora.r=16", "lora.targets=[q,k,v]"]` -> `{"lora": {"r": 16, "targets": ["q", "k", "v"]}}`."""
    import yaml

    tree: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part} is already set to a value")
            node = child
        node[parts[-1]] = value
    return tree


def method_options(method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The options addressed to `method` (`lora.r=16` for lora); options for other methods are ignored."""
    options = overrides.get(method, {})
    if not isinstance(options, dict):
        raise ConfigError(f"--set {method}=... needs a field: {method}.<option>=value")
    return dict(options)
