"""Export an adapted model to ONNX, for deployment without Python's ML stack (ONNX Runtime, TensorRT, ...).

Methods that merge are exported merged (a plain timm graph, no overhead); the others (adapters, VPT)
are exported as they run, their modules traced with the model. The graph takes `pixel_values`
(batch, C, H, W), preprocessed as in training, and returns `logits` (batch, classes); the batch axis
is dynamic. The file's metadata holds the class names and the preprocessing (timm's data config), so a
consumer needs nothing else. Every export is run in ONNX Runtime on two batch sizes and compared with
PyTorch before the file is put in place: a graph that computes something else is never written.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..backbones.backbone import model_spec
from ..errors import PeftVisionError
from ..files import atomic_write_group
from ..methods import get_method
from ..methods.freeze import require_state, unwrap
from .io import merge, preprocessing

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
# a protobuf file holds at most 2 GB; larger models keep their weights in `<file>.data` beside it
_SINGLE_FILE_BYTES = 1_800_000_000
# The ONNX opset written, fixed rather than torch's moving default: opset 18 runs on ONNX Runtime >= 1.14
# (2023), TensorRT 8.6+ and OpenVINO 2023+; a newer torch must not silently raise what consumers need.
OPSET = 18
_NEEDS = ("onnx", "onnxscript", "onnxruntime")


def export_onnx(model: nn.Module, path: str | os.PathLike, check: bool = True) -> Path:
    """Write `model` as an ONNX file with a dynamic batch axis: merged where its method merges, as it
    runs otherwise; checked against PyTorch in ONNX Runtime before it is put in place.

    Args:
        model: an injected model (any method).
        path: the `.onnx` file to write (its directory is created if needed).
        check: run the file in ONNX Runtime at batch sizes 2 and 3 and compare with PyTorch.
    """
    missing = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise PeftVisionError(f"ONNX export needs {', '.join(missing)}: pip install 'peftvision[onnx]'")
    path = Path(path)
    if path.is_dir():
        raise PeftVisionError(f"{path} is a directory: give a file name such as model.onnx")
    state = require_state(model)
    merges = get_method(state.method).mergeable(state.config) is None
    prep = preprocessing(model)
    net = merge(model) if merges else unwrap(model)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(n, *prep["input_size"], generator=g) for n in (2, 3)]
    with _eval(net), torch.no_grad():
        expected = [net(x) for x in inputs]
        program = _export(net, inputs[0])
    program.model.metadata_props.update(_metadata(model, prep, merges))
    large = sum(t.numel() * t.element_size() for t in net.state_dict().values()) > _SINGLE_FILE_BYTES

    def write(staged: Path) -> None:
        program.save(staged, external_data=large)
        if check:
            _check(staged, inputs, expected)

    atomic_write_group(path, write)
    return path


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode for the export (dropout off), the caller's mode restored afterwards."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _export(model: nn.Module, x: torch.Tensor) -> Any:
    import warnings

    batch = torch.export.Dim("batch")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracing warnings about Python control flow, not the user's to fix
            return torch.onnx.export(
                model, (x,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},), verbose=False,
            )
    except Exception as e:  # noqa: BLE001 -- torch.export's many error types all mean "this graph does not export"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeftVisionError(f"torch.onnx cannot export this model: {first}") from None


def _metadata(model: nn.Module, prep: dict[str, Any], merged: bool) -> dict[str, str]:
    """What a consumer needs besides the graph: class names and preprocessing (timm's data config)."""
    state = require_state(model)
    meta = {
        "preprocessing": json.dumps(prep),
        "peftvision.method": state.method,
        "peftvision.base_model": model_spec(unwrap(model)).name,
        "peftvision.merged": json.dumps(merged),
        "peftvision.opset": str(OPSET),
    }
    if state.class_names:
        meta["label_names"] = json.dumps(list(state.class_names))
    return meta


def _check(path: Path, inputs: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x, y in zip(inputs, expected):
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        tolerance = 1e-4 * max(1.0, float(y.abs().max()))
        diff = float((torch.from_numpy(got) - y).abs().max()) if got.shape == tuple(y.shape) else float("inf")
        if not diff <= tolerance:
            raise PeftVisionError(
                f"ONNX Runtime's output differs from PyTorch's at batch size {x.shape[0]} (max difference "
                f"{diff:.2e} > {tolerance:.1e}); not written"
            )
