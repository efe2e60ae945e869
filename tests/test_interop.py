"""Exports for other libraries, each loaded by that library's own API in a process without peftvision.

timm folders and HF PEFT adapters are "pushed" to a fake hub that lays every upload out as
huggingface_hub's cache (refs/ + snapshots/), and consumers load them from there with HF_HUB_OFFLINE=1,
as they would after a download; ONNX files run in ONNX Runtime. In every consumer process, importing
peftvision fails (checked), and the outputs must equal the adapted model's:

- timm (merged weights, same PyTorch): max abs difference 1e-5 (merging folds the update into the
  weights, measured ~1e-6 here);
- HF PEFT (same factors, peft's forward): 1e-5;
- ONNX Runtime against PyTorch: 1e-5 abs + 1e-5 relative on the tiny models (measured <= 6e-7),
  1e-4 on the real ViT-Tiny.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import BACKBONES, FAMILIES, make_input, make_model, randomize_trainable
from PIL import Image

import peftvision as pv
from peftvision.cli import main
from peftvision.data import make_transform
from peftvision.adapters.onnx import OPSET
from peftvision.errors import PeftVisionError
from peftvision.methods.freeze import unwrap
from peftvision.methods import build_config, get_method

METHODS = pv.list_methods()
MERGEABLE = [m for m in METHODS if get_method(m).mergeable(build_config(m)) is None]
UNMERGEABLE = [m for m in METHODS if m not in MERGEABLE]
EXPORTABLE = [m for m in METHODS if get_method(m).exportable(build_config(m)) is None]
# methods every format takes (they merge and have an HF PEFT equivalent); ANY for the tests of one method
EVERY_FORMAT = [m for m in EXPORTABLE if m in MERGEABLE]
ANY = EVERY_FORMAT[0]
CLASSES = ["ant", "bee", "cat", "dog", "eel"]
SHARED_BACKBONE = Path(__file__).resolve().parents[2] / "shared" / "backbones" / "vit_tiny_patch16_224.in1k_tin200.safetensors"

# The first lines of every consumer: from here on `import peftvision` (or any submodule) fails, so
# nothing the consumer's library does can lean on it; the last lines check none was loaded.
_NO_PEFTVISION = """
import sys
sys.modules["peftvision"] = None
try:
    import peftvision
except ImportError:
    pass
else:
    raise SystemExit("peftvision is importable in the consumer process")
"""
_CHECK_CLEAN = """
loaded = [name for name, module in sys.modules.items() if name.startswith("peftvision") and module is not None]
assert not loaded, loaded
print("CONSUMER OK")
"""


def consume(code: str, cwd: Path, hub: FakeHub | None = None) -> None:
    """Run consumer `code` in a fresh, isolated interpreter (-I: no PYTHONPATH, no script directory),
    offline, on the fake hub's cache; it reads and writes files in `cwd`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if hub is not None:
        env["HF_HUB_CACHE"] = str(hub.cache)
    done = subprocess.run([sys.executable, "-I", "-c", _NO_PEFTVISION + code + _CHECK_CLEAN], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "CONSUMER OK" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


class FakeHub:
    """Stands in for `HfApi` and the Hub behind it: each `upload_folder` becomes a commit laid out as
    huggingface_hub's cache (refs/<branch> -> commit, snapshots/<commit>/<files>, the branch's earlier
    files carried over), so what was pushed loads offline exactly as after a download."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.uploads: list[dict] = []

    def __call__(self, token=None) -> FakeHub:  # monkeypatched in as the HfApi class
        return self

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, branch, exist_ok=False, repo_type=None) -> None:
        pass

    def upload_folder(self, repo_id, folder_path, repo_type="model", revision=None, commit_message=None,
                      allow_patterns=None):
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(folder_path)
        files = sorted(filter_repo_objects([str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()],
                                           allow_patterns=allow_patterns))
        self.uploads.append(dict(repo_id=repo_id, files=files, revision=revision, commit_message=commit_message))
        root = self.cache / f"models--{repo_id.replace('/', '--')}"
        ref = root / "refs" / (revision or "main")
        commit = hashlib.sha1(f"{repo_id}{len(self.uploads)}".encode()).hexdigest()
        snapshot = root / "snapshots" / commit
        snapshot.mkdir(parents=True)
        if ref.is_file():
            shutil.copytree(root / "snapshots" / ref.read_text(), snapshot, dirs_exist_ok=True)
        for name in files:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / name, snapshot / name)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)


@pytest.fixture
def hub(tmp_path) -> FakeHub:
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    return FakeHub(cache)


@pytest.fixture
def online(monkeypatch):
    """`push` refuses to run offline (conftest sets HF_HUB_OFFLINE=1); the fake hub needs no network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def adapted(family: str, method: str, checkpoint: str, resize: str | None = None, **options):
    """A model built from a local checkpoint, injected, trainable tensors moved off init, named classes."""
    name, kwargs, _ = BACKBONES[family]
    model = pv.create_model(name, checkpoint=checkpoint, num_classes=len(CLASSES), **kwargs)
    pv.inject(model, method, **options)
    randomize_trainable(model)
    state = pv.get_state(model)
    state.class_names, state.resize = list(CLASSES), resize
    return model.eval()


def work(tmp_path: Path) -> Path:
    """The consumer's working directory: its inputs and outputs, apart from the exports."""
    path = tmp_path / "consumer"
    path.mkdir(exist_ok=True)
    return path


def save_inputs(work: Path, x: torch.Tensor) -> Image.Image:
    """The input batch for the consumer, and a non-square photo to check its preprocessing on."""
    from safetensors.torch import save_file

    save_file({"x": x.contiguous()}, str(work / "x.safetensors"))
    np.save(work / "x.npy", x.numpy())
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8))
    photo.save(work / "photo.png")
    return photo


def read_outputs(work: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(work / "out.safetensors"))


def front_matter(path: Path) -> dict:
    return yaml.safe_load(path.read_text().split("---\n")[1])


# ----------------------------------------------------------------------------- timm

_TIMM_CONSUMER = """
import json, traceback, timm, torch
torch.set_num_threads(1)
from PIL import Image
from safetensors.torch import load_file, save_file
for i, repo in enumerate({repos!r}):
    try:
        model = timm.create_model("hf-hub:" + repo, pretrained=True).eval()
        config = timm.data.resolve_data_config({{}}, model=model)
        transform = timm.data.create_transform(**config)
        with torch.no_grad():
            y = model(load_file("x.safetensors")["x"])
        save_file({{"y": y, "photo": transform(Image.open("photo.png").convert("RGB"))}}, f"out-{{i}}.safetensors")
        info = dict(labels=list(model.pretrained_cfg.get("label_names") or []), num_classes=model.num_classes,
                    config={{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}})
    except Exception:
        info = dict(error=traceback.format_exc())
    json.dump(info, open(f"info-{{i}}.json", "w"))
"""


def run_timm_consumer(work: Path, hub: FakeHub, repos: list[str], x: torch.Tensor) -> Image.Image:
    """One plain-timm process loads every repo from the hub cache (a process start costs more than an
    export): per repo i, its outputs on `x` and on a photo in `out-i.safetensors`, what it read in `info-i.json`."""
    photo = save_inputs(work, x)
    consume(_TIMM_CONSUMER.format(repos=repos), work, hub)
    return photo


def check_timm_outputs(model, work: Path, i: int, x: torch.Tensor, photo: Image.Image) -> None:
    """Repo i computed what `model` computes and preprocessed the photo exactly as peftvision's eval
    transform of the adapter does."""
    from safetensors.torch import load_file

    info = json.loads((work / f"info-{i}.json").read_text())
    assert "error" not in info, info.get("error")
    out = load_file(str(work / f"out-{i}.safetensors"))
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(out["y"], expected, rtol=0, atol=1e-5)
    state = pv.get_state(model)
    ours = make_transform(model, train=False, resize=state.resize or "crop")(photo)
    torch.testing.assert_close(out["photo"], ours, rtol=0, atol=0)
    assert info["labels"] == state.class_names and info["num_classes"] == len(state.class_names)
    if state.resize == "squash":
        assert info["config"]["crop_mode"] == "squash" and info["config"]["crop_pct"] == 1.0


def check_timm_consumer(model, work: Path, hub: FakeHub, repo: str, x: torch.Tensor) -> None:
    photo = run_timm_consumer(work, hub, [repo], x)
    check_timm_outputs(model, work, 0, x, photo)


def _head_only(model, family: str, checkpoint: str) -> torch.nn.Module:
    """The base with the adapter's head and nothing else: what an export that lost the method computes."""
    name, kwargs, _ = BACKBONES[family]
    base = pv.create_model(name, checkpoint=checkpoint, num_classes=len(CLASSES), **kwargs).eval()
    head = pv.get_state(model).head_names
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for n, p in base.named_parameters():
            if any(n.startswith(h + ".") for h in head):
                p.copy_(params[n])
    return base


@pytest.fixture(scope="module")
def timm_exports(tmp_path_factory) -> dict[str, dict]:
    """Every mergeable method on each family, exported (or the error it raised) and pushed to one fake
    hub, then loaded by one plain-timm consumer per family; the tests below check each method's share."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("timm-exports")
    hub = FakeHub(root / "cache")
    results: dict[str, dict] = {}
    for family in FAMILIES:
        ckpt = str(root / f"{family}.safetensors")
        save_file({k: v.contiguous() for k, v in make_model(family).state_dict().items()}, ckpt)
        x = make_input(family, batch=3)
        cases, repos = {}, []
        for method in MERGEABLE:
            model = adapted(family, method, ckpt, resize="squash" if family == "swin" else None)
            try:
                out = pv.export_timm(model, root / family / method)
            except Exception as e:  # noqa: BLE001 -- reported by that method's own test
                cases[method] = dict(error=e)
                continue
            hub.upload_folder(f"user/{family}-{method}", out)
            cases[method] = dict(model=model, out=out, index=len(repos))
            repos.append(f"user/{family}-{method}")
        work = root / family / "consumer"
        work.mkdir(parents=True)
        photo = run_timm_consumer(work, hub, repos, x)
        results[family] = dict(cases=cases, ckpt=ckpt, x=x, work=work, photo=photo)
    return results


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", MERGEABLE)
def test_timm_export_loads_from_the_hub_in_plain_timm(timm_exports, family, method):
    run = timm_exports[family]
    case = run["cases"][method]
    if "error" in case:
        raise case["error"]
    model, out, x = case["model"], case["out"], run["x"]
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == BACKBONES[family][0] and config["num_classes"] == len(CLASSES)
    assert config["label_names"] == CLASSES
    check_timm_outputs(model, run["work"], case["index"], x, run["photo"])
    if pv.param_report(model).method_params:  # the method, not only the head, must have been exported
        with torch.no_grad():
            assert (_head_only(model, family, run["ckpt"])(x) - model(x)).abs().max() > 1e-3


@pytest.mark.parametrize("name,resize", [("pv_vit_tiny_32", "squash"), ("pv_swin_tiny_32", "crop")])
def test_timm_export_of_an_embedded_backbone_names_a_timm_entry_point(tmp_path, hub, name, resize):
    """peftvision registers its embedded backbones with timm; the export must build without that, from an
    entry point of timm's own and every architecture argument."""
    torch.manual_seed(0)
    model = pv.create_model(name, num_classes=len(CLASSES))
    pv.inject(model, ANY)
    randomize_trainable(model)
    state = pv.get_state(model)
    state.class_names, state.resize = list(CLASSES), resize
    model.eval()
    out = pv.export_timm(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert timm.models.model_entrypoint(config["architecture"]).__module__.startswith("timm.models.")
    assert config["model_args"]["img_size"] == 32 and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    hub.upload_folder("user/embedded", out)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    check_timm_consumer(model, work(tmp_path), hub, "user/embedded", x)
    card = out / "README.md"
    assert front_matter(card)["library_name"] == "timm" and "hf-hub:USER/NAME" in card.read_text()


@pytest.mark.parametrize("method", UNMERGEABLE)
def test_timm_export_of_a_method_that_cannot_merge_is_one_line(tmp_path, capsys, base_checkpoint, method):
    ckpt = base_checkpoint("vit")
    model = adapted("vit", method, ckpt)
    reason = get_method(method).mergeable(build_config(method))
    with pytest.raises(PeftVisionError, match=f"cannot export to timm: {reason}"):
        pv.export_timm(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    pv.save_adapter(model, tmp_path / "adapter")
    argv = ["export", "--format", "timm", "--adapter", str(tmp_path / "adapter"), "--checkpoint", ckpt,
            "--output", str(tmp_path / "export")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot export to timm" in err
    assert not (tmp_path / "export").exists()


def test_timm_export_refuses_a_model_plain_timm_would_build_differently(tmp_path, base_checkpoint, monkeypatch):
    """The export-time check: a config timm would rebuild as another architecture is never written."""
    from peftvision.adapters import timm as timm_export

    model = adapted("vit", ANY, base_checkpoint("vit"))
    real = timm_export.timm_architecture
    monkeypatch.setattr(timm_export, "timm_architecture", lambda m: ("test_vit2", real(m)[1]))
    with pytest.raises(PeftVisionError, match="plain timm cannot rebuild this model as test_vit2"):
        pv.export_timm(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# ----------------------------------------------------------------------------- ONNX

_ORT_CONSUMER = """
import json
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
x = np.load("x.npy")
(y1,) = session.run(["logits"], {"pixel_values": x[:1]})
(y4,) = session.run(["logits"], {"pixel_values": np.concatenate([x, x[:1]])})
np.save("y1.npy", y1)
np.save("y4.npy", y4)
meta = session.get_modelmeta().custom_metadata_map
json.dump(dict(meta=meta, input=[str(d) for d in session.get_inputs()[0].shape]), open("info.json", "w"))
assert "torch" not in sys.modules  # a deployment without PyTorch
"""


# every method on the ViT; on the Swin, the methods exported as they run (their modules are in the graph)
# and one merged method (any merged model is a plain timm Swin)
ONNX_CASES = [("vit", m) for m in METHODS] + [("swin", m) for m in [*UNMERGEABLE, ANY]]


@pytest.mark.parametrize("family,method", ONNX_CASES)
def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(tmp_path, base_checkpoint, family, method):
    model = adapted(family, method, base_checkpoint(family), resize="squash")
    x = make_input(family, batch=3)
    consumer = work(tmp_path)
    path = pv.export_onnx(model, consumer / "model.onnx")
    assert os.listdir(consumer) == ["model.onnx"]  # one self-contained file, no temp left
    save_inputs(consumer, x)
    consume(_ORT_CONSUMER, consumer)
    with torch.no_grad():
        expected = model(torch.cat([x, x[:1]]))
    torch.testing.assert_close(torch.from_numpy(np.load(consumer / "y4.npy")), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(np.load(consumer / "y1.npy")), expected[:1], rtol=1e-5, atol=1e-5)
    info = json.loads((consumer / "info.json").read_text())
    assert not info["input"][0].isdigit()  # a named, dynamic batch axis
    meta = info["meta"]
    assert json.loads(meta["label_names"]) == CLASSES
    prep = json.loads(meta["preprocessing"])
    assert prep["crop_mode"] == "squash" and prep["input_size"] == list(x.shape[1:])
    assert json.loads(meta["peftvision.merged"]) == (method in MERGEABLE)
    assert path == consumer / "model.onnx"
    import onnx

    opsets = {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}
    assert opsets[""] == OPSET == int(meta["peftvision.opset"])  # pinned, not torch's moving default


def test_onnx_export_refuses_a_graph_that_computes_something_else(tmp_path, base_checkpoint, monkeypatch):
    """The export-time check against PyTorch: a wrong graph is never put in place."""
    from peftvision.adapters import onnx as onnx_export

    model = adapted("vit", ANY, base_checkpoint("vit"))
    real = onnx_export._export

    def export_another_model(net, x):
        other = adapted("vit", ANY, base_checkpoint("vit", seed=3))
        return real(pv.merge(other).eval(), x)

    monkeypatch.setattr(onnx_export, "_export", export_another_model)
    with pytest.raises(PeftVisionError, match="ONNX Runtime's output differs from PyTorch's at batch size 2"):
        pv.export_onnx(model, tmp_path / "out" / "model.onnx")
    assert os.listdir(tmp_path / "out") == []  # nothing put in place, no temp left


# ----------------------------------------------------------------------------- HF PEFT

_PEFT_CONSUMER = """
import timm, torch
torch.set_num_threads(1)
from peft import PeftModel
from safetensors.torch import load_file, save_file
base = timm.create_model("{name}", pretrained=True, pretrained_cfg_overlay=dict(file="{ckpt}"), num_classes={n},
                         **{kwargs})
model = PeftModel.from_pretrained(base, "{repo}", revision={revision!r}).eval()
with torch.no_grad():
    save_file({{"y": model(load_file("x.safetensors")["x"])}}, "out.safetensors")
"""


def check_peft_consumer(model, work: Path, hub: FakeHub, repo: str, family: str, ckpt: str,
                        revision: str | None = None) -> None:
    """peft loads `repo` from the hub cache onto plain timm's base and computes what `model` computes."""
    name, kwargs, _ = BACKBONES[family]
    x = make_input(family, batch=3)
    save_inputs(work, x)
    code = _PEFT_CONSUMER.format(name=name, ckpt=ckpt, n=len(CLASSES), kwargs=repr(kwargs), repo=repo,
                                 revision=revision)
    consume(code, work, hub)
    with torch.no_grad():
        torch.testing.assert_close(read_outputs(work)["y"], model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", EXPORTABLE)
def test_peft_export_loads_from_the_hub_in_peft(tmp_path, hub, base_checkpoint, family, method):
    ckpt = base_checkpoint(family)
    model = adapted(family, method, ckpt)
    out = pv.export_peft(model, tmp_path / "export")
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert front_matter(out / "README.md")["library_name"] == "peft"
    hub.upload_folder("user/peft", out)
    check_peft_consumer(model, work(tmp_path), hub, "user/peft", family, ckpt)


# ----------------------------------------------------------------------------- push

@pytest.mark.parametrize("fmt", ["timm", "peft"])
def test_push_in_a_format_uploads_the_export_its_library_loads(tmp_path, hub, online, base_checkpoint, fmt):
    ckpt = base_checkpoint("vit")
    model = adapted("vit", ANY, ckpt)
    run = pv.save_adapter(model, tmp_path / "run", class_names=CLASSES)
    (run / "metrics.json").write_text(json.dumps({"best_val_top1": 91.0, "test_top1": 90.5, "test_top5": None,
                                                  "epochs_run": 3, "best_epoch": 2}))
    url = pv.push(run, "user/pushed", format=fmt, checkpoint=ckpt, revision="exp", api=hub)
    assert url == "https://huggingface.co/user/pushed/tree/exp"
    (upload,) = hub.uploads
    expected = {"timm": ["README.md", "config.json", "model.safetensors"],
                "peft": ["README.md", "adapter_config.json", "adapter_model.safetensors"]}[fmt]
    assert upload["files"] == expected and upload["revision"] == "exp"
    assert upload["commit_message"] == f"Upload {ANY} adapter for test_vit ({fmt} format)"
    snapshot = next((hub.cache / "models--user--pushed" / "snapshots").iterdir())
    card = (snapshot / "README.md").read_text()
    assert front_matter(snapshot / "README.md")["library_name"] == fmt
    assert "user/pushed" in card and "USER/NAME" not in card and "| 91.00% | 90.50% | - |" in card
    assert sorted(os.listdir(run)) == ["README.md", "adapter.safetensors", "adapter_config.json", "metrics.json"]
    model = pv.load_adapter(run, checkpoint=ckpt).eval()  # what the adapter directory computes
    if fmt == "timm":
        check_timm_consumer(model, work(tmp_path), hub, "user/pushed@exp", make_input("vit", batch=2))
    else:
        check_peft_consumer(model, work(tmp_path), hub, "user/pushed", "vit", ckpt, revision="exp")


def test_push_defaults_to_the_adapter_directory(tmp_path, hub, online, base_checkpoint, monkeypatch):
    ckpt = base_checkpoint("vit")
    run = pv.save_adapter(adapted("vit", UNMERGEABLE[-1], ckpt), tmp_path / "run")
    pv.push(run, "user/own", api=hub)
    assert hub.uploads[0]["files"] == ["README.md", "adapter.safetensors", "adapter_config.json"]
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    x = make_input("vit")
    torch.testing.assert_close(pv.load_adapter("hf:user/own", checkpoint=ckpt).eval()(x),
                               pv.load_adapter(run, checkpoint=ckpt).eval()(x), rtol=0, atol=0)


def test_push_from_the_cli_in_each_format(tmp_path, capsys, hub, online, base_checkpoint, monkeypatch):
    import huggingface_hub

    ckpt = base_checkpoint("vit")
    run = pv.save_adapter(adapted("vit", ANY, ckpt), tmp_path / "run")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    hints = {"timm": "timm.create_model('hf-hub:user/cli', pretrained=True)",
             "peft": "peft.PeftModel.from_pretrained(timm_model, 'user/cli')", "peftvision": "--adapter hf:user/cli"}
    for fmt, hint in hints.items():
        assert main(["push", "--adapter", str(run), "--repo", "user/cli", "--format", fmt, "--checkpoint", ckpt]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "pushed to https://huggingface.co/user/cli" and hint in lines[1]
        assert max(map(len, lines)) <= 100
    assert [len(u["files"]) for u in hub.uploads] == [3, 3, 3]

    assert main(["push", "--adapter", str(run), "--repo", "not a name", "--format", "timm"]) == 2
    assert "bad hub repo name 'not a name'" in capsys.readouterr().err
    other = pv.save_adapter(adapted("vit", UNMERGEABLE[0], ckpt), tmp_path / "other")
    assert main(["push", "--adapter", str(other), "--repo", "user/cli", "--format", "timm", "--checkpoint", ckpt]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot export to timm" in err
    assert len(hub.uploads) == 3


# ----------------------------------------------------------------------------- command line

def test_export_from_the_cli_in_each_format(tmp_path, capsys, base_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = base_checkpoint("vit")
    model = adapted("vit", EVERY_FORMAT[-1], ckpt)
    pv.save_adapter(model, "run")
    x = make_input("vit")
    with torch.no_grad():
        expected = model(x)
    for fmt, output in (("timm", "timm-model"), ("onnx", "model.onnx"), ("peft", "peft-adapter")):
        assert main(["export", "--adapter", "run", "--checkpoint", ckpt, "--format", fmt, "--output", output]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith(f"wrote {output}") and max(map(len, lines)) <= 100
    local = timm.create_model("local-dir:timm-model", pretrained=True).eval()  # timm's own local folder loader
    torch.testing.assert_close(local(x), expected, rtol=0, atol=1e-5)
    config = json.loads(Path("timm-model/config.json").read_text())  # the card's way for any timm 1.x
    by_hand = timm.create_model(config["architecture"], num_classes=config["num_classes"],
                                checkpoint_path="timm-model/model.safetensors", **config["model_args"]).eval()
    torch.testing.assert_close(by_hand(x), expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- a real backbone

@pytest.mark.skipif(not SHARED_BACKBONE.is_file(), reason=f"the real backbone is not in {SHARED_BACKBONE.parent}")
def test_real_vit_tiny_exports_to_timm_and_onnx(tmp_path, hub):
    """The real ViT-Tiny/16 at 224 px: the timm folder and the ONNX file compute what the adapter does."""
    model = pv.create_model("vit_tiny_patch16_224", checkpoint=str(SHARED_BACKBONE), num_classes=len(CLASSES))
    pv.inject(model, ANY)
    randomize_trainable(model, std=0.02)
    pv.get_state(model).class_names = list(CLASSES)
    model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    hub.upload_folder("user/tiny", pv.export_timm(model, tmp_path / "timm"))
    consumer = work(tmp_path)
    check_timm_consumer(model, consumer, hub, "user/tiny", x)
    pv.export_onnx(model, consumer / "model.onnx")
    consume(_ORT_CONSUMER, consumer)
    with torch.no_grad():
        expected = model(torch.cat([x, x[:1]]))
    torch.testing.assert_close(torch.from_numpy(np.load(consumer / "y4.npy")), expected, rtol=1e-4, atol=1e-4)
