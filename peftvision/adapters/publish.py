"""Push an adapter to the Hugging Face Hub in the format its users load: peftvision's own, HF PEFT's,
or a merged timm model.

`peftvision` uploads the adapter directory itself (`hub.push`); `peft` and `timm` export the adapter
into a temporary folder (`export_peft`, `export_timm`, each with its card) and upload that, so that
`peft.PeftModel.from_pretrained(timm_model, "USER/NAME")` or `timm.create_model("hf-hub:USER/NAME",
pretrained=True)` work straight from the hub. The exports need the base weights, as `export` does.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..backbones.backbone import model_spec
from ..errors import ConfigError
from ..methods.freeze import require_state
from . import hub
from .card import read_metrics, set_card_repo
from .io import load_adapter
from .peft import export_peft
from .timm import export_timm

# what each format uploads and how it is made from a loaded adapter (None: the directory as it is)
EXPORTERS: dict[str, Callable[[nn.Module, Path, dict[str, Any] | None], Path] | None] = {
    "peftvision": None,
    "peft": export_peft,
    "timm": export_timm,
}
FORMATS = tuple(EXPORTERS)


def push(
    directory: str | os.PathLike,
    repo: str,
    format: str = "peftvision",
    checkpoint: str | None = None,
    ignore_fingerprint: bool = False,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: Any = None,
) -> str:
    """Upload an adapter, in `format`, with its model card to the hub model repo `repo`; returns its URL.

    Args:
        directory: an adapter directory (`save_adapter` / `finetune`); for peft and timm also `hf:USER/NAME`.
        repo: USER/NAME (or ORG/NAME) on the hub, created if needed.
        format: peftvision (the adapter directory), peft (HF PEFT's adapter format) or timm (merged
            into a plain timm model; methods that merge).
        checkpoint: peft / timm: a local weights file for the base (default: timm downloads it).
        ignore_fingerprint: peft / timm: accept base weights other than the adapter's.
        private, revision, commit_message, token, api: as for `hub.push`.
    """
    if format not in EXPORTERS:
        raise ConfigError(f"unknown push format {format!r}; choose one of: {', '.join(FORMATS)}")
    exporter = EXPORTERS[format]
    if exporter is None:
        return hub.push(directory, repo, private=private, revision=revision, commit_message=commit_message,
                        token=token, api=api)
    hub.check_repo_name(repo)
    api = hub.connect(token, api)  # offline or logged out: say so before the export's work
    model = load_adapter(directory, checkpoint=checkpoint, ignore_fingerprint=ignore_fingerprint)
    metrics = None if hub.is_hub_source(directory) else read_metrics(directory)
    method, base = require_state(model).method, model_spec(model).name
    message = commit_message or f"Upload {method} adapter for {base} ({format} format)"
    with tempfile.TemporaryDirectory(prefix="peftvision-push-") as tmp:
        out = exporter(model, Path(tmp), metrics)
        set_card_repo(out, repo)
        return hub.upload(api, out, repo, message, private=private, revision=revision)
