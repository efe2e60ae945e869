"""The model card (`README.md`) of an adapter directory, as the Hugging Face Hub reads it.

`save_adapter` writes one (what the adapter is, how to load it), `finetune` rewrites it at the end
with the run's data, metrics and command, and `push` uploads it. A card someone wrote by hand is
kept: only a card carrying `MARKER` (peftvision's own) is ever rewritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator

from .format import CARD_NAME, WEIGHTS_NAME, read_adapter_config

MARKER = "<!-- peftvision writes this card: remove this line to keep your edits from being overwritten -->"
REPO_PLACEHOLDER = "USER/NAME"  # in the loading examples until `push` names the repo
# the arguments of the `peftvision` command running, set by the CLI; kept here rather than in cli.py,
# which is a different module object when run as `python -m peftvision.cli`
_cli_argv: list[str] | None = None


@contextlib.contextmanager
def quoting(argv: list[str]) -> Iterator[None]:
    """While the CLI runs `argv`, cards written by `finetune` quote it as their command."""
    global _cli_argv
    previous, _cli_argv = _cli_argv, list(argv)
    try:
        yield
    finally:
        _cli_argv = previous


def write_card(
    directory: str | os.PathLike,
    metrics: dict[str, Any] | None = None,
    params: tuple[int, int | None] | None = None,
    command: str | None = None,
) -> Path | None:
    """Write the card of the adapter in `directory` (atomically); None if a hand-written card is kept.

    Args:
        directory: an adapter directory (adapter_config.json and adapter.safetensors already written).
        metrics: the run's metrics.json, if the adapter comes from `finetune`.
        params: (trainable, total) parameter counts; default from `metrics`, else the tensor file.
        command: what produced the adapter (a shell command or a Python call).
    """
    from ..files import atomic_write_text

    directory = Path(directory)
    path = directory / CARD_NAME
    if path.exists() and MARKER not in path.read_text(errors="replace"):
        return None
    text = model_card(read_adapter_config(directory), directory, metrics, params, command)
    atomic_write_text(path, text)
    return path


def set_card_repo(directory: str | os.PathLike, repo: str) -> None:
    """Name `repo` in the loading examples of peftvision's own card (before it is pushed there)."""
    from ..files import atomic_write_text

    path = Path(directory) / CARD_NAME
    text = path.read_text(errors="replace") if path.is_file() else ""
    if MARKER in text and REPO_PLACEHOLDER in text:
        atomic_write_text(path, text.replace(REPO_PLACEHOLDER, repo))


def read_metrics(directory: str | os.PathLike) -> dict[str, Any] | None:
    """metrics.json of a finetune run directory, or None (an adapter saved from Python has none)."""
    try:
        metrics = json.loads((Path(directory) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def finetune_command(cfg: Any) -> str:
    """The command of a run: the command line when the CLI runs it, else the Python call."""
    if _cli_argv is not None:
        return shlex.join(["peftvision", *_cli_argv])
    defaults = type(cfg)()
    fields = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)]
    args = ", ".join(f"{name}={getattr(cfg, name)!r}" for name in fields)
    return f"peftvision.training.finetune(peftvision.TrainConfig({args}))"


# ----------------------------------------------------------------------------- content

def base_model_id(name: str) -> str | None:
    """The hub repo of a timm model's pretrained weights (`timm/vit_base_patch16_224.augreg2_in21k_ft_in1k`);
    None for models with no hub weights, as peftvision's embedded backbones."""
    from timm.models import get_pretrained_cfg

    from ..backbones.embedded import register_default_models

    register_default_models()
    try:
        cfg = get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    return hub_id if hub_id and not hub_id.endswith("/") else None


def front_matter(config: dict[str, Any], metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The card's metadata in the hub's keys (library, base model, tags, task)."""
    model = config["model"]
    meta: dict[str, Any] = {"library_name": "peftvision"}
    base = base_model_id(model["name"])
    if base:
        meta["base_model"] = base
    tags = ["peftvision", "timm", "image-classification", config["method"]]
    meta["tags"] = [*tags, *([model["architecture"]] if model.get("architecture") else [])]
    meta["metrics"] = ["accuracy"]
    meta["pipeline_tag"] = "image-classification"
    dataset = (metrics or {}).get("dataset") or ""
    if dataset.startswith("hf:"):  # a hub dataset: hf:REPO[:CONFIG]
        meta["datasets"] = [dataset[3:].split(":", 1)[0]]
    return meta


def model_card(
    config: dict[str, Any],
    directory: Path,
    metrics: dict[str, Any] | None = None,
    params: tuple[int, int | None] | None = None,
    command: str | None = None,
) -> str:
    """The card's text: YAML front matter, then what the adapter is, how it did and how to load it."""
    import yaml

    model, method = config["model"], config["method"]
    meta = yaml.safe_dump(front_matter(config, metrics), sort_keys=False)
    lines = [f"---\n{meta}---", MARKER, "", f"# {method} adapter for {model['name']}", ""]
    lines += [
        f"A peftvision adapter: {method} on the timm model "
        f"`{model['name']}`, with a {model.get('num_classes')}-class head. The files hold only the trained "
        f"tensors; the base weights come from timm (or a local file).", "",
    ]
    lines += _about(config, directory, metrics, params)
    if metrics:
        lines += _results(metrics)
    lines += _usage(config)
    lines += _provenance(config, directory, command)
    return "\n".join(lines).rstrip() + "\n"


def _about(config: dict[str, Any], directory: Path, metrics: dict[str, Any] | None,
           params: tuple[int, int | None] | None) -> list[str]:
    model = config["model"]
    trainable, total = params or _counts(directory, metrics)
    share = f" ({100.0 * trainable / total:.3f}% of {total:,})" if total else ""
    size = (directory / "adapter.safetensors").stat().st_size
    kwargs = f" with `{json.dumps(model['kwargs'])}`" if model.get("kwargs") else ""
    classes = model.get("class_names") or []
    names = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
    lines = [
        "## Adapter", "",
        f"- base model: `{model['name']}`{kwargs}; weights fingerprint `{config['base_fingerprint']}`",
        f"- method: {config['method']}, options `{json.dumps(config['method_config'])}`",
        f"- trainable parameters: {trainable:,}{share}, the head included",
        f"- adapter size: {size:,} bytes (`adapter.safetensors`)",
        f"- eval preprocessing: {_RESIZE.get(model.get('resize') or 'crop')} (as in training)",
    ]
    if names:
        lines.append(f"- classes: {names}")
    if metrics and metrics.get("dataset"):
        lines += ["", f"## Data: `{metrics['dataset']}`", "", "| role | split | images | what |", "|---|---|---|---|"]
        for role, s in (metrics.get("splits") or {}).items():
            lines.append(f"| {role} | {s.get('split')} | {s.get('images')} | {s.get('about') or ''} |")
    return [*lines, ""]


_RESIZE = {"crop": "the model's own resize and centre crop", "squash": "the whole image resized to the input size"}


def _counts(directory: Path, metrics: dict[str, Any] | None) -> tuple[int, int | None]:
    if metrics and metrics.get("trainable_params") is not None:
        return int(metrics["trainable_params"]), metrics.get("total_params")
    from safetensors import safe_open


    with safe_open(str(directory / WEIGHTS_NAME), "pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys()), None


def _results(metrics: dict[str, Any]) -> list[str]:
    def pct(key: str) -> str:
        value = metrics.get(key)
        return "-" if value is None else f"{value:.2f}%"

    why = (metrics.get("selection") or {}).get("why")
    return [
        "## Results", "",
        "| val top-1 (kept epoch) | test top-1 | test top-5 | epochs (kept) |", "|---|---|---|---|",
        f"| {pct('best_val_top1')} | {pct('test_top1')} | {pct('test_top5')} "
        f"| {metrics.get('epochs_run')} ({metrics.get('best_epoch')}) |", "",
        *([f"Kept epoch: {why}.", ""] if why else []),
    ]


def _usage(config: dict[str, Any]) -> list[str]:
    from ..methods import build_config, get_method, saved_options

    model, name = config["model"], config["method"]
    method = get_method(name)
    options = build_config(method, saved_options(name, config["method_config"]))
    source = f"hf:{REPO_PLACEHOLDER}"
    arch = model["name"].split(".")[0]
    kwargs = "".join(f", {k}={v!r}" for k, v in (model.get("kwargs") or {}).items())
    lines = ["## Use it", ""] + _example(
        f"With peftvision (`{source}`, or a local copy of this directory):",
        [f"peftvision predict --adapter {source} image.jpg", f"peftvision eval --adapter {source} --dataset imagefolder:PATH"],
        ["import peftvision as pv", f'model = pv.load_adapter("{source}").eval()'],
    )
    if method.mergeable(options) is None:
        lines += _example(
            "With timm alone, merged into the base weights:",
            [f"peftvision merge --adapter {source} --output merged.safetensors"],
            ["import timm", f'model = timm.create_model("{arch}", num_classes={model.get("num_classes")}{kwargs}, '
                            f'checkpoint_path="merged.safetensors")'],
        )
    if method.exportable(options) is None:
        lines += _example(
            "With HF PEFT, after exporting to its format:",
            [f"peftvision export --adapter {source} --output peft-adapter"],
            ["import peft, timm",
             f'base = timm.create_model("{model["name"]}", pretrained=True, num_classes={model.get("num_classes")}{kwargs})',
             'model = peft.PeftModel.from_pretrained(base, "peft-adapter")'],
        )
    return lines


def _example(intro: str, shell: list[str], python: list[str]) -> list[str]:
    """One way to load the adapter: a sentence, the commands, then the Python."""
    return [intro, "", "```bash", *shell, "```", "", "```python", *python, "```", ""]


def _provenance(config: dict[str, Any], directory: Path, command: str | None) -> list[str]:
    lines = ["## How it was made", ""]
    if command:
        lines += ["```", command, "```", ""]
    if (directory / "config.yaml").is_file():
        lines += [
            "The resolved run config is `config.yaml`; rerun it with", "",
            "```bash", "peftvision finetune --recipe config.yaml --output NEW_DIR", "```", "",
        ]
    lines.append(f"peftvision {config.get('peftvision_version')}, Python {sys.version.split()[0]}.")
    return lines


# ----------------------------------------------------------------------------- cards of exports

def export_card(config: dict[str, Any], library: str, what: str, usage: list[str],
                metrics: dict[str, Any] | None = None) -> str:
    """The card of an export (a timm model folder, an HF PEFT adapter): the hub reads `library` as the
    library that loads it, and the text says which peftvision adapter it came from and how to load it.

    Args:
        config: the source adapter's `adapter_config.json` (`adapter_config(model)`).
        library: the hub's `library_name` (timm, peft).
        what: one paragraph saying what the files are.
        usage: the loading example (Markdown lines; `USER/NAME` is replaced by `push`).
        metrics: the source run's metrics.json, when it came from `finetune`.
    """
    import yaml

    from .. import __version__

    model, method = config["model"], config["method"]
    meta: dict[str, Any] = {"library_name": library}
    base = base_model_id(model["name"])
    if base:
        meta["base_model"] = base
    meta["tags"] = ["image-classification", "timm", "peftvision", method]
    meta["pipeline_tag"] = "image-classification"
    kwargs = f" with `{json.dumps(model['kwargs'])}`" if model.get("kwargs") else ""
    classes = model.get("class_names") or []
    lines = [f"---\n{yaml.safe_dump(meta, sort_keys=False)}---", MARKER, "",
             f"# {method} on {model['name']}, for {library}", "", what, "", "## Source adapter", "",
             f"- base model: `{model['name']}`{kwargs}; weights fingerprint `{config['base_fingerprint']}`",
             f"- method: {method}, options `{json.dumps(config['method_config'])}`",
             f"- head: {model.get('num_classes')} classes" + (f" ({', '.join(classes[:10])}"
                                                              f"{', ...' if len(classes) > 10 else ''})" if classes else ""),
             f"- eval preprocessing: {_RESIZE.get(model.get('resize') or 'crop')} (as in training)", ""]
    if metrics:
        lines += _results(metrics)
    lines += ["## Use it", "", *usage, "",
              f"Exported by peftvision {__version__}, Python {sys.version.split()[0]}."]
    return "\n".join(lines).rstrip() + "\n"
