"""`peftvision serve`: a `MultiAdapterModel` over HTTP (FastAPI + uvicorn), with dynamic batching.

Requests that arrive within `max_wait_ms` of each other are run as one batch whatever their adapters:
one pass of the frozen backbone. Decoding and preprocessing (each adapter's own transform) run per
request in a thread, so a bad image fails its own request with 400 and never a batch. Errors are
JSON `{"error": "..."}`: unknown adapter 404, undecodable or missing image 400, image over the size
limit 413, adapter for another base (or a name already taken) 409, malformed body 422.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (`Request`) at runtime
import asyncio
import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.format import CONFIG_NAME
from ..errors import (
    AdapterExistsError,
    AdapterFileError,
    BaseMismatchError,
    ConfigError,
    DataError,
    PeftVisionError,
    UnknownAdapterError,
)
from .multi import MultiAdapterModel


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _status(e: PeftVisionError) -> int:
    if isinstance(e, UnknownAdapterError):
        return 404
    if isinstance(e, (BaseMismatchError, AdapterExistsError)):
        return 409
    if isinstance(e, (AdapterFileError, DataError)):
        return 400
    return 422


def find_adapters(pairs: list[str] | None, directory: str | None) -> dict[str, str]:
    """{name: source} from `NAME=DIR` / `NAME=hf:USER/NAME[@REVISION]` flags (split on the first '=': a hub
    source has none) and from every adapter folder directly inside `directory`."""
    adapters: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter takes NAME=DIR or NAME=hf:USER/NAME, got {pair!r}")
        adapters[name] = path
    if directory is not None:
        root = Path(directory)
        if not root.is_dir():
            raise ConfigError(f"--adapters-dir {directory} is not a directory")
        found = sorted(p for p in root.iterdir() if (p / CONFIG_NAME).is_file())
        if not found:
            raise ConfigError(f"--adapters-dir {directory} holds no adapter folders (with {CONFIG_NAME})")
        for p in found:
            adapters.setdefault(p.name, str(p))
    if not adapters:
        raise ConfigError("nothing to serve: give --adapter NAME=DIR or --adapters-dir DIR")
    return adapters


@dataclass
class _Request:
    x: Any  # (C, H, W) preprocessed image
    adapter: str
    top_k: int
    future: asyncio.Future


@dataclass
class Batcher:
    """Collects requests for up to `max_wait_ms` (or `max_batch` of them) and runs them as one batch."""

    model: MultiAdapterModel
    max_batch: int = 32
    max_wait_ms: float = 5.0
    stats: dict[str, int] = field(default_factory=lambda: {"requests": 0, "batches": 0, "largest_batch": 0})
    queue: asyncio.Queue | None = None

    async def submit(self, x: Any, adapter: str, top_k: int) -> list[dict[str, Any]]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Request(x, adapter, top_k, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_ms / 1000
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                try:  # past the deadline, still take what is already waiting
                    batch.append(self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout))
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Request]) -> None:
        live = []
        for r in batch:  # an adapter removed while its request waited fails that request only
            if r.adapter in self.model:
                live.append(r)
            else:
                r.future.set_exception(HTTPError(404, f"adapter {r.adapter!r} was removed"))
        if not live:
            return
        try:
            results = await asyncio.to_thread(self._predict, live)
        except Exception as e:  # noqa: BLE001 -- a failed batch fails its requests, not the server
            for r in live:
                if not r.future.done():
                    r.future.set_exception(e)
            return
        self.stats["requests"] += len(live)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
        for r, result in zip(live, results):
            if not r.future.done():
                r.future.set_result(result)

    def _predict(self, batch: list[_Request]) -> list[list[dict[str, Any]]]:
        import torch

        return self.model.top_k(torch.stack([r.x for r in batch]), [r.adapter for r in batch], [r.top_k for r in batch])


def create_app(model: MultiAdapterModel, max_batch: int = 32, max_wait_ms: float = 5.0, max_image_mb: float = 20.0) -> Any:
    """The FastAPI application serving `model` (run it with uvicorn)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ..data import decode_image

    batcher = Batcher(model, max_batch=max_batch, max_wait_ms=max_wait_ms)
    limit = int(max_image_mb * 1_000_000)

    @asynccontextmanager
    async def lifespan(app: Any):
        batcher.queue = asyncio.Queue()
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="peftvision", lifespan=lifespan)
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        return error(e.status, str(e))

    @app.exception_handler(PeftVisionError)
    async def _pv_error(request: Request, e: PeftVisionError) -> JSONResponse:
        return error(_status(e), str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return error(422, f"malformed request: {e.errors()[0].get('msg', e)}" if e.errors() else "malformed request")

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:  # a bug: report it, keep serving
        return error(500, f"internal error: {type(e).__name__}: {e}")

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(422, f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(422, "the JSON body must be an object")
        return body

    def check_size(n: int) -> None:
        if n > limit:
            raise HTTPError(413, f"image of {n / 1e6:.1f} MB is over the {max_image_mb:g} MB limit (--max-image-mb)")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "adapters": len(model.adapters), **batcher.stats}

    @app.get("/adapters")
    async def adapters() -> list[dict[str, Any]]:
        return [a.describe() for a in model.adapters]

    @app.post("/adapters")
    async def add_adapter(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise HTTPError(422, 'POST /adapters takes {"name": NAME, "path": DIR}')
        info = await asyncio.to_thread(model.add_adapter, name, path)
        return info.describe()

    @app.delete("/adapters/{name}")
    async def remove_adapter(name: str) -> dict[str, Any]:
        await asyncio.to_thread(model.remove_adapter, name)
        return {"removed": name, "adapters": len(model.adapters)}

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit * 4 // 3 + 1_000_000:  # base64 grows 4/3
            check_size(int(length) * 3 // 4)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            adapter, top_k, upload = form.get("adapter"), form.get("top_k", "5"), form.get("file")
            data = await upload.read() if hasattr(upload, "read") else None
        else:
            body = await json_body(request)
            adapter, top_k, image = body.get("adapter"), body.get("top_k", 5), body.get("image")
            data = None
            if isinstance(image, str):
                try:
                    data = base64.b64decode(image, validate=True)
                except (binascii.Error, ValueError):
                    raise HTTPError(400, "image is not valid base64 (send the bytes of a PNG/JPEG file, base64-encoded)") from None
            elif image is not None:
                raise HTTPError(422, "image must be a base64 string")
        if not isinstance(adapter, str):
            raise HTTPError(422, 'name the adapter: {"adapter": NAME, ...}')
        if isinstance(top_k, bool) or not str(top_k).isdigit() or int(top_k) < 1:
            raise HTTPError(422, f"top_k must be a positive integer, got {top_k!r}")
        top_k = int(top_k)
        if adapter not in model:
            model.info(adapter)  # raises the 404
        if not data:
            raise HTTPError(400, "no image: send a base64 'image' in JSON, or a multipart 'file'")
        check_size(len(data))

        def prepare() -> Any:
            return model.transform(adapter)(decode_image(data, "the uploaded image"))

        x = await asyncio.to_thread(prepare)
        return {"adapter": adapter, "predictions": await batcher.submit(x, adapter, top_k)}

    return app


def serve(
    adapters: dict[str, str], checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 8000,
    max_batch: int = 32, max_wait_ms: float = 5.0, max_image_mb: float = 20.0, ignore_fingerprint: bool = False,
) -> None:
    """Load the adapters over their shared base and serve them until Ctrl-C."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise PeftVisionError("serving needs FastAPI and uvicorn: pip install 'peftvision[serve]'") from None
    model = MultiAdapterModel.from_adapters(adapters, checkpoint=checkpoint, ignore_fingerprint=ignore_fingerprint)
    app = create_app(model, max_batch=max_batch, max_wait_ms=max_wait_ms, max_image_mb=max_image_mb)
    print(f"serving {len(model.adapters)} adapters over {model.base_name} on http://{host}:{port} (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("PEFTVISION_LOG_LEVEL", "warning"))
