"""The command line on the core stages: info, merge, export, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from conftest import BACKBONES, make_input, randomize_trainable

import peftvision as pv
from peftvision.cli import main


def test_help_is_fast_and_lists_commands():
    out = subprocess.run([sys.executable, "-m", "peftvision.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("info", "merge", "export"):
        assert command in out.stdout
    # --help must not import torch (keeps the CLI snappy)
    probe = "import sys, peftvision.cli; peftvision.cli.build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_info_counts_match_the_api(capsys):
    assert main(["info", "--model", "test_vit", "--num-classes", "10", "--method", "lora", "--set", "lora.r=4"]) == 0
    out = capsys.readouterr().out
    model = pv.inject(pv.create_model("test_vit", num_classes=10), "lora", r=4)
    assert f"{pv.param_report(model).trainable:,}" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["info", "--model", "test_resnet"], "test_resnet: no transformer blocks found"),
        (["info", "--model", "test_vit", "--method", "nope"], "unknown method 'nope'"),
        (["info", "--model", "no_such_model_x"], "unknown timm model 'no_such_model_x'"),
        (["info", "--model", "test_vit", "--method", "lora", "--set", "lora.rank=3"], "lora has no option rank"),
        (["info", "--model", "test_vit", "--set", "oops"], "--set expects key=value"),
        (["merge", "--adapter", "/nonexistent", "--output", "x.safetensors"], "adapter directory not found"),
    ],
)
def test_bad_input_gives_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_merge_and_export_end_to_end(tmp_path, base_checkpoint):
    ckpt = base_checkpoint("vit")
    name, kwargs, _ = BACKBONES["vit"]
    model = pv.inject(pv.create_model(name, checkpoint=ckpt, num_classes=5, **kwargs), "lora")
    randomize_trainable(model)
    model.eval()
    x = make_input("vit")
    y = model(x)
    pv.save_adapter(model, tmp_path / "adapter")

    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--checkpoint", ckpt, "--output", str(tmp_path / "m.safetensors")]) == 0
    # checkpoint_path loads every tensor, the trained head included
    merged = timm.create_model(name, num_classes=5, checkpoint_path=str(tmp_path / "m.safetensors"), **kwargs)
    torch.testing.assert_close(merged.eval()(x), y, rtol=0, atol=1e-5)

    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--checkpoint", ckpt, "--output", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()

    # merging a VPT adapter is refused with the reason, and writes nothing
    vpt = pv.inject(pv.create_model(name, checkpoint=ckpt, num_classes=5, **kwargs), "vpt-deep")
    pv.save_adapter(vpt, tmp_path / "vpt")
    assert main(["merge", "--adapter", str(tmp_path / "vpt"), "--checkpoint", ckpt, "--output", str(tmp_path / "v.safetensors")]) == 2
    assert not (tmp_path / "v.safetensors").exists()


def test_help_texts_name_no_single_method():
    """The registry is the extension point: commands that serve every method do not speak of one."""
    import contextlib
    import io

    for command in ("merge", "export", "compare", "info"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main([command, "--help"])
        assert "LoRA" not in out.getvalue() and "lora" not in out.getvalue(), command


def test_api_functions_are_not_hidden_by_their_modules():
    """`import peftvision.explain` (the CLI does) must leave `pv.explain` the function, not the module; and
    every name of the public API is the object its module defines."""
    import importlib

    for name, module in (("finetune", "peftvision.training.finetune"), ("explain", "peftvision.explain")):
        imported = importlib.import_module(module)
        assert getattr(pv, name) is getattr(imported, name) and callable(getattr(pv, name))
    for name, module in pv._API.items():
        assert getattr(pv, name) is getattr(importlib.import_module(module), name)


def test_every_command_output_fits_100_columns(tmp_path, capsys, monkeypatch, backbone_checkpoint):
    """What each command prints at the end (tables, paths, how-to lines) fits 100 columns, with the
    short relative paths people type."""
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PEFTVISION_CACHE", str(tmp_path / "cache"))
    ckpt = ["--checkpoint", backbone_checkpoint]
    fast = ["--model", "pv_vit_tiny_32", *ckpt, "--epochs", "1", "--batch-size", "100", "--num-workers", "0",
            "--max-test", "100"]
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(f"photo{i}.png")
    commands = {
        "finetune": ["finetune", "--method", "lora", "--dataset", "builtin:digits", "--output", "run", *fast],
        "info": ["info", "--model", "vit_base_patch16_224"],
        "eval": ["eval", "--adapter", "run", *ckpt, "--dataset", "builtin:digits", "--num-workers", "0"],
        "predict": ["predict", "--adapter", "run", *ckpt, "photo0.png", "photo1.png"],
        "merge": ["merge", "--adapter", "run", *ckpt, "--output", "merged.safetensors"],
        "export": ["export", "--adapter", "run", *ckpt, "--output", "peft"],
        "explain": ["explain", "--adapter", "run", *ckpt, "--output", "maps", "photo0.png"],
        "compare": ["compare", "--methods", "linear", "--tasks", "builtin:digits", "--epochs", "1", "--max-test", "100",
                    "--model", "pv_vit_tiny_32", *ckpt, "--output", "cmp"],
    }
    for name, argv in commands.items():
        assert main(argv) == 0, name
        out = capsys.readouterr()
        lines = (out.out + out.err).splitlines()
        assert lines, name
        too_long = [line for line in lines if len(line) > 100]
        assert not too_long, (name, too_long)
