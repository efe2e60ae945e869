"""The Open Inference Protocol (KServe / Triton "v2" HTTP API), with Triton's binary-data and
classification extensions, so that the stock `tritonclient.http` client works unchanged.

Every adapter is a model (and "base", the backbone's own head, when it has one), with one version, "1".

- inputs: exactly one of `IMAGE` (BYTES, shape [B] or [B, 1]: encoded image files, each preprocessed as
  its adapter was trained; in JSON, base64 strings) or `PIXELS` (FP32, [B, C, H, W], already
  preprocessed);
- outputs: `PROBABILITIES` (FP32, [B, classes]) -- or, with the `classification` parameter k, BYTES
  [B, k] of "score:index:label", best first -- and `LABEL` (BYTES, [B]: the top class's name).

Binary data (the `binary_data_size` input parameter, `binary_data` / `binary_data_output` for outputs)
follows the JSON header, whose length the `Inference-Header-Content-Length` header gives.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .limits import HTTPError, parse_json

IMAGE, PIXELS = "IMAGE", "PIXELS"
PROBABILITIES, LABEL = "PROBABILITIES", "LABEL"
HEADER_LENGTH = "Inference-Header-Content-Length"
VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]


def model_metadata(name: str, input_size: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """GET /v2/models/{name}: the inputs and outputs with their datatypes and shapes (-1: any batch)."""
    return {
        "name": name, "versions": [VERSION], "platform": "peftvision",
        "inputs": [{"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
                   {"name": PIXELS, "datatype": "FP32", "shape": [-1, *input_size]}],
        "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, num_classes]},
                    {"name": LABEL, "datatype": "BYTES", "shape": [-1]}],
    }


def model_config(name: str, input_size: tuple[int, ...], num_classes: int, max_batch: int) -> dict[str, Any]:
    """GET /v2/models/{name}/config: Triton's model configuration (its JSON form), what
    tritonclient's get_model_config reads: batched, so dims leave the batch out."""
    scalar = {"dims": [1], "reshape": {"shape": []}}
    return {
        "name": name, "platform": "peftvision", "backend": "peftvision", "max_batch_size": max_batch,
        "input": [{"name": IMAGE, "data_type": "TYPE_STRING", "format": "FORMAT_NONE", **scalar},
                  {"name": PIXELS, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": list(input_size)}],
        "output": [{"name": PROBABILITIES, "data_type": "TYPE_FP32", "dims": [num_classes]},
                   {"name": LABEL, "data_type": "TYPE_STRING", **scalar}],
        "version_policy": {"latest": {"num_versions": 1}},
    }


@dataclass
class Output:
    name: str
    binary: bool
    classification: int = 0  # k > 0: the top k as "score:index:label" instead of every probability


@dataclass
class InferRequest:
    """A parsed infer request: encoded images or a preprocessed tensor, and what to answer."""

    id: str | None
    images: list[bytes] | None = None
    pixels: torch.Tensor | None = None  # (B, C, H, W)
    outputs: list[Output] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return len(self.images) if self.images is not None else int(self.pixels.shape[0])


# ----------------------------------------------------------------------------- requests

def _bad(message: str) -> HTTPError:
    return HTTPError(400, message)


def _shape(tensor: dict[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 2**31 for d in shape):
        raise _bad("an input's shape must be a list of 1 to 8 non-negative integers")
    return shape


def _flat(data: Any, depth: int = 0) -> list[Any]:
    """The v2 JSON `data` of a tensor, flattened (it may be nested like the shape, or flat)."""
    if not isinstance(data, list):
        raise _bad("an input's data must be a list")
    if depth < 8 and any(isinstance(v, list) for v in data):
        return [x for v in data for x in (_flat(v, depth + 1) if isinstance(v, list) else [v])]
    return data


def _bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """Triton's serialized BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise _bad("the IMAGE binary data ends before its elements do")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise _bad("the IMAGE binary data ends before its elements do")
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if pos != len(raw):
        raise _bad("the IMAGE binary data holds more than its shape says")
    return out


def parse_infer(body: bytes, header_length: str | None, input_size: tuple[int, ...], max_batch: int) -> InferRequest:
    """An infer request from its body (JSON, then any binary data); 400 / 422 for anything malformed."""
    binary = b""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise _bad(f"bad {HEADER_LENGTH}")
        body, binary = body[: int(header_length)], body[int(header_length):]
    request = parse_json(body, "the inference request")
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise _bad('an inference request is a JSON object with "inputs": [...]')
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("the request's parameters must be an object")
    request_id = request.get("id")
    if request_id is not None and not (isinstance(request_id, str) and len(request_id) <= 256):
        raise _bad("the request id must be a string of at most 256 characters")
    inputs = request["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict) or inputs[0].get("name") not in (IMAGE, PIXELS):
        raise HTTPError(422, f"send exactly one input: {IMAGE} (BYTES: encoded images) or {PIXELS} (FP32: preprocessed)")
    tensor = inputs[0]
    shape = _shape(tensor)
    count = math.prod(shape)
    tensor_parameters = tensor.get("parameters") or {}
    if not isinstance(tensor_parameters, dict):
        raise _bad("an input's parameters must be an object")
    size = tensor_parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise _bad("the input's binary_data_size does not match the binary data sent")
    elif binary:
        raise _bad("binary data was sent but the input does not say its binary_data_size")
    parsed = InferRequest(id=request_id)
    if tensor["name"] == IMAGE:
        if tensor.get("datatype") != "BYTES" or len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise HTTPError(422, f"{IMAGE} is BYTES of shape [B] or [B, 1]")
        parsed.images = _bytes_elements(binary, count) if size is not None else _base64_elements(tensor, count)
    else:
        if tensor.get("datatype") != "FP32" or tuple(shape[1:]) != tuple(input_size):
            raise HTTPError(422, f"{PIXELS} is FP32 of shape [B, {', '.join(map(str, input_size))}]")
        parsed.pixels = _pixels(binary if size is not None else tensor.get("data"), shape)
    if not 1 <= parsed.batch <= max_batch:
        raise HTTPError(422, f"send 1 to {max_batch} images per request (--max-batch)")
    parsed.outputs = _outputs(request.get("outputs"), bool(parameters.get("binary_data_output", False)))
    return parsed


def _base64_elements(tensor: dict[str, Any], count: int) -> list[bytes]:
    import base64
    import binascii

    data = _flat(tensor.get("data"))
    if len(data) != count or not all(isinstance(v, str) for v in data):
        raise _bad(f"{IMAGE} data in JSON must be {count} base64 strings (or send binary data)")
    try:
        return [base64.b64decode(v, validate=True) for v in data]
    except (binascii.Error, ValueError):
        raise _bad(f"{IMAGE} data in JSON must be base64 strings") from None


def _pixels(data: bytes | Any, shape: list[int]) -> torch.Tensor:
    if isinstance(data, bytes):
        if len(data) != math.prod(shape) * 4:
            raise _bad(f"{PIXELS} binary data must hold {math.prod(shape) * 4} bytes for its shape")
        array = np.frombuffer(data, dtype="<f4").astype(np.float32)  # a copy: the body's bytes are read-only
    else:
        values = _flat(data)
        if len(values) != math.prod(shape) or not all(type(v) in (int, float) for v in values):
            raise _bad(f"{PIXELS} data must be {math.prod(shape)} numbers for its shape")
        try:
            array = np.asarray(values, dtype=np.float32)
        except (OverflowError, ValueError):  # an integer beyond any float: refused, not a 500
            raise HTTPError(422, f"{PIXELS} must be finite numbers") from None
    if not np.isfinite(array).all():
        raise HTTPError(422, f"{PIXELS} must be finite numbers")
    return torch.from_numpy(array.reshape(shape))


def _outputs(requested: Any, binary_default: bool) -> list[Output]:
    if requested is None:
        return [Output(PROBABILITIES, binary_default), Output(LABEL, binary_default)]
    if not isinstance(requested, list) or not 1 <= len(requested) <= 2:
        raise _bad("outputs must be a list of one or two outputs")
    out = []
    for o in requested:
        if not isinstance(o, dict) or o.get("name") not in (PROBABILITIES, LABEL):
            raise HTTPError(422, f"the outputs are {PROBABILITIES} and {LABEL}")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise _bad("an output's parameters must be an object")
        k = p.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 1000:
            raise HTTPError(422, "classification must be a whole number from 0 to 1000")
        if k and o["name"] != PROBABILITIES:
            raise HTTPError(422, f"classification applies to {PROBABILITIES}")
        out.append(Output(o["name"], bool(p.get("binary_data", binary_default)), k))
    return out


# ----------------------------------------------------------------------------- responses

def _serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def infer_response(model_name: str, request: InferRequest, probs: torch.Tensor,
                   classes: list[str]) -> tuple[bytes, dict[str, str]]:
    """The body and headers answering `request` with `probs` (B, classes)."""
    from ..data.labels import top_k

    b, c = probs.shape
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in request.outputs:
        if out.name == PROBABILITIES and not out.classification:
            array = probs.numpy().astype("<f4", copy=False)
            entry, raw, values = {"datatype": "FP32", "shape": [b, c]}, array.tobytes, array.ravel().tolist
        else:
            if out.name == LABEL:
                strings = [top_k(row, classes, 1)[0]["label"] for row in probs]
                shape = [b]
            else:
                k = min(out.classification, c)
                strings = [f"{p['score']:f}:{p['index']}:{p['label']}" for row in probs for p in top_k(row, classes, k)]
                shape = [b, k]
            entry = {"datatype": "BYTES", "shape": shape}
            raw, values = (lambda s=strings: _serialize_bytes([x.encode() for x in s])), (lambda s=strings: s)
        entry = {"name": out.name, **entry}
        if out.binary:
            blob = raw()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = values()
        tensors.append(entry)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": VERSION, "outputs": tensors}
    if request.id is not None:
        answer["id"] = request.id
    header = json.dumps(answer).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
