"""Where served adapters may come from: folders inside `--adapters-dir`, and the hub only if allowed.

Like Triton's explicit model-control mode, a running server loads by name from its own repository
only: a path is resolved (symlinks followed) and must land inside the adapters directory, and every
path that does not is refused with the same words whether it exists or not, so the admin API cannot be
used to probe the file system. The operator's own `--adapter NAME=SOURCE` flags are not confined.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..adapters.format import CONFIG_NAME
from ..errors import ConfigError
from .limits import NAME, HTTPError

BASE = "base"  # the plain backbone's own head (MultiAdapterModel.BASE): no adapter may take the name
_HUB = re.compile(r"hf:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,128})?")


def _name(name: str, where: str) -> str:
    if not NAME.fullmatch(name) or name == BASE:
        raise ConfigError(f"{where}: adapter names are 1-64 letters, digits, '.', '_' or '-' (not {BASE!r}), got {name!r}")
    return name


def find_adapters(pairs: tuple[str, ...] | list[str] | None, directory: str | None) -> dict[str, str]:
    """{name: source} from `NAME=DIR` / `NAME=hf:USER/NAME[@REVISION]` flags (split on the first '=': a hub
    source has none) and from every adapter folder directly inside `directory` (named by its folder)."""
    adapters: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter takes NAME=DIR or NAME=hf:USER/NAME, got {pair!r}")
        adapters[_name(name, "--adapter")] = path
    if directory is not None:
        root = Path(directory)
        if not root.is_dir():
            raise ConfigError(f"--adapters-dir {directory} is not a directory")
        found = sorted(p for p in root.iterdir() if (p / CONFIG_NAME).is_file())
        if not found and not adapters:
            raise ConfigError(f"--adapters-dir {directory} holds no adapter folders (with {CONFIG_NAME})")
        for p in found:
            if NAME.fullmatch(p.name) and p.name != BASE:  # a folder no URL could name is not served
                adapters.setdefault(p.name, str(p))
    if not adapters:
        raise ConfigError("nothing to serve: give --adapter NAME=DIR or --adapters-dir DIR")
    return adapters


@dataclass
class Repository:
    """Resolves the sources that `POST /adapters` names: a folder inside `root`, or `hf:` if `allow_hub`."""

    root: str | None = None
    allow_hub: bool = False

    def resolve(self, source: str) -> str:
        """A local directory inside `root` (resolved) or a hub source; 403 / 404 / 422 otherwise."""
        if not isinstance(source, str) or not source or len(source) > 1024 or "\x00" in source:
            raise HTTPError(422, "the adapter path must be a folder name inside the adapters directory")
        if source.startswith("hf:"):
            if not self.allow_hub:
                raise HTTPError(403, "hub adapters are off: start the server with --allow-hub to load hf: sources")
            if not _HUB.fullmatch(source):
                raise HTTPError(422, "a hub adapter is hf:USER/NAME or hf:USER/NAME@REVISION")
            return source
        if self.root is None:
            raise HTTPError(403, "loading adapters by path is off: start the server with --adapters-dir DIR")
        outside = HTTPError(403, "the adapter path must be a folder inside the adapters directory")
        try:
            root = Path(self.root).resolve(strict=True)
            path = (root / source).resolve()  # an absolute source replaces root: it is checked like any other
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long
            raise outside from None
        if path == root or not path.is_relative_to(root):
            raise outside
        if not (path / CONFIG_NAME).is_file():
            raise HTTPError(404, f"no adapter folder of that name inside the adapters directory (one with {CONFIG_NAME})")
        return str(path)
