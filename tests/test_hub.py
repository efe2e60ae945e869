"""Hub adapters (`hf:USER/NAME[@REVISION]` from a real hub cache, offline), `push`, and the model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BACKBONES, make_input, randomize_trainable

import peftvision as pv
from peftvision.adapters.card import CARD_NAME, MARKER, finetune_command
from peftvision.cli import main
from peftvision.errors import AdapterFileError
from peftvision.training.config import TrainConfig

MAIN_COMMIT = "a" * 40
DEV_COMMIT = "b" * 40


def _adapter(directory: Path, checkpoint: str, seed: int, method: str = "lora") -> Path:
    name, kwargs, _ = BACKBONES["vit"]
    model = pv.inject(pv.create_model(name, checkpoint=checkpoint, num_classes=5, **kwargs), method)
    randomize_trainable(model, seed=seed)
    return pv.save_adapter(model, directory, class_names=list("abcde"))


def _cache_repo(cache: Path, repo: str, refs: dict[str, tuple[str, Path]]) -> None:
    """The layout huggingface_hub's cache has: refs/<revision> holds a commit hash, snapshots/<hash>/ the
    files (copies here, as on a file system without symlinks; the hub links them to blobs/)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for revision, (commit, files) in refs.items():
        (root / "refs" / revision).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / revision).write_text(commit)
        snapshot = root / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for f in files.iterdir():
            shutil.copy(f, snapshot / f.name)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache in tmp, the hub offline (huggingface_hub reads both at import: patch its constants)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def cached_repo(tmp_path, hub_cache, base_checkpoint):
    """user/adapter in the cache: main and branch dev hold two different adapters, also kept locally."""
    ckpt = base_checkpoint("vit")
    main_dir, dev_dir = _adapter(tmp_path / "main", ckpt, seed=3), _adapter(tmp_path / "dev", ckpt, seed=4)
    _cache_repo(hub_cache, "user/adapter", {"main": (MAIN_COMMIT, main_dir), "dev": (DEV_COMMIT, dev_dir)})
    return ckpt, main_dir, dev_dir


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- download

def test_hub_adapters_load_from_the_cache_like_their_directories(cached_repo):
    ckpt, main_dir, dev_dir = cached_repo
    x = make_input("vit")
    for source, local in (("hf:user/adapter", main_dir), ("hf:user/adapter@dev", dev_dir)):
        expected = pv.load_adapter(local, checkpoint=ckpt).eval()(x)
        torch.testing.assert_close(pv.load_adapter(source, checkpoint=ckpt).eval()(x), expected, rtol=0, atol=0)
    assert pv.resolve_adapter("hf:user/adapter@dev").name == DEV_COMMIT
    assert pv.resolve_adapter(main_dir) == main_dir  # a local directory is returned as it is


def test_cli_predict_and_serve_parsing_take_hub_adapters(tmp_path, capsys, cached_repo):
    from PIL import Image

    from peftvision.serving.http import find_adapters
    from peftvision.serving.multi import MultiAdapterModel

    ckpt, main_dir, dev_dir = cached_repo
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64), (200, 30, 90)).save(image)
    lines = []
    for source in (str(main_dir), "hf:user/adapter"):
        assert main(["predict", "--adapter", source, "--checkpoint", ckpt, str(image), "--top-k", "5"]) == 0
        lines.append(capsys.readouterr().out)
    assert lines[0] == lines[1] and lines[0].startswith(str(image))

    adapters = find_adapters(["a=hf:user/adapter@dev", "b=" + str(main_dir)], None)
    assert adapters == {"a": "hf:user/adapter@dev", "b": str(main_dir)}  # split on the first '=' only
    multi = MultiAdapterModel.from_adapters(adapters, checkpoint=ckpt)
    assert multi.info("a").directory == "hf:user/adapter@dev"
    x = make_input("vit")
    expected = pv.load_adapter(dev_dir, checkpoint=ckpt).eval()(x)
    torch.testing.assert_close(multi(x, adapters=["a", "a"]), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "source,message",
    [
        ("hf:user/missing", "hf:user/missing is not in the local hub cache and the hub is unreachable"),
        ("hf:user/adapter@nope", "`hf download user/adapter --revision nope`"),
        ("hf:not a name", "bad hub adapter 'hf:not a name'"),
        ("hf:user/empty", "hf:user/empty holds no peftvision adapter"),
    ],
)
def test_hub_failures_give_one_line(tmp_path, capsys, cached_repo, hub_cache, source, message):
    card_only = tmp_path / "card-only"
    card_only.mkdir()
    (card_only / CARD_NAME).write_text("---\nlibrary_name: timm\n---\n")
    _cache_repo(hub_cache, "user/empty", {"main": ("c" * 40, card_only)})
    assert main(["eval", "--adapter", source, "--dataset", "builtin:digits"]) == 2
    assert message in _err(capsys)
    with pytest.raises(AdapterFileError, match="bad hub adapter"):
        pv.load_adapter("hf:user/a/b")


# ----------------------------------------------------------------------------- upload

class RecordingApi:
    """Stands in for `HfApi`: records the calls `push` makes."""

    def __init__(self, token=None) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, *args, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", args, kwargs))
        return RepoUrl(f"https://huggingface.co/{args[0]}")

    def create_branch(self, *args, **kwargs):
        self.calls.append(("create_branch", args, kwargs))

    def upload_folder(self, *args, **kwargs):
        self.calls.append(("upload_folder", args, kwargs))


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_push_uploads_the_adapter_files_and_card_only(tmp_path, base_checkpoint, online):
    from huggingface_hub.utils import filter_repo_objects

    out = _adapter(tmp_path / "run", base_checkpoint("vit"), seed=3)
    (out / CARD_NAME).unlink()  # push writes a missing card
    for name in ("metrics.json", "history.csv", "log.jsonl", "config.yaml", "checkpoint/state.safetensors"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text("{}")
    api = RecordingApi()
    url = pv.push(out, "user/adapter", private=True, revision="dev", commit_message="hi", api=api)
    assert url == "https://huggingface.co/user/adapter/tree/dev"
    (create, args, kwargs), branch, upload = api.calls
    assert create == "create_repo" and args == ("user/adapter",)
    assert kwargs == dict(private=True, exist_ok=True, repo_type="model")
    assert branch[0] == "create_branch" and branch[2]["branch"] == "dev"
    up = upload[2]
    assert up["repo_id"] == "user/adapter" and up["folder_path"] == str(out) and up["revision"] == "dev"
    assert up["commit_message"] == "hi" and up["repo_type"] == "model"
    files = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    sent = sorted(filter_repo_objects(files, allow_patterns=up["allow_patterns"]))
    assert sent == ["README.md", "adapter.safetensors", "adapter_config.json", "config.yaml", "history.csv",
                    "metrics.json"]
    card = (out / CARD_NAME).read_text()
    assert "hf:user/adapter" in card and "USER/NAME" not in card  # the examples name the repo


def test_push_from_the_cli_and_its_failures(tmp_path, capsys, monkeypatch, base_checkpoint, online):
    import huggingface_hub
    from huggingface_hub import constants

    out = _adapter(tmp_path / "run", base_checkpoint("vit"), seed=3)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert main(["push", "--adapter", str(out), "--repo", "user/adapter"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "pushed to https://huggingface.co/user/adapter"
    assert "hf:user/adapter" in printed[1] and max(map(len, printed)) <= 100

    assert main(["push", "--adapter", str(tmp_path / "nope"), "--repo", "user/adapter"]) == 2
    assert "adapter directory not found" in _err(capsys)
    assert main(["push", "--adapter", str(out), "--repo", "not a name"]) == 2
    assert "bad hub repo name 'not a name'" in _err(capsys)
    (tmp_path / "broken").mkdir()
    shutil.copy(out / "adapter_config.json", tmp_path / "broken")
    (tmp_path / "broken" / "adapter.safetensors").write_bytes(b"partial")
    assert main(["push", "--adapter", str(tmp_path / "broken"), "--repo", "user/adapter"]) == 2
    assert "truncated or not a safetensors file" in _err(capsys)

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert huggingface_hub.get_token() is None
    assert main(["push", "--adapter", str(out), "--repo", "user/adapter"]) == 2
    assert "not logged in to the Hugging Face Hub: run `hf auth login`" in _err(capsys)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", "--adapter", str(out), "--repo", "user/adapter"]) == 2
    assert "HF_HUB_OFFLINE=1" in _err(capsys)


# ----------------------------------------------------------------------------- model card

def _front_matter(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_save_adapter_writes_a_card_the_hub_reads_and_keeps_a_hand_written_one(tmp_path, base_checkpoint):
    from huggingface_hub import ModelCard

    out = _adapter(tmp_path / "a", base_checkpoint("vit"), seed=3)
    meta = _front_matter(out / CARD_NAME)
    assert meta["library_name"] == "peftvision" and meta["pipeline_tag"] == "image-classification"
    assert {"peftvision", "timm", "image-classification", "lora"} <= set(meta["tags"])
    card = ModelCard.load(out / CARD_NAME)
    assert card.data.library_name == "peftvision" and card.data.base_model == "timm/test_vit.r160_in1k"
    report = pv.param_report(pv.load_adapter(out, checkpoint=base_checkpoint("vit")))
    text = card.text
    assert f"{report.trainable:,}" in text and "## Results" not in text  # no run: no metrics
    assert "peftvision merge --adapter" in text and "peft.PeftModel.from_pretrained" in text

    # the card offers only the ways out the registry says the method has
    for method in pv.list_methods():
        m = pv.get_method(method)
        merges, exports = m.mergeable(m.config_cls()) is None, m.exportable(m.config_cls()) is None
        if not (merges and exports):
            text = (_adapter(tmp_path / method, base_checkpoint("vit"), seed=3, method=method) / CARD_NAME).read_text()
            assert ("peftvision merge" in text) == merges and ("peftvision export" in text) == exports, method
            break

    (out / CARD_NAME).write_text("# my own card\n")
    _adapter(out, base_checkpoint("vit"), seed=5)
    assert (out / CARD_NAME).read_text() == "# my own card\n"


def _photos(root: Path) -> None:
    """Two tiny classes of 32x32 images, train/ and test/ (a few seconds of training, no data to generate)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 4)):
        for k, cls in enumerate(("cool", "warm")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (32, 32, 3))
                pixels[..., 0 if k else 2] += 120
                Image.fromarray(pixels.astype("uint8")).save(root / split / cls / f"{i}.png")


def test_finetune_card_has_the_runs_metrics_and_command(tmp_path, backbone_checkpoint):
    from huggingface_hub import ModelCard

    out, data = tmp_path / "run", tmp_path / "photos"
    _photos(data)
    argv = ["finetune", "--method", "lora", "--output", str(out), "--model", "pv_vit_tiny_32", "--checkpoint",
            backbone_checkpoint, "--dataset", f"imagefolder:{data}", "--epochs", "1", "--batch-size", "8",
            "--num-workers", "0", "--quiet"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    card = ModelCard.load(out / CARD_NAME)
    assert card.data.library_name == "peftvision" and card.data.base_model is None  # embedded: not on the hub
    assert MARKER in card.text
    assert metrics["test_top5"] is None  # two classes: no top-5, shown as "-"
    # 20 training photos, no val/: no epoch is picked on a slice (the selection policy), and the card says so
    assert metrics["best_val_top1"] is None and metrics["selection"]["keep"] == "last"
    for needle in (f"| - | {metrics['test_top1']:.2f}% | - |", f"Kept epoch: {metrics['selection']['why']}.",
                   f"{metrics['trainable_params']:,}", "lora", f"imagefolder:{data}", "cool, warm",
                   f"| test | {metrics['splits']['test']['split']} | {metrics['splits']['test']['images']} |",
                   "peftvision finetune --method lora --output", "peftvision finetune --recipe config.yaml"):
        assert needle in card.text, needle


def test_a_python_run_card_names_the_call():
    cfg = TrainConfig(method="lora", dataset="builtin:digits", epochs=2)
    assert finetune_command(cfg) == (
        "peftvision.training.finetune(peftvision.TrainConfig(dataset='builtin:digits', epochs=2))"
    )
