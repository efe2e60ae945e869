"""The adapter directory format: file names, and reading / writing its config and tensors.

An adapter directory holds `adapter.safetensors` -- only the method's tensors and the head -- and
`adapter_config.json`: what to rebuild the base with, which method with which config, and fingerprints
of the base it was trained on. This module is the format's one owner and a leaf: it knows files, not
models, the hub or the card (a `hf:` source is resolved to a local directory before it is read here).
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError
from ..files import atomic_write_text, load_tensors, save_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
CARD_NAME = "README.md"  # the model card, as the Hugging Face Hub reads it
FORMAT = "peftvision-adapter"
FORMAT_VERSION = 1
REQUIRED = ("method", "method_config", "model", "base_fingerprint", "architecture_signature", "tensors")


def write_adapter_files(directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write the tensors, then the config (each atomically): a reader never sees a config whose tensors are missing."""
    directory = Path(directory)
    save_tensors(tensors, directory / WEIGHTS_NAME, {"format": FORMAT})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked `adapter_config.json` of a local adapter directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.parent.is_dir():
        raise AdapterFileError(f"adapter directory not found: {directory}")
    if not path.is_file():
        raise AdapterFileError(f"{directory} has no {CONFIG_NAME}: is it a directory written by save_adapter / finetune?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path} is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is not a peftvision adapter config (an HF PEFT directory? load it with peft)")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterFileError(f"{path} was written by a newer peftvision ({config.get('peftvision_version')}); upgrade")
    for key in REQUIRED:
        if key not in config:
            raise AdapterFileError(f"{path} lacks the field {key!r}; the file is damaged")
    return config


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a local adapter directory (a truncated or non-safetensors file is one clear error).
    A NaN or infinite entry is refused too: training never saves one (a non-finite loss stops the run
    first), so such a file is damaged, and loaded it would only serve NaN probabilities."""
    path = Path(directory) / WEIGHTS_NAME
    tensors = load_tensors(path)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterFileError(f"{path}: tensor {name} holds NaN or infinite values; the file is damaged, "
                                   f"re-copy or re-train the adapter")
    return tensors
