"""What every request must pass before the server spends anything on it: admission, size, time, type, shape.

Each check fails with an `HTTPError` whose message says what the limit is and never repeats what the
client sent (a 5,000-digit `top_k` is not echoed back), nor anything of the server's files or objects.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

MAX_JSON_DEPTH = 32  # the deepest a request of ours nests is 4 (v2: body > inputs > input > data)
MAX_TOP_K = 1000
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # adapter names: safe in URLs, metrics labels, messages
_DIGITS = re.compile(r"[0-9]{1,4}")  # ASCII only: str.isdigit() also takes "²" (int() then fails) and "٣" (3)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string whole: brackets inside do not count


class HTTPError(Exception):
    """A request refused with `status`; `close` ends the connection after the answer (a body left unread)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})
        if close:
            self.headers["Connection"] = "close"


# ----------------------------------------------------------------------------- admission

class Gate:
    """At most `limit` requests inside at once; one more is refused at the door with 503 and a Retry-After
    (seconds the queue ahead of it needs, from `wait_estimate`), before its body is read."""

    def __init__(self, limit: int, wait_estimate: Any = None) -> None:
        self.limit = limit
        self.inside = 0
        self.wait_estimate = wait_estimate or (lambda: 1.0)

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self.inside >= self.limit:
            retry = max(1, min(60, math.ceil(self.wait_estimate())))
            raise HTTPError(503, f"the server is busy ({self.limit} requests in progress, --max-queue): retry later",
                            headers={"Retry-After": str(retry)}, close=True)
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1


# ----------------------------------------------------------------------------- bodies

def require_media_type(headers: Any, allowed: tuple[str, ...]) -> str:
    """The request's media type if it is one of `allowed`, else 415. A browser page can send text/plain
    (or a form) to any origin without asking; refusing it keeps other sites' pages from driving the server."""
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in allowed:
        raise HTTPError(415, f"send the body as {' or '.join(a or 'no content type' for a in allowed)}")
    if headers.get("content-encoding", "identity").strip().lower() != "identity":
        raise HTTPError(415, "compressed bodies are not accepted (a small zip can expand without bound)")
    return media


async def read_body(request: Any, limit: int, timeout: float) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` bytes -- from its Content-Length
    before reading, else while it streams (chunked bodies have none) -- or 408 if it has not all arrived
    within `timeout` seconds. Either way the connection is closed: the rest of the body is never read."""
    from starlette.requests import ClientDisconnect

    length = request.headers.get("content-length")
    if length is not None and not (length.isascii() and length.isdigit()):
        raise HTTPError(400, "bad Content-Length", close=True)
    too_large = HTTPError(413, f"the request body is over the {limit / 1e6:g} MB limit (--max-body-mb)", close=True)
    if length is not None and int(length) > limit:
        raise too_large

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise HTTPError(408, f"the request body did not arrive within {timeout:g} s", close=True) from None
    except ClientDisconnect:
        raise HTTPError(400, "the client went away before the body arrived", close=True) from None


def json_depth_over(body: bytes, limit: int) -> bool:
    """True if `body` nests arrays / objects deeper than `limit`. C-speed throughout (a regex drops the
    strings, whose brackets do not count; numpy keeps the running depth), so a 20 MB body of brackets
    does not hold the event loop; a body with fewer than `limit` brackets (any real request) is not scanned."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    code = np.frombuffer(_JSON_STRING.sub(b"", body), dtype=np.uint8)
    step = (code == 91).astype(np.int32) + (code == 123) - (code == 93) - (code == 125)  # [ { ] }
    return bool(step.size) and int(np.cumsum(step).max()) > limit


def parse_json(body: bytes, what: str = "the JSON body") -> Any:
    """`body` parsed, or 400: not JSON, not UTF-8, or nested deeper than MAX_JSON_DEPTH (refused before
    parsing, where Python's parser would take it down to its recursion limit)."""
    if json_depth_over(body, MAX_JSON_DEPTH):
        raise HTTPError(400, f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(body.decode("utf-8"))  # bytes would let json guess UTF-16 / 32 from the first bytes
    except UnicodeDecodeError:
        raise HTTPError(400, f"{what} is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise HTTPError(400, f"{what} is not valid JSON ({e.msg} at character {e.pos})") from None
    except (ValueError, RecursionError):  # e.g. an integer of more than 4,300 digits
        raise HTTPError(400, f"{what} is not valid JSON") from None


# ----------------------------------------------------------------------------- fields

def parse_top_k(value: Any, default: int = 5) -> int:
    """`top_k` from JSON (an integer) or a form (ASCII digits), 1 to MAX_TOP_K; else 422."""
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        n = int(value)
    else:
        n = 0
    if not 1 <= n <= MAX_TOP_K:
        raise HTTPError(422, f"top_k must be a whole number from 1 to {MAX_TOP_K}")
    return n


def check_name(name: Any, what: str = "adapter name") -> str:
    """`name` if it is a safe adapter name (letters, digits, '.', '_', '-'; 64 at most), else 422."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise HTTPError(422, f"the {what} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def check_admin(headers: Any, token: str | None) -> None:
    """Adapter management needs the server's admin token as 'Authorization: Bearer TOKEN' (compared in
    constant time); without a token configured it is off for everyone."""
    if token is None:
        raise HTTPError(403, "adapter management is off: start the server with --admin-token "
                             "(or PEFTVISION_ADMIN_TOKEN) and send it as 'Authorization: Bearer TOKEN'")
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise HTTPError(401, "adapter management needs 'Authorization: Bearer TOKEN'", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPError(403, "wrong admin token")
