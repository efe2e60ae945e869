"""`peftvision serve` end to end: real uvicorn servers on loopback, real HTTP requests, real attacks.

Each server is started with the same uvicorn settings `peftvision serve` uses (`uvicorn_config`), in a
thread, and a test starts talking to it only once it answers `/health`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import os
import socket
import struct
import threading
import time
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import make_model, randomize_trainable

import peftvision as pv
from peftvision.cli import main

httpx = pytest.importorskip("httpx", reason="the serve extra (httpx, FastAPI, uvicorn) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed")

from peftvision.serving.config import ServeConfig  # noqa: E402
from peftvision.serving.http import create_app, uvicorn_config  # noqa: E402
from peftvision.serving.multi import MultiAdapterModel  # noqa: E402
from peftvision.serving.repository import find_adapters  # noqa: E402

TOKEN = "s3cret-token-of-24-chars"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
pytestmark = pytest.mark.timeout(300)  # a server that hangs fails its test instead of the run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny ViT base in a checkpoint file, three adapters of different methods and heads on it in an
    adapters directory, and one adapter of other base weights outside it."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("serve")
    base = make_model("vit", num_classes=5)
    ckpt = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(ckpt))
    dirs = {}
    for i, (method, classes) in enumerate([("lora", 3), ("adapter", 4), ("vpt-deep", 3)]):
        model = copy.deepcopy(base)
        model.reset_classifier(classes)
        model = pv.inject(model, method)
        randomize_trainable(model, std=0.3, seed=i)
        dirs[method] = pv.save_adapter(model, root / "adapters" / method, class_names=[f"{method}{c}" for c in range(classes)])
    other = pv.inject(make_model("vit", num_classes=3, seed=5), "lora")  # other base weights
    dirs["other"] = pv.save_adapter(other, root / "outside" / "other")
    return root, str(ckpt), dirs


def _model(setup) -> MultiAdapterModel:
    root, ckpt, _ = setup
    return MultiAdapterModel.from_adapters(find_adapters(None, str(root / "adapters")), checkpoint=ckpt)


@contextmanager
def running(model: MultiAdapterModel, **options):
    """A real uvicorn server for `model` on a free loopback port, yielded once it answers /health."""
    config = ServeConfig(port=_free_port(), **options)
    server = uvicorn.Server(uvicorn_config(create_app(model, config), config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert thread.is_alive(), "the server thread died before answering"
        assert time.monotonic() < deadline, "the server did not answer /health within 60 s"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(setup):
    """`peftvision serve --adapters-dir ... --admin-token ...` with small limits, so attacks are cheap."""
    root, _, _ = setup
    with running(_model(setup), adapters_dir=str(root / "adapters"), admin_token=TOKEN, max_batch=16,
                 max_wait_ms=100, max_body_mb=1.0, max_pixels=1_000_000, request_timeout=2.0) as url:
        yield url


def _png(seed: int, size: int = 40) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _predict(url: str, adapter: str, image: bytes, **extra) -> httpx.Response:
    return httpx.post(f"{url}/predict", json={"adapter": adapter, "image": _b64(image), **extra}, timeout=60)


def _count(url: str) -> int:
    return httpx.get(f"{url}/health").json()["adapters"]


# ----------------------------------------------------------------------------- predictions

def test_health_and_adapter_list(server):
    assert httpx.get(f"{server}/health").json()["adapters"] == 3
    listed = {a["name"]: a for a in httpx.get(f"{server}/adapters").json()}
    assert set(listed) == {"lora", "adapter", "vpt-deep"}
    assert listed["adapter"]["num_classes"] == 4 and listed["adapter"]["classes"][0] == "adapter0"
    assert listed["lora"]["method"] == "lora" and listed["lora"]["trainable_params"] > 0
    assert listed["lora"]["adapter_bytes"] > 0


def test_predictions_equal_peftvision_predict(server, setup, tmp_path, capsys):
    root, ckpt, dirs = setup
    for seed, method in enumerate(["lora", "adapter", "vpt-deep"]):
        image = tmp_path / f"img{seed}.png"
        image.write_bytes(_png(seed))
        r = _predict(server, method, image.read_bytes(), top_k=2)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert r.json()["adapter"] == method and len(preds) == 2 and preds[0]["score"] >= preds[1]["score"]
        capsys.readouterr()
        assert main(["predict", "--adapter", str(dirs[method]), "--checkpoint", ckpt, "--top-k", "2", str(image)]) == 0
        line = capsys.readouterr().out.strip()
        expected = ", ".join(f"{p['label']} {p['score']:.3f}" for p in preds)
        assert line == f"{image}: {expected}"
        # multipart upload gives the same answer
        m = httpx.post(f"{server}/predict", data={"adapter": method, "top_k": "2"}, files={"file": ("x.png", image.read_bytes())})
        assert m.status_code == 200 and m.json()["predictions"] == preds


def test_concurrent_requests_for_different_adapters_are_batched(server):
    async def burst() -> list:
        async with httpx.AsyncClient(timeout=60) as client:
            names = ["lora", "adapter", "vpt-deep", "lora"] * 3
            return await asyncio.gather(*[
                client.post(f"{server}/predict", json={"adapter": n, "image": _b64(_png(i))}) for i, n in enumerate(names)
            ])

    before = httpx.get(f"{server}/health").json()
    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    after = httpx.get(f"{server}/health").json()
    assert after["requests"] - before["requests"] == 12
    assert after["batches"] - before["batches"] < 12 and after["largest_batch"] > 1


# ----------------------------------------------------------------------------- bad requests

@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"adapter": "nope", "image": "AAAA"}, 404, "no adapter named 'nope'"),
        ({"adapter": "x" * 5000, "image": "AAAA"}, 404, "no adapter is loaded"),  # not echoed
        ({"adapter": "lora"}, 400, "no image"),
        ({"adapter": "lora", "image": "not base64!"}, 400, "not valid base64"),
        ({"adapter": "lora", "image": _b64(b"not an image at all")}, 400, "cannot read image"),
        ({"image": "AAAA"}, 422, "name the adapter"),
        ({"adapter": "lora", "image": "AAAA", "top_k": 0}, 422, "top_k"),
        ({"adapter": "lora", "image": "AAAA", "top_k": 1001}, 422, "top_k"),
        ({"adapter": "lora", "image": "AAAA", "top_k": "9" * 5000}, 422, "top_k"),
        ({"adapter": "lora", "image": "AAAA", "top_k": "²"}, 422, "top_k"),
        ({"adapter": "lora", "image": "AAAA", "top_k": "٣"}, 422, "top_k"),  # Arabic-Indic 3: not ASCII
        ({"adapter": "lora", "image": "AAAA", "top_k": True}, 422, "top_k"),
        ({"adapter": "lora", "image": "AAAA", "top_k": 3.0}, 422, "top_k"),
        ({"adapter": "lora", "image": "AAAA", "top_k": [3]}, 422, "top_k"),
        ([1, 2], 422, "must be an object"),
    ],
)
def test_errors_are_json_short_and_the_server_survives(server, body, status, message):
    r = httpx.post(f"{server}/predict", json=body)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert len(r.text) < 300 and "9999" not in r.text and "xxxx" not in r.text  # nothing of the request echoed
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 32"),
        (b'{"adapter": "lora", "top_k": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}", "nests deeper than 32"),
        (b'{"adapter": "lora", "top_k": ' + b"9" * 5000 + b"}", "not valid JSON"),  # Python refuses > 4300 digits
    ],
)
def test_malformed_or_deep_json_is_400(server, content, message):
    r = httpx.post(f"{server}/predict", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"], r.text[:300]


@pytest.mark.parametrize("media", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_cross_site_simple_posts_are_refused(server, media):
    """What a web page can send to any origin without a preflight: refused before anything is parsed."""
    body = b'{"adapter": "lora", "image": "AAAA"}'
    headers = {"content-type": media} if media else {}
    r = httpx.post(f"{server}/predict", content=body, headers=headers)
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = httpx.post(f"{server}/adapters", content=b'{"name": "x", "path": "lora"}', headers={**headers, **AUTH})
    assert r.status_code == 415 and _count(server) == 3


def test_one_top_k_formatter_for_predict_explain_and_serve():
    from peftvision.data.labels import format_top_k, top_k
    from peftvision.explain import top_classes

    logits = torch.tensor([0.5, 2.0, -1.0, 2.0])
    probs = logits.softmax(-1)
    preds = top_k(probs, ["a", "b", "c"], 3)
    assert [p["index"] for p in preds] == [1, 3, 0] and [p["label"] for p in preds] == ["b", "3", "a"]
    assert format_top_k(preds) == f"b {float(probs[1]):.3f}, 3 {float(probs[3]):.3f}, a {float(probs[0]):.3f}"
    assert top_classes(logits, ["a", "b", "c"], 3) == format_top_k(preds)


# ----------------------------------------------------------------------------- bodies, bombs, pixels

def _raw_request(port: int, head: bytes, chunks, wait: float = 10.0) -> tuple[bytes, int, bool]:
    """Send `head` then the body `chunks` from a thread while reading the answer: (answer, body bytes
    the server took before closing, whether the sender was cut off)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    sent, cut = [0], [False]

    def sender() -> None:
        try:
            sock.sendall(head)
            for c in chunks:
                sock.sendall(c)
                sent[0] += len(c)
        except OSError:
            cut[0] = True

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    answer = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except (socket.timeout, ConnectionResetError):
        pass
    thread.join(timeout=wait)
    sock.close()
    return answer, sent[0], cut[0]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_chunked_body_over_the_limit_is_cut_off_while_streaming(server):
    """60 MB of chunked JSON against a 1 MB limit: 413 once the limit passes, the connection closed."""
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"a" * 65536
    chunks = (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(1000))  # 65 MB, never finished
    answer, sent, cut = _raw_request(_port(server), head, chunks)
    assert answer.startswith(b"HTTP/1.1 413") and b"1 MB limit" in answer
    assert cut and sent < 20_000_000  # the server stopped reading long before the end
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_content_length_over_the_limit_is_refused_before_reading(server):
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    answer, _, _ = _raw_request(_port(server), head, [])
    assert answer.startswith(b"HTTP/1.1 413")


def _png_bytes(width: int, height: int, depth: int = 8, channels: int = 1, rows=None) -> bytes:
    """A PNG written by hand (streaming zlib), so a 13000 x 13000 bomb costs no memory to make."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    color = {1: 0, 3: 2}[channels]
    z, out = zlib.compressobj(9), []
    row_bytes = width * channels * depth // 8
    for y in range(height):
        out.append(z.compress(b"\x00" + (rows(y) if rows else bytes(row_bytes))))
    out.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(out)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bombs():
    return {"8-bit 13000^2": _png_bytes(13000, 13000), "16-bit 12000^2": _png_bytes(12000, 12000, depth=16)}


def test_decompression_bombs_are_refused_from_their_header(server, bombs):
    for name, bomb in bombs.items():
        assert len(bomb) < 1_000_000, name  # small files: within the body limit, so the pixel check must act
        start = time.perf_counter()
        r = _predict(server, "lora", bomb)
        took = time.perf_counter() - start
        assert r.status_code == 413 and "over the limit of 1,000,000" in r.json()["error"], (name, r.text)
        assert took < 1.0, f"{name}: {took:.1f} s -- decoding 144-169 MP takes seconds; the header check takes ms"


def test_huge_canvases_and_risky_formats_are_refused_before_decoding(server):
    """Past PIL's own bomb cap (2 x 89 MP, raised inside open()) is still 413; a progressive JPEG is
    sized from its header, not after draft() scaled it down (libjpeg would buffer the whole canvas);
    formats that decode while opening (ICO) are not opened at all."""
    from PIL import Image

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 400 MP declared, no pixel data
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header_only = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(20001))) + chunk(b"IEND", b"")
    r = _predict(server, "lora", header_only)
    assert r.status_code == 413 and "over the limit of 1,000,000" in r.json()["error"], r.text
    buf = io.BytesIO()
    Image.new("RGB", (1100, 1000), (90, 120, 30)).save(buf, format="JPEG", progressive=True, quality=50)
    assert len(buf.getvalue()) < 1_000_000  # within the body limit: the pixel check must act
    r = _predict(server, "lora", buf.getvalue())  # draft() would scale it to 138 x 125, under the limit
    assert r.status_code == 413 and "1100x1000" in r.json()["error"], r.text
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="ICO")
    r = _predict(server, "lora", buf.getvalue())
    assert r.status_code == 400 and "not an image format" in r.json()["error"], r.text
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="WEBP")
    assert _predict(server, "lora", buf.getvalue()).status_code == 200


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_oversized_headers_are_refused(server):
    port = int(server.rsplit(":", 1)[1])
    answer = _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200_000 + b"\r\n\r\n")
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:80]
    assert httpx.get(f"{server}/health").status_code == 200  # and the server is fine


def test_connections_beyond_the_cap_get_503_with_retry_after(setup):
    with running(_model(setup), max_connections=2, request_timeout=30.0) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.3)
            answer = _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head = answer.split(b"\r\n\r\n")[0].lower()
            assert head.startswith(b"http/1.1 503") and b"retry-after: 1" in head, answer[:200]
        finally:
            for s in held:
                s.close()
        time.sleep(0.3)
        assert httpx.get(f"{url}/health").status_code == 200  # slots free again


def test_16_bit_images_read_as_their_top_byte(server):
    """A 16-bit PNG (gray and RGB) predicts as the 8-bit PNG of its top byte: converted, not saturated."""
    from PIL import Image

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 40), dtype=np.uint16)
    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint16)
    for pixels, channels in ((gray, 1), (rgb, 3)):
        deep = pixels * 256 + rng.integers(0, 256, pixels.shape, dtype=np.uint16)  # low byte: noise
        sixteen = _png_bytes(40, 40, depth=16, channels=channels, rows=lambda y: deep[y].astype(">u2").tobytes())
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
        a = _predict(server, "lora", sixteen, top_k=3)
        b = _predict(server, "lora", buf.getvalue(), top_k=3)
        assert a.status_code == 200 and a.json() == b.json(), (channels, a.text)


def test_exif_orientation_is_applied_before_predicting(server):
    """A photo stored sideways with EXIF orientation 6 predicts as the upright photo."""
    from PIL import Image

    upright = Image.open(io.BytesIO(_png(7, size=48))).crop((0, 0, 48, 30))  # not square: a turn shows
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6: turn 270 to view
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways, plain, unturned = io.BytesIO(), io.BytesIO(), io.BytesIO()
    stored.save(sideways, format="PNG", exif=exif)
    upright.save(plain, format="PNG")
    stored.save(unturned, format="PNG")
    a, b = _predict(server, "adapter", sideways.getvalue(), top_k=4), _predict(server, "adapter", plain.getvalue(), top_k=4)
    c = _predict(server, "adapter", unturned.getvalue(), top_k=4)
    assert a.status_code == 200 and a.json() == b.json()
    assert c.json() != b.json()  # the test can tell: ignoring the tag would predict differently


# ----------------------------------------------------------------------------- time

def test_a_client_that_stalls_is_cut_off_and_others_are_served(server):
    port = _port(server)
    half_headers = socket.create_connection(("127.0.0.1", port))
    half_headers.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    half_body = socket.create_connection(("127.0.0.1", port))
    half_body.sendall(head + b'{"adapter": ')
    assert _predict(server, "lora", _png(1)).status_code == 200  # served while two clients stall
    half_body.settimeout(10)
    start = time.monotonic()
    answer = half_body.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 5
    half_headers.settimeout(10)
    assert half_headers.recv(65536) == b""  # closed without an answer: the request never began
    half_headers.close()
    half_body.close()


def test_overload_gets_503_with_retry_after(setup):
    """Two requests held in a batch window fill --max-queue 2; the third is refused at once."""
    with running(_model(setup), max_queue=2, max_wait_ms=3000, max_batch=8) as url:
        async def burst() -> list:
            async with httpx.AsyncClient(timeout=60) as client:
                async def post(i: int, delay: float) -> httpx.Response:
                    await asyncio.sleep(delay)
                    return await client.post(f"{url}/predict", json={"adapter": "lora", "image": _b64(_png(i))})

                return await asyncio.gather(post(0, 0), post(1, 0), post(2, 0.8))

        start = time.monotonic()
        first, second, third = asyncio.run(burst())
        assert first.status_code == second.status_code == 200
        assert third.status_code == 503 and int(third.headers["retry-after"]) >= 1
        assert "busy" in third.json()["error"] and time.monotonic() - start < 30
        assert _predict(url, "lora", _png(3)).status_code == 200  # free again once the queue drained
        from prometheus_client.parser import text_string_to_metric_families

        samples = [s for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for s in f.samples]
        refused = [s.value for s in samples if s.name == "peftvision_requests_total" and s.labels["status"] == "503"]
        assert refused == [1.0]


# ----------------------------------------------------------------------------- management

def test_management_needs_the_token(server):
    image = _png(2)
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong-token-wrong-token"}, 403),
                            ({"Authorization": f"Basic {TOKEN}"}, 401), ({"Authorization": TOKEN}, 401)):
        r = httpx.post(f"{server}/adapters", json={"name": "x", "path": "lora"}, headers=headers)
        assert r.status_code == status, r.text
        assert httpx.delete(f"{server}/adapters/lora", headers=headers).status_code == status
    assert httpx.post(f"{server}/adapters", json={"name": "x", "path": "lora"}).headers["www-authenticate"] == "Bearer"
    assert _count(server) == 3 and _predict(server, "lora", image).status_code == 200


def test_adapters_added_and_removed_by_the_admin(server):
    r = httpx.post(f"{server}/adapters", json={"name": "lora2", "path": "lora"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["name"] == "lora2"
    again = httpx.post(f"{server}/adapters", json={"name": "lora2", "path": "lora"}, headers=AUTH)
    assert again.status_code == 409 and "already loaded" in again.json()["error"]
    assert httpx.post(f"{server}/adapters", json={"name": "x", "path": "missing"}, headers=AUTH).status_code == 404
    assert httpx.post(f"{server}/adapters", json={"name": "../x"}, headers=AUTH).status_code == 422
    assert httpx.post(f"{server}/adapters", json={"name": "base", "path": "lora"}, headers=AUTH).status_code == 422
    image = _png(1)
    assert _predict(server, "lora2", image).json()["predictions"] == _predict(server, "lora", image).json()["predictions"]
    assert httpx.delete(f"{server}/adapters/lora2", headers=AUTH).status_code == 200
    assert httpx.delete(f"{server}/adapters/lora2", headers=AUTH).status_code == 404
    assert _predict(server, "lora2", image).status_code == 404
    assert _count(server) == 3


def test_paths_outside_the_adapters_dir_are_refused_alike(server, setup):
    """`..`, absolute paths and symlinks that lead out all get the same 403, whether the target exists
    or not: the admin API is no file-system probe. Inside, the name must be an adapter folder."""
    root, _, dirs = setup
    link = root / "adapters" / "escape"
    link.symlink_to(dirs["other"], target_is_directory=True)  # inside by name, outside once resolved
    try:
        answers = set()
        for path in ("../outside/other", "../outside/missing", str(dirs["other"]), "/etc", "/nonexistent",
                     "lora/../../outside/other", "escape", ".", "..", "/"):
            r = httpx.post(f"{server}/adapters", json={"name": "evil", "path": path}, headers=AUTH)
            assert r.status_code == 403, (path, r.text)
            answers.add(r.text)
        assert len(answers) == 1 and "inside the adapters directory" in answers.pop()
        r = httpx.post(f"{server}/adapters", json={"name": "evil", "path": "hf:someone/adapter"}, headers=AUTH)
        assert r.status_code == 403 and "--allow-hub" in r.json()["error"]
        for bad in ("a\x00b", "x" * 5000, 3, None):
            r = httpx.post(f"{server}/adapters", json={"name": "evil", "path": bad}, headers=AUTH)
            assert r.status_code == 422 and len(r.text) < 300, (repr(bad)[:20], r.text)
        assert _count(server) == 3
    finally:
        link.unlink()


def test_admin_bodies_are_json_and_at_most_1_mb(server):
    big = b'{"name": "x", "path": "' + b"a" * 1_100_000 + b'"}'
    r = httpx.post(f"{server}/adapters", content=big, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413
    head = (b"POST /adapters HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
    piece = b"a" * 65536
    answer, sent, cut = _raw_request(_port(server), head, (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(500)))
    assert answer.startswith(b"HTTP/1.1 413") and cut and sent < 10_000_000
    assert _count(server) == 3


def test_management_is_off_without_a_token(setup):
    with running(_model(setup), adapters_dir=str(setup[0] / "adapters")) as url:
        for r in (httpx.post(f"{url}/adapters", json={"name": "x", "path": "lora"}, headers=AUTH),
                  httpx.delete(f"{url}/adapters/lora", headers=AUTH)):
            assert r.status_code == 403 and "adapter management is off" in r.json()["error"]
        assert _count(url) == 3


# ----------------------------------------------------------------------------- Open Inference Protocol

@pytest.fixture(scope="module")
def triton(server):
    http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (the dev extra) is not installed")
    return http, http.InferenceServerClient(server.removeprefix("http://"), network_timeout=120)


def _reference(setup, adapter: str, images: list[bytes]) -> torch.Tensor:
    """The library's answer: each image decoded as `serve` does, through a MultiAdapterModel."""
    from peftvision.data.images import decode_image, decode_size

    model = _model(setup)
    transform = model.transform(adapter)
    x = torch.stack([transform(decode_image(d, size=decode_size(transform))) for d in images])
    return model.probabilities(x, [adapter] * len(images))[:, : model.num_classes(adapter)]


def test_tritonclient_health_and_metadata(triton):
    http, client = triton
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("lora") and not client.is_model_ready("nope")
    meta = client.get_model_metadata("adapter")
    assert meta["name"] == "adapter" and meta["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"IMAGE": "BYTES", "PIXELS": "FP32"}
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"PROBABILITIES": [-1, 4], "LABEL": [-1]}
    config = client.get_model_config("adapter")
    assert config["max_batch_size"] == 16 and {o["name"]: o["dims"] for o in config["output"]}["PROBABILITIES"] == [4]
    assert {i["name"]: i["data_type"] for i in config["input"]} == {"IMAGE": "TYPE_STRING", "PIXELS": "TYPE_FP32"}


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_image_bytes_round_trip(triton, setup, binary):
    http, client = triton
    images = [_png(10), _png(11), _png(12)]
    tensor = http.InferInput("IMAGE", [3], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    else:  # JSON carries BYTES elements as base64 text
        tensor.set_data_from_numpy(np.array([_b64(i).encode() for i in images], dtype=np.object_), binary_data=False)
    outputs = [http.InferRequestedOutput("PROBABILITIES", binary_data=binary), http.InferRequestedOutput("LABEL", binary_data=binary)]
    result = client.infer("adapter", [tensor], outputs=outputs)
    probs = result.as_numpy("PROBABILITIES")
    expected = _reference(setup, "adapter", images)
    assert probs.shape == (3, 4) and np.allclose(probs, expected.numpy(), atol=1e-5)
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("LABEL")]
    assert labels == [f"adapter{int(i)}" for i in expected.argmax(-1)]
    top = client.infer("adapter", [tensor], outputs=[http.InferRequestedOutput("PROBABILITIES", class_count=2)])
    rows = top.as_numpy("PROBABILITIES")  # Triton's classification: "score:index:label", best first
    for row, p in zip(rows, expected):
        want = p.topk(2)
        assert [r.decode().split(":", 2)[1:] for r in row] == [[str(int(i)), f"adapter{int(i)}"] for i in want.indices]
        assert np.allclose([float(r.decode().split(":")[0]) for r in row], want.values.numpy(), atol=1e-5)


def test_tritonclient_preprocessed_tensor_equals_predict(triton, setup, tmp_path, capsys):
    from PIL import Image

    http, client = triton
    root, ckpt, dirs = setup
    png = _png(20)
    x = _model(setup).transform("vpt-deep")(Image.open(io.BytesIO(png)).convert("RGB")).unsqueeze(0).numpy()
    for binary in (True, False):
        tensor = http.InferInput("PIXELS", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        probs = client.infer("vpt-deep", [tensor]).as_numpy("PROBABILITIES")[0]
        assert np.allclose(probs, _reference(setup, "vpt-deep", [png])[0].numpy(), atol=1e-5)
    (tmp_path / "x.png").write_bytes(png)
    capsys.readouterr()
    assert main(["predict", "--adapter", str(dirs["vpt-deep"]), "--checkpoint", ckpt, "--top-k", "3", str(tmp_path / "x.png")]) == 0
    line = capsys.readouterr().out.strip()
    names = [f"vpt-deep{int(i)}" for i in np.argsort(-probs)]
    assert line == f"{tmp_path / 'x.png'}: " + ", ".join(f"{n} {p:.3f}" for n, p in zip(names, np.sort(probs)[::-1]))


def test_tritonclient_errors(triton):
    from tritonclient.utils import InferenceServerException

    http, client = triton
    tensor = http.InferInput("IMAGE", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="cannot read image") as e:
        client.infer("lora", [tensor])
    assert e.value.status() == "400"
    with pytest.raises(InferenceServerException, match="no adapter named 'nope'"):
        client.infer("nope", [tensor])
    wrong = http.InferInput("PIXELS", [1, 3, 8, 8], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 8, 8), dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"PIXELS is FP32 of shape \[B, 3, 64, 64\]"):
        client.infer("lora", [wrong])
    many = http.InferInput("IMAGE", [17], "BYTES")
    many.set_data_from_numpy(np.array([_png(0)] * 17, dtype=np.object_))
    with pytest.raises(InferenceServerException, match="1 to 16 images per request"):
        client.infer("lora", [many])


@pytest.mark.parametrize(
    "body, status",
    [
        (b'{"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 64, 64], "data": [1.0]}]}', 400),
        (b'{"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 64, 64], "data": '
         + b"[" + b",".join([b"NaN"] * (3 * 64 * 64)) + b"]}]}", 422),
        (b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1], "data": []}]}', 400),
        (b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [99999999999], "data": []}]}', 400),
        (b'{"inputs": []}', 422),
        (b'{"inputs": "x"}', 400),
        (b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}], "outputs": [{"name": "X"}]}', 422),
        (b'{"inputs": [' * 40 + b"]" * 40 + b"}", 400),
        (b'{"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 64, 64], "data": [1'
         + b"0" * 400 + b",1" * (3 * 64 * 64 - 1) + b"]}]}", 422),  # an integer past any float: not a 500
    ],
)
def test_v2_malformed_requests(server, body, status):
    r = httpx.post(f"{server}/v2/models/lora/infer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and "error" in r.json() and len(r.text) < 300, r.text[:300]


def test_v2_binary_data_that_does_not_add_up(server):
    header = b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 8}}]}'
    blob = struct.pack("<I", 100) + b"abcd"  # says 100 bytes, holds 4
    r = httpx.post(f"{server}/v2/models/lora/infer", content=header + blob,
                   headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "ends before" in r.json()["error"]
    r = httpx.post(f"{server}/v2/models/lora/infer", content=header + blob, headers={"Inference-Header-Content-Length": "٣".encode()})
    assert r.status_code == 400


# ----------------------------------------------------------------------------- metrics

def test_metrics_parse_as_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families

    assert _predict(server, "lora", _png(5)).status_code == 200
    assert _predict(server, "nope-" + "z" * 40, _png(5)).status_code == 404
    r = httpx.get(f"{server}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    requests = [s for s in families["peftvision_requests"].samples if s.name == "peftvision_requests_total"]
    ok = [s for s in requests if s.labels == {"endpoint": "predict", "adapter": "lora", "status": "200"}]
    assert ok and ok[0].value >= 1
    assert not any("nope" in s.labels["adapter"] for s in requests)  # a client's words never become a label
    assert any(s.labels["status"] == "404" and s.labels["adapter"] == "" for s in requests)
    batch = {s.name: s.value for s in families["peftvision_batch_size"].samples if not s.labels.get("le")}
    assert batch["peftvision_batch_size_count"] >= 1 and batch["peftvision_batch_size_sum"] >= batch["peftvision_batch_size_count"]
    latency = [s for s in families["peftvision_request_seconds"].samples
               if s.name.endswith("_count") and s.labels["endpoint"] == "predict"]
    assert latency and latency[0].value >= 1
    assert families["peftvision_queue_depth"].samples[0].value == 0
    assert families["peftvision_adapters_loaded"].samples[0].value == 3


# ----------------------------------------------------------------------------- the command

def test_serve_flags_come_from_serve_config():
    import dataclasses

    from peftvision.cli import build_parser

    args = build_parser().parse_args(["serve"])
    fields = [f.name for f in dataclasses.fields(ServeConfig)]
    assert sorted(args.config_fields) == sorted(fields)
    assert all(getattr(args, name) is None for name in fields)  # defaults live in ServeConfig only
    assert ServeConfig.from_flags({name: getattr(args, name) for name in fields}, environ={}) == ServeConfig()
    args = build_parser().parse_args(["serve", "--max-queue", "7", "--allow-hub", "--adapter", "a=x", "--adapter", "b=y"])
    config = ServeConfig.from_flags({name: getattr(args, name) for name in fields}, environ={"PEFTVISION_ADMIN_TOKEN": TOKEN})
    assert (config.max_queue, config.allow_hub, config.adapters, config.admin_token) == (7, True, ("a=x", "b=y"), TOKEN)


def test_serve_command_errors_are_one_line(setup, capsys):
    root, ckpt, dirs = setup
    assert main(["serve", "--checkpoint", ckpt]) == 2
    assert "nothing to serve" in capsys.readouterr().err
    assert main(["serve", "--adapter", "nodir", "--checkpoint", ckpt]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["serve", "--adapter", f"a={dirs['lora']}", "--admin-token", "short"]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    code = main(["serve", "--adapter", f"a={dirs['lora']}", "--adapter", f"b={dirs['other']}", "--checkpoint", ckpt])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "other weights" in err and len(err.splitlines()) == 1


def test_the_serve_command_answers_over_http(setup):
    """`peftvision serve` itself, as users start it: a process that loads, listens and predicts; adapter
    management is off until PEFTVISION_ADMIN_TOKEN turns it on."""
    import subprocess
    import sys

    root, ckpt, dirs = setup
    for token in (None, TOKEN):
        port = _free_port()
        cmd = [sys.executable, "-m", "peftvision.cli", "serve", "--adapters-dir", str(root / "adapters"),
               "--adapter", f"extra={dirs['lora']}", "--checkpoint", ckpt, "--port", str(port)]
        env = {k: v for k, v in os.environ.items() if k != "PEFTVISION_ADMIN_TOKEN"}
        if token:
            env["PEFTVISION_ADMIN_TOKEN"] = token
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "peftvision serve did not answer within 120 s"
                try:
                    health = httpx.get(f"{url}/health", timeout=1).json()
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            assert health["adapters"] == 4
            r = _predict(url, "extra", _png(3))
            assert r.status_code == 200 and r.json()["predictions"][0]["label"].startswith("lora")
            deleted = httpx.delete(f"{url}/adapters/extra", headers=AUTH)
            assert deleted.status_code == (200 if token else 403)
            assert _count(url) == (3 if token else 4)
        finally:
            proc.terminate()
            out = proc.communicate(timeout=30)[0]
        management = "on" if token else "off"
        assert f"serving 4 adapters over test_vit on {url} (adapter management {management}" in out
