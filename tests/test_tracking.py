"""`--report-to`: accelerate's trackers get the config, per-step loss and lr, per-epoch val and the test
metrics — read back with each tracker's own reader (TensorBoard's event files, MLflow's client, the
wandb offline run file)."""

from __future__ import annotations

import csv
import glob
import importlib.util
import json

import pytest

from peftvision.cli import main

SHORT = ["--epochs", "2", "--batch-size", "100", "--num-workers", "0", "--max-test", "200", "--quiet"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PEFTVISION_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(directory)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


needs = {m: pytest.mark.skipif(importlib.util.find_spec(m) is None, reason=f"{m} is not installed") for m in
         ("tensorboard", "wandb", "mlflow")}


@needs["tensorboard"]
@needs["wandb"]
@needs["mlflow"]
def test_report_to_all_logs_the_run_in_every_tracker(tmp_path, monkeypatch, backbone_checkpoint):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts go under the working directory
    out = tmp_path / "run"
    argv = ["finetune", "--method", "lora", "--model", "pv_vit_tiny_32", "--checkpoint", backbone_checkpoint,
            "--dataset", "builtin:digits", "--output", str(out), "--report-to", "all", *SHORT]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    history = list(csv.DictReader(open(out / "history.csv")))
    steps = 2 * 8  # 800 training images, batch 100, 2 epochs

    # ---- TensorBoard: event files under OUTPUT/tensorboard, read with tensorboard's own reader
    tb = _scalars(str(out / "tensorboard" / "peftvision"))
    assert [s for s, _ in tb["train/loss"]] == list(range(1, steps + 1)), "one loss per optimizer step"
    assert [v for _, v in tb["val/top1"]] == pytest.approx([float(h["val_top1"]) for h in history])
    assert [s for s, _ in tb["val/top1"]] == [8, 16]
    assert tb["train/lr"][-1][1] == pytest.approx(float(history[-1]["lr"]), rel=1e-5)
    assert tb["train/lr"][3][1] < tb["train/lr"][7][1], "warm-up over the first epoch"
    assert tb["test/top1"] == [(steps, pytest.approx(metrics["test_top1"]))]
    hparams = glob.glob(str(out / "tensorboard" / "peftvision" / "*" / "hparams.yml"))
    assert hparams and "method: lora" in open(hparams[0]).read()

    # ---- MLflow: params, step metrics and the test metrics through its client
    import mlflow

    runs = mlflow.search_runs(experiment_names=["peftvision"])
    assert len(runs) == 1 and runs["params.method"][0] == "lora" and runs["params.lr"][0] == "0.01"
    assert runs["metrics.test/top1"][0] == pytest.approx(metrics["test_top1"])
    history_loss = mlflow.MlflowClient().get_metric_history(runs["run_id"][0], "train/loss")
    assert sorted(m.step for m in history_loss) == list(range(1, steps + 1))

    # ---- wandb: an offline run (sync it later with `wandb sync`) that holds the same keys
    files = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    data = open(files[0], "rb").read()
    assert all(key in data for key in (b"train/loss", b"val/top1", b"test/top1", b"lora", b"builtin:digits"))


def test_missing_tracker_is_one_line(tmp_path, capsys, monkeypatch, backbone_checkpoint):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    argv = ["finetune", "--model", "pv_vit_tiny_32", "--checkpoint", backbone_checkpoint, "--output",
            str(tmp_path / "r"), "--report-to", "wandb", *SHORT]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'peftvision finetune: error: --report-to wandb needs wandb: pip install "peftvision[wandb]"'
    assert not (tmp_path / "r").exists(), "checked before any work"


@needs["mlflow"]
def test_tracker_that_fails_to_start_is_one_line(tmp_path, capsys, monkeypatch, backbone_checkpoint):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    argv = ["finetune", "--model", "pv_vit_tiny_32", "--checkpoint", backbone_checkpoint, "--output",
            str(tmp_path / "r"), "--report-to", "mlflow", *SHORT]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peftvision finetune: error: --report-to mlflow: the tracker did not start (")


@needs["tensorboard"]
def test_compare_logs_one_tagged_run_per_method_task_seed(tmp_path, backbone_checkpoint):
    import yaml

    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "linear,bitfit", "--tasks", "builtin:digits", "--epochs", "1", "--max-test", "100",
            "--model", "pv_vit_tiny_32", "--checkpoint", backbone_checkpoint, "--output", str(out),
            "--report-to", "tensorboard", "--quiet"]
    assert main(argv) == 0
    for method in ("linear", "bitfit"):
        run = out / "runs" / "builtin-digits" / method / "seed0"
        metrics = json.loads((run / "metrics.json").read_text())
        (hparams,) = glob.glob(str(run / "tensorboard" / "peftvision" / "*" / "hparams.yml"))
        tags = {k: v for k, v in yaml.safe_load(open(hparams)).items() if k.startswith("tag.")}
        assert tags == {"tag.comparison": "cmp", "tag.kind": "final", "tag.method": method,
                        "tag.task": "builtin:digits", "tag.seed": 0}
        assert _scalars(str(run / "tensorboard" / "peftvision"))["test/top1"][0][1] == pytest.approx(metrics["test_top1"])
