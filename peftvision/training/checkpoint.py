"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint holds the trainable tensors, the optimizer's state, the scheduler's counters, the RNG
states (python, numpy, torch) and the loop's own state (epoch, best score, history), so a resumed run
continues bit for bit where the interrupted one stopped. It is written to a temp directory and renamed
into place, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PeftVisionError
from ..files import load_tensors, save_tensors

TENSORS = "state.safetensors"
META = "state.json"


def _encode(name: str, value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON stand-in for `value`; tensors go to `tensors` under `name` (timm's optimizers keep
    tensors in param groups (LAMB's step), lists of tensors in their state (Kron), dtypes (AdafactorBV))."""
    if torch.is_tensor(value):
        tensors[name] = value
        return {"__tensor__": name}
    if isinstance(value, (list, tuple)) and any(torch.is_tensor(v) for v in value):
        return {"__list__": [_encode(f"{name}.{i}", v, tensors) for i, v in enumerate(value)]}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    return value


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and len(value) == 1:
        (kind, inner), = value.items()
        if kind == "__tensor__":
            return tensors[inner]
        if kind == "__list__":
            return [_decode(v, tensors) for v in inner]
        if kind == "__dtype__":
            return getattr(torch, inner)
    return value


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state = {str(idx): {k: _encode(f"optimizer.{idx}.{k}", v, tensors) for k, v in values.items()}
             for idx, values in sd["state"].items()}
    groups = [{k: _encode(f"optimizer_group.{i}.{k}", v, tensors) for k, v in group.items()}
              for i, group in enumerate(sd["param_groups"])]
    return tensors, {"param_groups": groups, "state": state}


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state = {int(idx): {k: _decode(v, tensors) for k, v in values.items()} for idx, values in meta["state"].items()}
    groups = [{k: _decode(v, tensors) for k, v in group.items()} for group in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(
    directory: str | os.PathLike,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loop_state: dict[str, Any],
) -> None:
    """Write a complete training state to `directory`, atomically (temp dir + rename)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    rng_tensors, rng_meta = _rng_state()
    tensors = {**{f"param.{k}": v for k, v in params.items()}, **opt_tensors, **rng_tensors}
    save_tensors(tensors, tmp / TENSORS)
    meta = {"optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta, "loop": loop_state}
    (tmp / META).write_text(json.dumps(meta))
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    directory: str | os.PathLike,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote into live objects; return the loop state."""
    directory = Path(directory)
    if not (directory / META).is_file():
        raise PeftVisionError(f"no checkpoint in {directory} (expected {META}); was the run started with this output?")
    try:
        meta = json.loads((directory / META).read_text())
    except json.JSONDecodeError:
        raise PeftVisionError(f"{directory / META} is damaged; delete the checkpoint and start again") from None
    if "state" not in meta.get("optimizer", {}):
        raise PeftVisionError(f"the checkpoint in {directory} was written by an older peftvision (before timm's "
                              f"optimizer and scheduler); it cannot resume: start the run again")
    tensors = load_tensors(directory / TENSORS)
    missing = [k for k in params if f"param.{k}" not in tensors]
    if missing:
        raise PeftVisionError(f"checkpoint in {directory} does not match this run's method (missing {missing[:2]})")
    other = [k for k, p in params.items() if tensors[f"param.{k}"].shape != p.shape]
    if other:  # e.g. a run started under another default of the method's options
        k = other[0]
        raise PeftVisionError(f"checkpoint in {directory} does not match this run's method options ({k} is "
                              f"{tuple(tensors[f'param.{k}'].shape)} there, {tuple(params[k].shape)} here); start the run again")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
    _optimizer_from_flat(optimizer, tensors, meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    _set_rng_state(tensors, meta["rng"])
    return meta["loop"]
