"""`peftvision serve` end to end: a real uvicorn server on loopback, real HTTP requests."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import socket
import threading
import time

import pytest
import torch
from conftest import make_model, randomize_trainable

import peftvision as pv
from peftvision.cli import main

httpx = pytest.importorskip("httpx", reason="the serve extra (httpx, FastAPI, uvicorn) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny ViT base in a checkpoint file, three adapters of different methods and heads on it."""
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
    dirs["other"] = pv.save_adapter(other, root / "other")
    return root, str(ckpt), dirs


@pytest.fixture(scope="module")
def server(setup):
    """The app of `peftvision serve --adapters-dir ... --checkpoint ...` on a free loopback port."""
    from peftvision.serving.http import create_app, find_adapters
    from peftvision.serving.multi import MultiAdapterModel

    root, ckpt, _ = setup
    model = MultiAdapterModel.from_adapters(find_adapters(None, str(root / "adapters")), checkpoint=ckpt)
    app = create_app(model, max_batch=16, max_wait_ms=100, max_image_mb=0.05)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{url}/health", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


def _png(seed: int, size: int = 40) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


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
        r = httpx.post(f"{server}/predict", json={"adapter": method, "image": _b64(image.read_bytes()), "top_k": 2})
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
        async with httpx.AsyncClient() as client:
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


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"adapter": "nope", "image": "AAAA"}, 404, "no adapter named 'nope'"),
        ({"adapter": "lora"}, 400, "no image"),
        ({"adapter": "lora", "image": "not base64!"}, 400, "not valid base64"),
        ({"adapter": "lora", "image": _b64(b"not an image at all")}, 400, "cannot read image"),
        ({"adapter": "lora", "image": _b64(_png(0, size=200))}, 413, "over the 0.05 MB limit"),
        ({"image": "AAAA"}, 422, "name the adapter"),
        ({"adapter": "lora", "image": "AAAA", "top_k": 0}, 422, "top_k"),
        ([1, 2], 422, "must be an object"),
    ],
)
def test_errors_are_json_and_the_server_survives(server, body, status, message):
    r = httpx.post(f"{server}/predict", json=body)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_malformed_json_is_422(server):
    r = httpx.post(f"{server}/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "malformed JSON" in r.json()["error"]


def test_adapters_added_and_removed_over_http(server, setup):
    root, _, dirs = setup
    r = httpx.post(f"{server}/adapters", json={"name": "lora2", "path": str(dirs["lora"])})
    assert r.status_code == 200 and r.json()["name"] == "lora2"
    again = httpx.post(f"{server}/adapters", json={"name": "lora2", "path": str(dirs["lora"])})
    assert again.status_code == 409 and "already loaded" in again.json()["error"]
    wrong = httpx.post(f"{server}/adapters", json={"name": "other", "path": str(dirs["other"])})
    assert wrong.status_code == 409 and "other weights of test_vit" in wrong.json()["error"]
    missing = httpx.post(f"{server}/adapters", json={"name": "x", "path": str(root / "missing")})
    assert missing.status_code == 400 and "not found" in missing.json()["error"]
    assert httpx.post(f"{server}/adapters", json={"name": "x"}).status_code == 422
    image = _b64(_png(1))
    a = httpx.post(f"{server}/predict", json={"adapter": "lora2", "image": image}).json()
    b = httpx.post(f"{server}/predict", json={"adapter": "lora", "image": image}).json()
    assert a["predictions"] == b["predictions"]
    assert httpx.delete(f"{server}/adapters/lora2").status_code == 200
    assert httpx.delete(f"{server}/adapters/lora2").status_code == 404
    assert httpx.post(f"{server}/predict", json={"adapter": "lora2", "image": image}).status_code == 404
    assert httpx.get(f"{server}/health").json()["adapters"] == 3


def test_serve_command_errors_are_one_line(setup, capsys):
    root, ckpt, dirs = setup
    assert main(["serve", "--checkpoint", ckpt]) == 2
    assert "nothing to serve" in capsys.readouterr().err
    assert main(["serve", "--adapter", "nodir", "--checkpoint", ckpt]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    code = main(["serve", "--adapter", f"a={dirs['lora']}", "--adapter", f"b={dirs['other']}", "--checkpoint", ckpt])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "other weights" in err and len(err.splitlines()) == 1


def test_the_serve_command_answers_over_http(setup, tmp_path):
    """`peftvision serve` itself, as users start it: a process that loads, listens and predicts."""
    import subprocess
    import sys

    root, ckpt, dirs = setup
    port = _free_port()
    cmd = [sys.executable, "-m", "peftvision.cli", "serve", "--adapters-dir", str(root / "adapters"),
           "--adapter", f"extra={dirs['lora']}", "--checkpoint", ckpt, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            assert proc.poll() is None, proc.stdout.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert health["adapters"] == 4
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"adapter": "extra", "image": _b64(_png(3))})
        assert r.status_code == 200 and r.json()["predictions"][0]["label"].startswith("lora")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "serving 4 adapters over test_vit on http://127.0.0.1" in out
