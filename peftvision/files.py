"""Writing and reading files safely: atomic writes, safetensors, JSON, YAML, CSV, PNG.

Every stage that writes (training checkpoints, adapter files, run records, comparison reports) goes
through here, so "readers never see half a file" and "nothing is ever unpickled" hold in one place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .errors import AdapterFileError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temp file next to `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a written file gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_group(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`atomic_write` for a writer that may put files beside `path` (ONNX's external weights,
    `<name>.data`): `write(staged)` runs in a temp directory next to `path`, then each file it made is
    renamed into place, `path` last, so whoever finds `path` finds its companions too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        write(staged)
        umask = os.umask(0)
        os.umask(umask)
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f == staged):
            os.chmod(f, 0o666 & ~umask)
            os.replace(f, path.parent / f.name)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_yaml(path: str | os.PathLike, data: Any) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def write_csv(path: str | os.PathLike, rows: Iterable[dict[str, Any]], columns: list[str]) -> None:
    """One row per dict, in `columns` order; floats to 6 significant digits, None as an empty cell."""

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)

    lines = [",".join(columns), *(",".join(cell(row.get(c)) for c in columns) for row in rows)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def save_png(path: str | os.PathLike, figure: Any, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG, atomically."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or foreign file gives one clear error."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise AdapterFileError(f"{path} not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise AdapterFileError(
            f"{path} is truncated or not a safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"re-copy or re-train the adapter"
        ) from None
