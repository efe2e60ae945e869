"""`peftvision serve`: a `MultiAdapterModel` over HTTP (FastAPI + uvicorn), with dynamic batching.

Endpoints:
- inference: `POST /predict` (JSON with a base64 image, or a multipart upload) and the Open Inference
  Protocol (`/v2/...`, `v2.py`); requests for any adapters are batched together (`batcher.py`);
- reading: `GET /health`, `GET /adapters`, `GET /metrics` (Prometheus);
- management, off unless the server has an admin token: `POST /adapters`, `DELETE /adapters/{name}`.

Errors are JSON `{"error": "..."}` with the status that says why: 400 malformed, 401 / 403 no or wrong
token (or management off, or a path outside the adapters directory), 404 unknown adapter, 408 too slow,
409 another base (or a name taken), 413 too large, 415 wrong content type, 422 well-formed but wrong,
503 busy (with Retry-After). No error answer repeats what the client sent or describes an object of the
server's; a bug answers 500 "internal error" and is logged, never sent.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (`Request`) at runtime
import asyncio
import base64
import binascii
import logging
import os
from typing import Any

from ..data.images import ImageTooLargeError, decode_image, decode_size
from ..data.labels import top_k
from ..errors import AdapterExistsError, BaseMismatchError, DataError, PeftVisionError, UnknownAdapterError
from . import v2
from .batcher import Batcher
from .config import ServeConfig
from .limits import (
    NAME,
    Gate,
    HTTPError,
    check_admin,
    check_name,
    parse_json,
    parse_top_k,
    read_body,
    require_media_type,
)
from .metrics import Metrics, Observe
from .multi import BASE, MultiAdapterModel
from .repository import Repository, find_adapters

ADMIN_BODY_LIMIT = 1_000_000  # a {"name", "path"} object needs a few hundred bytes
JSON = ("application/json",)
log = logging.getLogger("peftvision.serve")

__all__ = ["create_app", "find_adapters", "serve", "uvicorn_config"]


def _status(e: PeftVisionError) -> int:
    if isinstance(e, UnknownAdapterError):
        return 404
    if isinstance(e, (BaseMismatchError, AdapterExistsError)):
        return 409
    if isinstance(e, ImageTooLargeError):
        return 413
    if isinstance(e, DataError):
        return 400
    return 422


class _Server:
    """The app's state and the steps its handlers share."""

    def __init__(self, model: MultiAdapterModel, config: ServeConfig) -> None:
        self.model = model
        self.config = config
        self.metrics = Metrics()
        self.batcher = Batcher(model, config.max_batch, config.max_wait_ms, config.decode_workers, self.metrics)
        self.gate = Gate(config.max_queue, self.batcher.wait_estimate)
        self.repository = Repository(config.adapters_dir, config.allow_hub)
        self.admin_lock = asyncio.Lock()
        self.metrics.watch(lambda: self.batcher.queued_images, lambda: self.gate.inside, lambda: len(model.adapters))

    def adapter(self, name: Any, request: Any) -> str:
        """`name` if it is loaded (or the base), noted for the metrics; 404 otherwise."""
        if not isinstance(name, str) or name not in self.model:
            shown = f" named {name!r}" if isinstance(name, str) and NAME.fullmatch(name) else ""  # else not echoed
            raise HTTPError(404, f"no adapter{shown} is loaded (GET /adapters lists them)")
        request.state.adapter = name
        return name

    async def decode(self, images: list[bytes], adapter: str) -> Any:
        """(n, C, H, W): `images` decoded upright, within the pixel limit, preprocessed as `adapter` was
        trained (in the decode pool)."""
        import torch

        transform = self.model.transform(adapter)
        size, max_pixels = decode_size(transform), self.config.max_pixels

        def prepare() -> torch.Tensor:
            names = ["the uploaded image"] if len(images) == 1 else [f"uploaded image {i}" for i in range(len(images))]
            return torch.stack([transform(decode_image(d, n, max_pixels, size)) for d, n in zip(images, names)])

        return await self.batcher.decode(prepare, len(images))


def create_app(model: MultiAdapterModel, config: ServeConfig | None = None) -> Any:
    """The FastAPI application serving `model` (run it with uvicorn, as `serve` does)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServeConfig()
    server = _Server(model, config)
    batcher, gate, limit, timeout = server.batcher, server.gate, config.max_body_bytes, config.request_timeout

    @asynccontextmanager
    async def lifespan(app: Any):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.close()

    app = FastAPI(title="peftvision", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Observe, metrics=server.metrics)

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        return error(e.status, str(e), e.headers)

    @app.exception_handler(PeftVisionError)
    async def _pv_error(request: Request, e: PeftVisionError) -> JSONResponse:
        return error(_status(e), str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return error(422, "malformed request")

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:  # a bug: log it, tell nothing
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, "internal error (logged by the server)")

    # ------------------------------------------------------------------------- reading

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "adapters": len(model.adapters), "in_flight": gate.inside, **batcher.stats}

    @app.get("/adapters")
    async def adapters() -> list[dict[str, Any]]:
        return [a.describe() for a in model.adapters]

    @app.get("/metrics")
    async def metrics() -> Response:
        body, media_type = server.metrics.render()
        return Response(body, media_type=media_type)

    # ------------------------------------------------------------------------- management

    @app.post("/adapters")
    async def add_adapter(request: Request) -> dict[str, Any]:
        check_admin(request.headers, config.admin_token)
        require_media_type(request.headers, JSON)
        body = parse_json(await read_body(request, ADMIN_BODY_LIMIT, timeout))
        if not isinstance(body, dict):
            raise HTTPError(422, 'POST /adapters takes {"name": NAME, "path": FOLDER}')
        name = check_name(body.get("name"))
        if name == BASE:
            raise HTTPError(422, f"{BASE!r} names the backbone's own head; choose another name")
        source = server.repository.resolve(body.get("path", name))
        async with server.admin_lock:  # one load at a time: each holds an adapter's tensors while it builds
            if name in model:
                raise HTTPError(409, f"an adapter named {name!r} is already loaded; remove it first")
            info = await asyncio.to_thread(model.add_adapter, name, source)
        return info.describe()

    @app.delete("/adapters/{name}")
    async def remove_adapter(name: str, request: Request) -> dict[str, Any]:
        check_admin(request.headers, config.admin_token)
        async with server.admin_lock:
            name = server.adapter(name, request)
            if name == BASE:
                raise HTTPError(422, f"{BASE!r} is the backbone itself and cannot be removed")
            await asyncio.to_thread(model.remove_adapter, name)
        return {"removed": name, "adapters": len(model.adapters)}

    # ------------------------------------------------------------------------- inference

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        with gate.admit():
            media = require_media_type(request.headers, ("application/json", "multipart/form-data"))
            body = await read_body(request, limit, timeout)
            if media == "multipart/form-data":
                adapter, k, data = await _form(request, body)
            else:
                fields = parse_json(body)
                if not isinstance(fields, dict):
                    raise HTTPError(422, "the JSON body must be an object")
                adapter, k, data = fields.get("adapter"), fields.get("top_k"), _base64_image(fields.get("image"))
            if not isinstance(adapter, str):
                raise HTTPError(422, 'name the adapter: {"adapter": NAME, ...}')
            adapter, k = server.adapter(adapter, request), parse_top_k(k)
            if not data:
                raise HTTPError(400, "no image: send a base64 'image' in JSON, or a multipart 'file'")
            probs = await batcher.submit(await server.decode([data], adapter), adapter)
            return {"adapter": adapter, "predictions": top_k(probs[0], model.classes(adapter), k)}

    async def _form(request: Request, body: bytes) -> tuple[Any, Any, bytes | None]:
        """A multipart form from the body already read (within the limit): adapter, top_k, file."""
        from starlette.requests import Request as StarletteRequest

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await StarletteRequest(request.scope, replay).form(max_files=1, max_fields=8)
        except (StarletteHTTPException, ValueError, KeyError):
            raise HTTPError(400, "malformed multipart form") from None
        upload = form.get("file")
        return form.get("adapter"), form.get("top_k"), await upload.read() if hasattr(upload, "read") else None

    # ------------------------------------------------------------------------- Open Inference Protocol

    @app.get("/v2")
    async def v2_server() -> dict[str, Any]:
        from .. import __version__

        return {"name": "peftvision", "version": __version__, "extensions": v2.EXTENSIONS}

    @app.get("/v2/health/live")
    async def v2_live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def v2_ready() -> Response:
        return Response(status_code=200 if batcher.running else 503)

    def v2_model(name: str, version: str | None, request: Request) -> str:
        name = server.adapter(name, request)
        if version not in (None, v2.VERSION):
            raise HTTPError(404, f"adapters have one version, {v2.VERSION}")
        return name

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_metadata(name: str, request: Request, version: str | None = None) -> dict[str, Any]:
        name = v2_model(name, version, request)
        return v2.model_metadata(name, model.input_size, model.num_classes(name))

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def v2_config(name: str, request: Request, version: str | None = None) -> dict[str, Any]:
        name = v2_model(name, version, request)
        return v2.model_config(name, model.input_size, model.num_classes(name), config.max_batch)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_ready(name: str, request: Request, version: str | None = None) -> Response:
        v2_model(name, version, request)
        return Response(status_code=200)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(name: str, request: Request, version: str | None = None) -> Response:
        with gate.admit():
            name = v2_model(name, version, request)
            require_media_type(request.headers, ("", "application/json", "application/octet-stream"))
            body = await read_body(request, limit, timeout)
            parsed = v2.parse_infer(body, request.headers.get(v2.HEADER_LENGTH), model.input_size, config.max_batch)
            x = parsed.pixels if parsed.pixels is not None else await server.decode(parsed.images, name)
            probs = await batcher.submit(x, name)
            content, headers = v2.infer_response(name, parsed, probs, model.classes(name))
            return Response(content, headers=headers)

    return app


def _base64_image(image: Any) -> bytes | None:
    if image is None:
        return None
    if not isinstance(image, str):
        raise HTTPError(422, "image must be a base64 string")
    try:
        return base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, "image is not valid base64 (send the bytes of a PNG/JPEG file, base64-encoded)") from None


# ----------------------------------------------------------------------------- uvicorn

BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        b"connection: close\r\ncontent-length: 63\r\n\r\n"
        b'{"detail":"the server has too many connections; retry shortly"}')

def _protocol(timeout: float, max_connections: int) -> type:
    """uvicorn's h11 HTTP protocol with two guards uvicorn lacks. A connection whose request headers have
    not all arrived `timeout` seconds after it opened or after its last answer is closed: uvicorn waits
    for headers forever, so a client that sends half a request (slowloris) would hold its slot. And a
    connection beyond `max_connections` is answered 503 with Retry-After at once (uvicorn's own
    limit_concurrency answers without it). h11, not httptools: h11 caps the header block's size."""
    from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class Deadline(Base):  # type: ignore[misc, valid-type]
        _deadline: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(BUSY)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:  # headers complete: the app reads on
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

    return Deadline


def uvicorn_config(app: Any, config: ServeConfig, log_level: str | None = None) -> Any:
    """uvicorn's settings for `config`: timeouts for clients that stall, a cap on connections."""
    import uvicorn

    return uvicorn.Config(
        app, host=config.host, port=config.port, http=_protocol(config.request_timeout, config.max_connections),
        timeout_keep_alive=config.keep_alive,
        h11_max_incomplete_event_size=64 * 1024, server_header=False,
        log_level=log_level or os.environ.get("PEFTVISION_LOG_LEVEL", "warning"),
    )


def serve(config: ServeConfig) -> None:
    """Load the adapters over their shared base and serve them until Ctrl-C."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError:
        raise PeftVisionError("serving needs FastAPI, uvicorn and prometheus-client: pip install 'peftvision[serve]'") from None
    adapters = find_adapters(config.adapters, config.adapters_dir)
    model = MultiAdapterModel.from_adapters(adapters, checkpoint=config.checkpoint, ignore_fingerprint=config.ignore_fingerprint)
    app = create_app(model, config)
    admin = "on (Bearer token)" if config.admin_token else "off (--admin-token)"
    print(f"serving {len(model.adapters)} adapters over {model.base_name} on http://{config.host}:{config.port} "
          f"(adapter management {admin}; Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn_config(app, config)).run()
