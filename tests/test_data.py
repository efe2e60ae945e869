"""The data layer on tiny local fixtures: spec kinds, VTAB-1k splits, transforms, loaders, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peftvision.data import (
    build_loader,
    list_tasks,
    load_task,
    make_transform,
    open_image,
)
from peftvision.data.protocol import stratified_choice
from peftvision.errors import DataError


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    # One cache per session, set before any module fixture generates data: built-in tasks are
    # generated once, and never into the user's ~/.cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTVISION_CACHE", str(tmp_path_factory.getbasetemp() / "peftvision-cache"))
        mp.delenv("PEFTVISION_VTAB_ROOT", raising=False)
        yield


def png(path: Path, value: int | tuple[int, int, int] = 128, mode: str = "RGB", size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)
    return path


def class_folder(root: Path, counts: dict[str, int], mode: str = "RGB") -> None:
    for k, (name, n) in enumerate(counts.items()):
        for i in range(n):
            png(root / name / f"{i}.png", (40 * k + i) % 256 if mode == "L" else (40 * k, i, 0), mode)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def assert_protocol(task) -> None:
    """train800 and val200 partition train800val200; test never overlaps training (same source)."""
    tr, va, both = (task.split(s) for s in ("train800", "val200", "train800val200"))
    assert sorted(np.concatenate([tr.indices, va.indices]).tolist()) == sorted(both.indices.tolist())
    assert len(set(tr.indices) & set(va.indices)) == 0
    test = task.split("test")
    if test.source is both.source:
        assert len(set(test.indices) & set(both.indices)) == 0
    for s in task.splits.values():
        assert s.labels.min() >= 0 and s.labels.max() < task.num_classes


# ----------------------------------------------------------------------------- imagefolder:


def assert_user_splits(task) -> None:
    """train and val partition trainval; test is disjoint from it."""
    tr, va, both = (task.split(s) for s in ("train", "val", "trainval"))
    assert sorted(np.concatenate([tr.indices, va.indices]).tolist()) == sorted(both.indices.tolist())
    assert not set(tr.indices) & set(va.indices)
    if task.split("test").source is both.source:
        assert not set(task.indices("test")) & set(both.indices)


def files_of(task, split: str) -> set[str]:
    source = task.split(split).source
    return {source.paths[int(i)] for i in task.indices(split)}


def test_imagefolder_with_train_val_test(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        class_folder(tmp_path / split, {"cat": n, "dog": n, "emu": n})
    task = load_task(f"imagefolder:{tmp_path}", seed=0)
    assert task.class_names == ("cat", "dog", "emu") and task.num_classes == 3 and task.group == "natural"
    # train/, val/ and test/ are used as they are: val/ picks the best epoch, test/ is reported
    assert {s: task.sizes()[s] for s in ("train", "val", "trainval", "test")} == {"train": 18, "val": 6, "trainval": 24, "test": 9}
    assert all(p.startswith(str(tmp_path / "val")) for p in files_of(task, "val"))
    assert all(p.startswith(str(tmp_path / "test")) for p in files_of(task, "test"))
    # VTAB-1k splits come from train + val = 24 images < 1,000: scaled down 80/20, and the notes say so.
    assert {s: task.sizes()[s] for s in ("train800", "val200", "train800val200")} == {"train800": 19, "val200": 5, "train800val200": 24}
    assert task.meta["scaled_down"] and any("scaled down to 19/5" in n for n in task.notes)
    assert sorted(np.bincount(task.labels("test")).tolist()) == [3, 3, 3]
    assert_protocol(task)
    assert_user_splits(task)
    assert task.resize == "crop", "photos get the model's own eval transform"
    x, y = task.dataset("test")[0]
    assert isinstance(x, Image.Image) and x.mode == "RGB" and isinstance(y, int)


def test_imagefolder_train_and_val_reports_on_val(tmp_path):
    """torchvision's train/ + val/ layout: val/ is what is reported; model selection is carved from train/."""
    class_folder(tmp_path / "train", {"cat": 30, "dog": 20})
    class_folder(tmp_path / "val", {"cat": 7, "dog": 5})
    task = load_task(f"imagefolder:{tmp_path}", seed=0)
    assert files_of(task, "test") == {str(p) for p in (tmp_path / "val").rglob("*.png")}
    assert task.sizes()["trainval"] == 50 and task.sizes()["val"] == 5 and task.sizes()["train"] == 45
    assert np.bincount(task.labels("val")).tolist() == [3, 2]  # 10 % of train/, stratified
    assert all(p.startswith(str(tmp_path / "train")) for p in files_of(task, "trainval"))
    assert task.about("test").startswith("val/") and task.sizes()["test"] == 12
    assert_user_splits(task)
    other = load_task(f"imagefolder:{tmp_path}", seed=1)
    assert files_of(other, "test") == files_of(task, "test")
    assert files_of(other, "val") != files_of(task, "val"), "the selection slice follows the run's seed"


def test_imagefolder_without_splits_holds_out_a_fixed_test(tmp_path):
    class_folder(tmp_path, {"a": 20, "b": 20, "c": 10})
    t0 = load_task(f"imagefolder:{tmp_path}", seed=0)
    assert {s: t0.sizes()[s] for s in ("train", "val", "trainval", "test")} == {"train": 36, "val": 4, "trainval": 40, "test": 10}
    assert t0.sizes()["train800val200"] == 40 and t0.sizes()["val200"] == 8
    assert t0.meta["test_held_out"]
    assert np.bincount(t0.labels("test")).tolist() == [4, 4, 2]  # stratified 20 % hold-out
    assert_protocol(t0)
    assert_user_splits(t0)
    again, other = load_task(f"imagefolder:{tmp_path}", seed=0), load_task(f"imagefolder:{tmp_path}", seed=1)
    assert np.array_equal(t0.indices("train800"), again.indices("train800"))
    assert np.array_equal(t0.indices("val"), again.indices("val"))
    assert not np.array_equal(np.sort(t0.indices("val200")), np.sort(other.indices("val200")))
    # The test set is the benchmark: it does not move with the seed.
    assert np.array_equal(t0.indices("test"), other.indices("test"))


def test_a_large_folder_keeps_every_training_image(tmp_path):
    """Your own data is not cut to VTAB-1k's 1,000 images: only 20 % is held out."""
    for k in range(2):
        folder = tmp_path / f"c{k}"
        folder.mkdir()
        for i in range(700):
            Image.new("RGB", (2, 2), (k, i % 256, 0)).save(folder / f"{i}.png")
    task = load_task(f"imagefolder:{tmp_path}", seed=0)
    assert task.sizes()["test"] == 280 and task.sizes()["trainval"] == 1120 and task.sizes()["train800val200"] == 1000


def test_file_names_with_split_words_do_not_make_splits(tmp_path):
    """HF datasets infers splits from file names: `bullet_train.jpg`, `strainer.jpg`, `valley.jpg` once
    loaded as ONE image. Only folder names may decide."""
    names = ["466_n02917067_bullet_train", "828_n04332243_strainer", "979_n09468604_valley", "1_test_tube",
             "2_validation_set", "3_dev_board", "4_plain", "5_trainee", "6_val", "7_test"]
    for cls in ("object", "place"):
        for n in names:
            png(tmp_path / cls / f"{n}.jpg")
    task = load_task(f"imagefolder:{tmp_path}", seed=0)
    assert task.class_names == ("object", "place")
    assert task.sizes()["trainval"] + task.sizes()["test"] == 20


def test_symlinked_split_and_class_folders(tmp_path):
    """Split folders (and class folders) that are symbolic links load like real ones."""
    real = tmp_path / "real"
    class_folder(real / "train", {"a": 6, "b": 6})
    class_folder(real / "elsewhere" / "b", {"x": 3})
    class_folder(real / "val", {"a": 3})
    root = tmp_path / "linked"
    root.mkdir()
    (root / "train").symlink_to(real / "train", target_is_directory=True)
    (root / "val").mkdir()
    (root / "val" / "a").symlink_to(real / "val" / "a", target_is_directory=True)
    (root / "val" / "b").symlink_to(real / "elsewhere" / "b", target_is_directory=True)  # b/x/*.png, nested
    task = load_task(f"imagefolder:{root}", seed=0)
    assert task.class_names == ("a", "b")
    assert task.sizes()["trainval"] == 12 and task.sizes()["test"] == 6
    assert sorted(np.bincount(task.labels("test")).tolist()) == [3, 3]


def test_resize_per_source_and_override(tmp_path):
    import timm

    from peftvision.training.config import TrainConfig

    class_folder(tmp_path, {"a": 5, "b": 5})
    assert load_task(f"imagefolder:{tmp_path}").resize == "crop"
    assert load_task("builtin:digits").resize == "squash"
    assert TrainConfig(resize="squash").resize == "squash"
    with pytest.raises(Exception, match="resize must be crop or squash"):
        TrainConfig(resize="stretch")
    # "crop" is timm's own eval transform for the model; "squash" keeps the whole image
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    wide = Image.new("RGB", (400, 200), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 40, 200))  # a white band on the left tenth
    cropped, squashed = make_transform(model, resize="crop")(wide), make_transform(model, resize="squash")(wide)
    assert cropped.shape == squashed.shape == (3, 224, 224)
    assert squashed[0, :, :10].mean() > 0.9 and cropped[0, :, :10].mean() < -0.9  # the crop cut the band off
    reference = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    torch.testing.assert_close(cropped, reference(wide))
    with pytest.raises(DataError, match="resize must be one of crop, squash"):
        make_transform(model, resize="stretch")


def test_grayscale_becomes_rgb_and_transform_matches_model(tmp_path):
    import timm

    class_folder(tmp_path / "train", {"x": 4, "y": 4}, mode="L")
    png(tmp_path / "test" / "x" / "0.png", 200, mode="L", size=13)
    png(tmp_path / "test" / "y" / "0.png", 200, mode="L", size=13)
    task = load_task(f"imagefolder:{tmp_path}", seed=0)
    model = timm.create_model("test_vit", pretrained=False)
    cfg = model.pretrained_cfg
    ds = task.dataset("test", make_transform(model, resize="squash"))
    x, _ = ds[0]
    assert tuple(x.shape) == tuple(cfg["input_size"]) == (3, 160, 160)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    assert torch.allclose(x, (200 / 255 - mean) / std, atol=1e-4)  # uniform gray 200, normalised per channel
    # A model built smaller than its registered config: the patch embedding's size wins.
    small = timm.create_model("test_vit", pretrained=False, img_size=64)
    assert tuple(make_transform(small)(open_image(tmp_path / "test" / "x" / "0.png")).shape) == (3, 64, 64)
    aug = make_transform(small, train=True)
    assert tuple(aug(Image.new("L", (20, 30), 9).convert("RGB")).shape) == (3, 64, 64)
    # Squash resizes the whole image (VTAB-1k), no centre crop: a 1-px edge column survives.
    edge = Image.new("RGB", (40, 40), (0, 0, 0))
    edge.paste((255, 0, 0), (0, 0, 1, 40))
    out = make_transform(small, resize="squash")(edge)  # (3, 64, 64), red channel normalised to (1 - .5) / .5 = 1
    assert out[0, :, 0].min() > 0.5 and out[0, :, 32].max() < -0.9


def test_open_image_modes(tmp_path):
    for mode, value in (("L", 7), ("RGBA", (1, 2, 3, 4)), ("P", 3), ("I;16", 65535), ("1", 1)):
        img = open_image(png(tmp_path / f"{mode.replace(';', '')}.png", value, mode))
        assert img.mode == "RGB" and img.size == (8, 8)
    assert open_image(tmp_path / "I16.png").getpixel((0, 0)) == (255, 255, 255)


# ----------------------------------------------------------------------------- hf:


def _hf_split(n: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)) for _ in range(n)]
    return {"img": images, "caption": [f"c{i}" for i in range(n)], "y": [i % classes for i in range(n)]}


def test_hf_save_to_disk(tmp_path):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string"),
                                  "y": datasets.ClassLabel(names=["ant", "bee", "cow", "doe"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(_hf_split(40, 4, 0), features=features),
        "test": datasets.Dataset.from_dict(_hf_split(12, 4, 1), features=features),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    task = load_task(f"hf:{tmp_path / 'ds'}", seed=3, max_test=8, group="structured")
    assert task.class_names == ("ant", "bee", "cow", "doe") and task.group == "structured"
    assert task.meta["image_column"] == "img" and task.meta["label_column"] == "y"
    assert task.sizes() == {"train": 36, "val": 4, "trainval": 40, "train800": 32, "val200": 8, "train800val200": 40, "test": 8}
    assert np.bincount(task.labels("test")).tolist() == [2, 2, 2, 2]  # the cap is stratified
    assert task.resize == "crop"
    x, y = task.dataset("train800")[0]
    assert x.size == (6, 6) and y == task.labels("train800")[0]
    # The pixels are the stored ones, in the split's order.
    row = int(task.indices("train800")[0])
    assert np.array_equal(np.asarray(x), np.asarray(dd["train"][row]["img"]))


def test_hf_train_and_validation_reports_on_validation(tmp_path):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string"),
                                  "y": datasets.ClassLabel(names=["ant", "bee"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(_hf_split(40, 2, 0), features=features),
        "validation": datasets.Dataset.from_dict(_hf_split(10, 2, 1), features=features),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    task = load_task(f"hf:{tmp_path / 'ds'}", seed=0)
    assert {s: task.sizes()[s] for s in ("train", "val", "trainval", "test")} == {"train": 36, "val": 4, "trainval": 40, "test": 10}
    assert "split validation" in task.about("test")
    x, _ = task.dataset("test")[0]  # the pixels of the validation split's row (after train's 40 rows)
    row = int(task.indices("test")[0]) - 40
    assert 0 <= row < 10 and np.array_equal(np.asarray(x), np.asarray(dd["validation"][row]["img"]))
    assert_user_splits(task)
    # with a test split too, validation is the model-selection split and test is reported
    dd["test"] = datasets.Dataset.from_dict(_hf_split(6, 2, 2), features=features)
    dd.save_to_disk(str(tmp_path / "ds3"))
    task = load_task(f"hf:{tmp_path / 'ds3'}", seed=0)
    assert {s: task.sizes()[s] for s in ("train", "val", "trainval", "test")} == {"train": 40, "val": 10, "trainval": 50, "test": 6}
    assert_user_splits(task)
    assert_protocol(task)


def test_hf_int_labels_single_split_and_column_override(tmp_path):
    import datasets

    data = _hf_split(30, 3, 0)
    data["y"] = [10 * v + 5 for v in data["y"]]  # labels 5, 15, 25: not 0..K-1
    data["other"] = [0] * 30
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "one"))
    task = load_task(f"hf:{tmp_path / 'one'}", seed=0, label_column="y")
    assert task.class_names == ("5", "15", "25")
    assert set(task.labels("train800val200").tolist()) == {0, 1, 2}
    assert task.meta["test_held_out"] and task.sizes()["test"] == 6
    with pytest.raises(DataError) as e:
        load_task(f"hf:{tmp_path / 'one'}", label_column="nope")
    assert "no column 'nope'" in one_line(e) and "columns: img, caption, y, other" in str(e.value)


def test_hf_missing_columns(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"], "y": [0, 1]}).save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(DataError) as e:
        load_task(f"hf:{tmp_path / 'noimg'}")
    assert "no image column" in one_line(e) and "image_column=" in str(e.value)

    data = _hf_split(4, 2, 0)
    del data["y"]
    data["score"] = [0.5] * 4
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(DataError) as e:
        load_task(f"hf:{tmp_path / 'nolabel'}")
    assert "no label column" in one_line(e) and "label_column=" in str(e.value)


def test_hf_hub_offline_is_a_data_error():
    with pytest.raises(DataError) as e:
        load_task("hf:peftvision-no-such-user/no-such-dataset")
    assert "save_to_disk" in one_line(e)


# ----------------------------------------------------------------------------- vtab:


def fake_vtab(root: Path, task: str = "cifar", sizes=(8, 2, 6), label_max: int = 3) -> Path:
    base = root / task
    lists = {}
    for split, n in zip(("train800", "val200", "test"), sizes):
        lines = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.jpg"
            path = base / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (10, 10), (i * 20, 0, 0)).save(path)
            lines.append(f"{rel} {i % (label_max + 1)}")
        lists[split] = lines
        (base / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (base / "train800val200.txt").write_text("\n".join(lists["train800"] + lists["val200"]) + "\n")
    return base


def test_vtab_layout(tmp_path, monkeypatch):
    fake_vtab(tmp_path)
    task = load_task("vtab:cifar", vtab_root=tmp_path)
    assert task.group == "natural" and task.num_classes == 100
    assert task.sizes() == {"train800": 8, "val200": 2, "train800val200": 10, "test": 6, "train": 8, "val": 2, "trainval": 10}
    assert task.labels("train800").tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert task.split("train") is task.split("train800") and task.resize == "squash"  # a benchmark task
    assert any("not 1,000" in n for n in task.notes)
    x, y = task.dataset("test")[5]
    assert x.getpixel((0, 0))[0] in range(95, 106) and y == 1  # the image the list names, with its label
    monkeypatch.setenv("PEFTVISION_VTAB_ROOT", str(tmp_path))
    capped = load_task("vtab:cifar", seed=5, max_test=4)
    assert capped.sizes()["test"] == 4 and np.array_equal(capped.indices("train800"), task.indices("train800"))
    fake_vtab(tmp_path, "clevr_count", label_max=7)
    t = load_task("vtab:clevr_count")
    assert t.group == "structured" and t.class_names[0] == "3" and t.num_classes == 8


def test_vtab_lists():
    assert len(list_tasks("vtab:all")) == 19
    groups = {g: list_tasks(f"vtab:{g}") for g in ("natural", "specialized", "structured")}
    assert [len(v) for v in groups.values()] == [7, 4, 8]
    assert groups["specialized"] == ["vtab:patch_camelyon", "vtab:eurosat", "vtab:resisc45", "vtab:diabetic_retinopathy"]
    assert set(sum(groups.values(), [])) == set(list_tasks("vtab:all"))


def test_vtab_errors(tmp_path):
    with pytest.raises(DataError) as e:
        load_task("vtab:cifar")
    assert "PEFTVISION_VTAB_ROOT" in one_line(e) and "NOAH" in str(e.value)
    with pytest.raises(DataError) as e:
        load_task("vtab:cifar", vtab_root=tmp_path / "nowhere")
    assert "does not exist" in one_line(e) and "get_vtab1k" in str(e.value)
    fake_vtab(tmp_path, "dtd")
    with pytest.raises(DataError) as e:
        load_task("vtab:cifar", vtab_root=tmp_path)
    assert "cifar not found (it has dtd)" in one_line(e)
    with pytest.raises(DataError) as e:
        load_task("vtab:cifar10", vtab_root=tmp_path)
    assert "unknown VTAB-1k task 'cifar10'" in one_line(e)

    base = fake_vtab(tmp_path, "svhn", label_max=9)
    (base / "images" / "train800" / "000003.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as e:
        load_task("vtab:svhn", vtab_root=tmp_path)  # fails at load, naming the file
    assert "000003.jpg" in one_line(e) and "cannot read image" in str(e.value)
    (base / "images" / "train800" / "000003.jpg").unlink()
    with pytest.raises(DataError) as e:
        load_task("vtab:svhn", vtab_root=tmp_path)
    assert "1 image files listed" in one_line(e) and "000003.jpg" in str(e.value)
    (base / "test.txt").write_text("images/test/000000.jpg\n")
    with pytest.raises(DataError) as e:
        load_task("vtab:svhn", vtab_root=tmp_path)
    assert "test.txt:1: expected" in one_line(e)
    (base / "test.txt").write_text("images/test/000000.jpg 10\n")
    with pytest.raises(DataError) as e:
        load_task("vtab:svhn", vtab_root=tmp_path)
    assert "label 10 outside 0..9" in one_line(e)


# ----------------------------------------------------------------------------- errors


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError) as e:
        load_task(f"imagefolder:{tmp_path / 'missing'}")
    assert "no such folder" in one_line(e)

    class_folder(tmp_path / "a" / "train", {"x": 3, "y": 3})
    (tmp_path / "a" / "train" / "z").mkdir()
    with pytest.raises(DataError) as e:
        load_task(f"imagefolder:{tmp_path / 'a'}")
    assert "empty class folder" in one_line(e) and str(tmp_path / "a" / "train" / "z") in str(e.value)

    png(tmp_path / "b" / "loose.png")
    with pytest.raises(DataError) as e:
        load_task(f"imagefolder:{tmp_path / 'b'}")
    assert "one folder per class" in one_line(e)

    class_folder(tmp_path / "c" / "val", {"x": 2})
    with pytest.raises(DataError) as e:
        load_task(f"imagefolder:{tmp_path / 'c'}")
    assert "no train/" in one_line(e)


def test_corrupt_image_named_at_load_or_first_access(tmp_path):
    class_folder(tmp_path / "train", {"x": 5, "y": 5})
    class_folder(tmp_path / "test", {"x": 2, "y": 2})
    bad = tmp_path / "test" / "y" / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    task = load_task(f"imagefolder:{tmp_path}", seed=0)  # test images are decoded only when used
    ds = task.dataset("test")
    with pytest.raises(DataError) as e:
        for i in range(len(ds)):
            ds[i]
    assert "broken.png" in one_line(e) and "cannot read image" in str(e.value)

    (tmp_path / "train" / "x" / "0.png").write_bytes(b"")  # a training image: caught when loading
    with pytest.raises(DataError) as e:
        load_task(f"imagefolder:{tmp_path}", seed=0)
    assert str(tmp_path / "train" / "x" / "0.png") in one_line(e)


@pytest.mark.parametrize(
    "spec, kwargs, expected",
    [
        ("cifar10", {}, "unknown dataset spec 'cifar10'"),
        ("torchvision:cifar10", {}, "expected builtin:<task>"),
        ("builtin:", {}, "names no task"),
        ("builtin:imagenet", {}, "unknown built-in task 'imagenet'"),
        ("builtin:all", {}, "names several tasks"),
        ("builtin:digits", {"max_test": 0}, "max_test must be a positive integer"),
        ("builtin:digits", {"group": "structured"}, "fixed group"),
        ("imagefolder:/x", {"group": "weird"}, "unknown group 'weird'"),
        ("builtin:digits", {"image_column": "img"}, "hf: specs only"),
        ("hf:/definitely/not/here", {}, "no such directory"),
    ],
)
def test_bad_specs(spec, kwargs, expected):
    with pytest.raises(DataError) as e:
        load_task(spec, **kwargs)
    assert expected in one_line(e)


def test_list_tasks(monkeypatch, caplog, tmp_path):
    from peftvision.data import builtin

    assert list_tasks("vtab:cifar,dtd , builtin:digits,count,digits") == [
        "vtab:cifar", "vtab:dtd", "builtin:digits", "builtin:count"
    ]
    assert list_tasks("imagefolder:/a,/b") == ["imagefolder:/a", "imagefolder:/b"]
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", tmp_path / "none")
    with caplog.at_level(logging.WARNING):
        everything = list_tasks("builtin:all")
    assert "builtin:fashion_mnist" not in everything and len(everything) == len(builtin.SUITE) - 1
    assert "skipping builtin:fashion_mnist" in caplog.text and "dataset-fashion-mnist" in caplog.text
    groups = {builtin.SUITE[t.split(":")[1]].group for t in everything}
    assert groups == {"natural", "specialized", "structured"}
    with pytest.raises(DataError) as e:
        load_task("builtin:fashion_mnist")
    assert "apt-get install dataset-fashion-mnist" in one_line(e)
    for bad in ("builtin:nope", "dtd", "vtab:cifar,nope"):
        with pytest.raises(DataError):
            list_tasks(bad)


# ----------------------------------------------------------------------------- protocol, loaders


def test_stratified_choice():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    pick = stratified_choice(labels, 10, np.random.default_rng(0))
    assert np.bincount(labels[pick]).tolist() == [5, 3, 2] and len(set(pick)) == 10
    assert np.array_equal(pick, stratified_choice(labels, 10, np.random.default_rng(0)))
    assert not np.array_equal(pick, stratified_choice(labels, 10, np.random.default_rng(1)))


def test_builtin_task_protocol_and_loader():
    import timm

    t0, t0b, t1 = (load_task("builtin:digits", seed=s) for s in (0, 0, 1))
    assert t0.sizes() == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797, "train": 800, "val": 200, "trainval": 1000}
    assert t0.split("val") is t0.split("val200") and t0.resize == "squash"
    assert t0.group == "natural" and t0.class_names == tuple("0123456789")
    assert np.array_equal(t0.indices("train800"), t0b.indices("train800"))
    assert not np.array_equal(np.sort(t0.indices("train800")), np.sort(t1.indices("train800")))
    assert np.bincount(t0.labels("val200")).min() >= 19  # stratified: ~20 per class
    assert_protocol(t0)

    model = timm.create_model("test_vit", pretrained=False, img_size=32)
    ds = t0.dataset("train800", make_transform(model))
    batches = [next(iter(build_loader(ds, batch_size=16, shuffle=True, num_workers=w, seed=7))) for w in (0, 2, 0)]
    x, y = batches[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1])  # gray digits: three equal channels
    for xb, yb in batches[1:]:  # same seed, same order and pixels, with or without workers
        assert torch.equal(yb, y) and torch.allclose(xb, x)
    other = next(iter(build_loader(ds, batch_size=16, shuffle=True, seed=8)))[1]
    assert not torch.equal(other, y)


def test_sources_pickle_small(tmp_path):
    """Workers started by spawn/forkserver receive the source by pickle: a path, not the pixels."""
    import pickle

    source = load_task("builtin:digits").split("test").source
    blob = pickle.dumps(source)
    assert len(blob) < 1000 and np.asarray(pickle.loads(blob).load(3)).shape == (8, 8, 3)
    class_folder(tmp_path, {"a": 6, "b": 6})
    hf_source = load_task(f"imagefolder:{tmp_path}").split("test").source
    assert pickle.loads(pickle.dumps(hf_source)).load(0).size == (8, 8)
