"""`ServeConfig`: every setting of `peftvision serve`, declared once; its fields are the serve flags.

Defaults are safe for a server that a careless or hostile client can reach: adapter management is off,
nothing is read outside `adapters_dir`, nothing is downloaded, and every request is bounded in size,
pixels and time. No torch import: the CLI builds its parser from this module and must stay instant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..training.config import from_values, option

TOKEN_ENV = "PEFTVISION_ADMIN_TOKEN"
MIN_TOKEN_LENGTH = 16  # a guessable token is no lock: ask for 16+ characters (secrets.token_urlsafe() gives 43)


@dataclass
class ServeConfig:
    """How `peftvision serve` runs; `create_app` and `serve` read nothing else."""

    adapters: tuple[str, ...] = option(tuple, "NAME=DIR or NAME=hf:USER/NAME[@REVISION] (the --adapter flags)",
                                       flag=False)
    adapters_dir: str | None = option(None, "serve every adapter folder directly inside DIR, named by its folder; "
                                            "POST /adapters loads only from inside it (symlinks resolved)")
    checkpoint: str | None = option(None, "local weights file for the shared base model (none: download it from the hub)")
    ignore_fingerprint: bool = option(False, "accept adapters trained on other base weights")
    host: str = option("127.0.0.1", "address to listen on; 0.0.0.0 exposes the server to every network it is on")
    port: int = option(8000, "port to listen on")
    admin_token: str | None = option(None, f"turns on POST/DELETE /adapters for requests with 'Authorization: "
                                           f"Bearer TOKEN' ({MIN_TOKEN_LENGTH}+ characters); better set {TOKEN_ENV}, "
                                           "which `ps` does not show; unset: adapter management is off")
    allow_hub: bool = option(False, "let POST /adapters download hf:USER/NAME adapters (off: a caller could make the "
                                    "server fetch any repository)")
    max_batch: int = option(32, "most images run as one batch (a pass of the backbone)")
    max_wait_ms: float = option(5.0, "how long the first request of a batch waits for others to join it (and on, "
                                     "for at most 250 ms, for images already being decoded)")
    max_queue: int = option(64, "requests admitted at once (reading, decoding, waiting, running); beyond it: 503 "
                                "with Retry-After, before the body is read")
    max_body_mb: float = option(20.0, "largest request body (413 above), counted while it streams, chunked or not")
    max_pixels: int = option(40_000_000, "largest image in pixels, read from its header before decoding (413 above): "
                                         "a 40 MP photo decodes to 120 MB; large JPEGs decode scaled down first")
    decode_workers: int = option(0, "threads decoding and preprocessing images, apart from the model's thread; 0: one "
                                    "per CPU core, so that decoding the next full batch keeps every core busy")
    request_timeout: float = option(30.0, "seconds a client has to send a whole request, headers and body (408 "
                                          "and the connection closed after)")
    keep_alive: int = option(5, "seconds an idle keep-alive connection stays open")
    max_connections: int = option(512, "open connections at once; a connection beyond it is answered 503 with Retry-After")

    def __post_init__(self) -> None:
        checks = [
            (self.max_batch >= 1, "max_batch must be >= 1"),
            (self.max_wait_ms >= 0, "max_wait_ms must be >= 0"),
            (self.max_queue >= 1, "max_queue must be >= 1"),
            (self.max_body_mb > 0, "max_body_mb must be > 0"),
            (self.max_pixels >= 1, "max_pixels must be >= 1"),
            (self.decode_workers >= 0, "decode_workers must be >= 0 (0: one per CPU core)"),
            (self.request_timeout > 0, "request_timeout must be > 0"),
            (self.keep_alive >= 1, "keep_alive must be >= 1"),
            (self.max_connections >= 1, "max_connections must be >= 1"),
            (0 <= self.port <= 65535, "port must be in 0-65535"),
            (self.admin_token is None or len(self.admin_token) >= MIN_TOKEN_LENGTH,
             f"the admin token must have at least {MIN_TOKEN_LENGTH} characters: "
             "python -c 'import secrets; print(secrets.token_urlsafe())' makes one"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1_000_000)

    @classmethod
    def from_flags(cls, flags: dict[str, Any], environ: dict[str, str] | None = None) -> "ServeConfig":
        """The config of the flags given (None: not given, the default stands); the admin token from
        the environment when no flag gives it."""
        values = {k: v for k, v in flags.items() if v is not None}
        env = os.environ if environ is None else environ
        if "admin_token" not in values and env.get(TOKEN_ENV):
            values["admin_token"] = env[TOKEN_ENV]
        if "adapters" in values:
            values["adapters"] = tuple(values["adapters"])
        return from_values(cls, values)
