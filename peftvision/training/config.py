"""The run configuration and every way to set it: defaults < recipe YAML < `--set key=value` < flags.

`TrainConfig` is the one place a setting is declared: its fields generate the `finetune` flags
(`add_config_flags`), recipes hold the same keys, and a resumed run reads it back from its directory.
Method options (`lora.r=16`) travel one route: `method_options`.

No torch import at module level: the CLI builds its parser from these defaults and must stay instant.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def option(default: Any, help: str, **extra: Any) -> Any:
    """A config field whose help text is also its `--flag`'s help; `choices=`, `parse=` and `flag=False`
    go to the CLI (`add_config_flags`)."""
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, **extra}, **kwargs)


REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "all")


@dataclass
class TrainConfig:
    """Everything a run needs; a recipe YAML holds the same keys, and CLI flags override it."""

    method: str = option("lora", "a registered method (`peftvision info` lists them)")
    model: str = option("", "timm model name; empty: peftvision's embedded backbone")
    checkpoint: str | None = option(None, "local weights file for the model (instead of the hub)")
    dataset: str = option("", "builtin:TASK, vtab:TASK, imagefolder:PATH or hf:REPO[:CONFIG]; empty: a built-in task")
    output: str = option("", "run directory; empty: runs/METHOD-TASK")
    options: dict[str, Any] = option(dict, "the method's options; on the command line: --set METHOD.OPTION=VALUE", flag=False)
    epochs: int = option(7, "the default run (`make demo`) finishes in under 3 minutes on 2 CPU cores")
    batch_size: int = option(64, "per process; 64 is the VTAB-1k setting")
    lr: float | None = option(None, "empty: the method's own for this backbone (`peftvision info` lists them)")
    weight_decay: float = option(1e-4, "not on biases, norms or the model's no_weight_decay() (pos_embed, cls_token)")
    optimizer: str = option("adamw", "any timm optimizer: adamw, sgd (nesterov), momentum, lamb, lion, ... "
                                   "(timm.optim.list_optimizers())")
    momentum: float = option(0.9, "for optimizers with momentum (sgd, momentum, ...)")
    layer_decay: float | None = option(None, "layer-wise lr decay (timm): block i gets lr * decay^(depth - i); 0.65-0.75 "
                                           "is common for full fine-tuning")
    warmup_epochs: float = option(1.0, "linear warm-up, then cosine decay to 0 (timm's scheduler, per step)")
    grad_accum: int = option(1, "gradient accumulation steps")
    clip_grad: float | None = option(1.0, "max grad norm; 0 or none disables it")
    mixed_precision: str = option("no", "no, bf16 or fp16", choices=("no", "bf16", "fp16"))
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    feature_cache: str = option("disk", "disk: frozen features a linear probe reads are computed once and kept under "
                                        "$PEFTVISION_CACHE/features (reused by later runs); off", choices=("disk", "off"))
    head_init: str = option("auto", "the head's start: probe (a linear probe fitted on the frozen features: LP-FT), "
                                  "random (timm's init); auto: the method's own choice (probe for most; for the "
                                  "linear method the probe is its whole training)", choices=("auto", "probe", "random"))
    head_lr_ratio: float | None = option(None, "the head's lr as a fraction of lr; empty: the method's own when the head "
                                             "starts from a probe (0 for adapter and vpt-deep, 0.1 for lora and "
                                             "vpt-shallow, 1 for the rest), else 1; 0 keeps the probe's head")
    probe_head_scale: float = option(1.0, "after a probe start the head's weights and bias times this: the probe's "
                                         "predictions, softer confidences (measured for LoRA at 0.3, not adopted: "
                                         "benchmarks/RESULTS.md)")
    grad_checkpointing: bool = option(False, "recompute activations in backward: ViT-S 35-62% less memory, 1.3-1.5x time")
    seed: int = option(0, "model init, data order, and the draw of the val slice / VTAB-1k splits")
    patience: int | None = option(None, "early stopping after this many epochs without a better val top-1")
    # Splits (peftvision/data/protocol.py): on your data (imagefolder:, hf:) test = test/, else val/, else a
    # fixed 20% hold-out; val = val/ when there is one, else a 10% slice of train/; on the benchmark tasks
    # (builtin:, vtab:) train / val are VTAB-1k's train800 / val200. Which of them a run uses is the
    # selection policy (peftvision/selection.py): a val set too small to tell epochs apart is not used.
    train_split: str = option("train", "train (all but the val slice; builtin:/vtab: train800), trainval, train800, train800val200")
    val_split: str | None = option("auto", "auto: val/ (or VTAB-1k's val200) if there is one, a 10% slice of train/ only "
                                         "if it holds >= 200 images, else none; none: train on every image")
    keep: str = option("auto", "which epoch's adapter is kept: best (on val), last, or auto: best when val has >= 200 "
                             "images, else last", choices=("auto", "best", "last"))
    test_split: str | None = option("test", "what is reported; none: no test")
    resize: str | None = option(None, "eval preprocessing: crop (the model's own) or squash (whole image); "
                                    "empty: crop for imagefolder:/hf: photos, squash for builtin:/vtab:",
                              choices=("crop", "squash"))
    augment: bool = option(False, "train-time augmentation (off in VTAB-1k)")
    num_workers: int = option(2, "DataLoader worker processes")
    max_test: int | None = option(None, "cap the test set size (large VTAB test sets)")
    quiet: bool = option(False, "no progress bar or summary")
    report_to: str = option("none", "experiment tracker through accelerate: tensorboard (OUTPUT/tensorboard), wandb, "
                                  "mlflow, all (every installed one), none", choices=REPORT_TO)

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (bool(self.optimizer), "optimizer must be a timm optimizer name (adamw, sgd, ...)"),
            (self.layer_decay is None or 0 < self.layer_decay <= 1, "layer_decay must be in (0, 1]"),
            (self.report_to in REPORT_TO, f"report_to must be one of {', '.join(REPORT_TO)}"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be no, bf16 or fp16"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.patience is None or self.patience >= 1, "patience must be >= 1"),
            (self.resize in (None, "crop", "squash"), "resize must be crop or squash"),
            (self.keep in ("auto", "best", "last"), "keep must be auto, best or last"),
            (self.head_init in ("auto", "probe", "random"), "head_init must be auto, probe or random"),
            (self.feature_cache in ("disk", "off"), "feature_cache must be disk or off"),
            (self.head_lr_ratio is None or self.head_lr_ratio >= 0, "head_lr_ratio must be >= 0"),
            (self.probe_head_scale > 0, "probe_head_scale must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return from_values(cls, values)


def from_values(cls: type, values: dict[str, Any]) -> Any:
    """A config dataclass from YAML or flag values, converted by each field's annotation; unknown keys
    and wrong types are one clear error."""
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


# ----------------------------------------------------------------------------- sources of values

def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe YAML: the same keys as TrainConfig (and `options` for the method)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of config keys")
    return data


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


def build_config(recipe: str | None = None, sets: list[str] | None = None, flags: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from defaults < recipe < --set < flags (flags: the ones given, not None).

    A recipe's `options:` and `--set METHOD.OPTION=...` are the method's options; options addressed to
    another method than the one that runs are ignored, so one recipe can carry several methods'.
    """
    from ..methods import list_methods

    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    overrides = parse_overrides(sets)
    methods = set(list_methods())
    sections = [{k: v.pop(k) for k in list(v) if k in methods} for v in (values, overrides)]  # recipe, --set
    values.update(overrides)
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    method = values.get("method", TrainConfig.method)
    options = dict(values.get("options") or {})
    for section in sections:
        options.update(method_options(method, section))
    values["options"] = options
    return TrainConfig.from_dict(values)


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on what is installed, on the backbone or on the method."""
    from ..backbones.weights import DEFAULT_MODEL
    from ..data import DEFAULT_TASK
    from ..methods import build_config, config_to_dict, default_lr

    model = cfg.model or DEFAULT_MODEL
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.method, model)
    dataset = cfg.dataset or DEFAULT_TASK
    output = cfg.output or str(Path("runs") / f"{cfg.method}-{dataset.split(':')[-1].replace('/', '_')}")
    # no model selection: the val slice has no use, so train on it too
    train_split = "trainval" if cfg.val_split is None and cfg.train_split == "train" else cfg.train_split
    # every option, defaults included: a run's config.yaml resumes and reruns the same way after a default changes
    options = config_to_dict(build_config(cfg.method, cfg.options))
    return dataclasses.replace(cfg, model=model, dataset=dataset, output=output, lr=lr, train_split=train_split,
                               options=options)


# ----------------------------------------------------------------------------- resuming

RESUMABLE = ("epochs", "quiet", "report_to")  # what may change when a run continues: extend it, silence it, track it


def read_run_config(output: str | Path) -> TrainConfig:
    """The resolved config a run saved in its directory (to resume it)."""
    import yaml

    from ..errors import PeftVisionError

    path = Path(output) / "config.yaml"
    if not path.is_file():
        raise PeftVisionError(f"nothing to resume in {output}: no config.yaml there")
    try:
        return TrainConfig.from_dict(yaml.safe_load(path.read_text()))
    except yaml.YAMLError:
        raise PeftVisionError(f"{path} is damaged; cannot resume") from None


def resume_config(output: str | Path, flags: dict[str, Any], recipe: str | None = None, sets: list[str] | None = None) -> TrainConfig:
    """The saved config of the run in `output`, with only --epochs / --quiet applied; any other setting
    is refused, since a run continued with other settings would be neither run."""
    cfg = read_run_config(output)  # first: is there a run at all?
    given = sorted(k for k, v in flags.items() if v is not None and k not in RESUMABLE and k != "output")
    if recipe:
        given.insert(0, "recipe")
    if sets:
        given.insert(0, "set")
    if given:
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(
            f"--resume continues {output} with its saved settings; only --epochs and --quiet can change (got {names})"
        )
    changes = {k: flags[k] for k in RESUMABLE if flags.get(k) is not None}
    return dataclasses.replace(cfg, output=str(output), **changes)


# ----------------------------------------------------------------------------- command-line flags

def add_config_flags(parser: argparse.ArgumentParser, cls: type = TrainConfig, only: tuple[str, ...] | None = None) -> list[str]:
    """One `--kebab-case` flag per config field (from its type, default and help; `only`: these fields);
    returns the field names, whose parsed values are None when a flag is not given (so a recipe's value
    stands). A field's `parse=` metadata converts its string (a comma list to a tuple, say)."""
    names = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if not meta.get("flag", True) or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = "" if default is None or default is False or default in ("", ()) else f" (default {default})"
        help_text = (meta.get("help", "") + shown).replace("%", "%%")
        annotation = str(f.type).replace(" | None", "")
        if annotation == "bool":
            parser.add_argument(flag, dest=f.name, action="store_const", const=True, help=help_text)
        else:
            kind = meta.get("parse") or {"int": int, "float": float}.get(annotation, str)
            if str(f.type).endswith("| None") and kind in (int, float):
                kind = str  # "none" is a value too; TrainConfig.from_dict converts it
            parser.add_argument(flag, dest=f.name, type=kind, choices=meta.get("choices"), help=help_text,
                                metavar=None if meta.get("choices") else f.name.upper())
        names.append(f.name)
    return names
