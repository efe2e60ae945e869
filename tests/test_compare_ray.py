"""`compare --engine ray`: the local engine's numbers and files, a killed worker's run resumed, reruns skip.

One small local Ray cluster (2 CPUs) serves the whole module: starting one takes ~5-10 s. Runs use one
thread on both engines (Ray: 1 CPU per run; local: --workers 2 on 2 cores), so their numbers are equal.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from peftvision.cli import main
from peftvision.compare.report import load_rows

TASKS = "builtin:digits,shape_loc"
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The built-in task cache of test_compare.py (generated once per session), also for Ray's workers."""
    cache = str(tmp_path_factory.getbasetemp() / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTVISION_CACHE", cache)
        yield cache


@pytest.fixture(scope="module")
def cluster(env, tmp_path_factory):
    """A local Ray cluster for this module; yields the kill-plan file read by tests/_ray_kill_hook.py."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'peftvision[ray]'")
    plan = tmp_path_factory.mktemp("ray") / "kill-plan"
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": path, "PEFTVISION_CACHE": env, "PV_TEST_KILL_PLAN": str(plan)},
                          "worker_process_setup_hook": "_ray_kill_hook.install"})
    yield plan
    ray.shutdown()


def _args(checkpoint: str, tasks: str = TASKS, methods: str = "linear,lora") -> list[str]:
    return ["--methods", methods, "--tasks", tasks, "--epochs", "1", "--max-test", "200", "--quiet",
            "--model", "pv_vit_tiny_32", "--checkpoint", checkpoint]


@pytest.fixture(scope="module")
def reference(env, backbone_checkpoint, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """The local engine's rows per (method, task), one thread per run."""
    out = tmp_path_factory.mktemp("local") / "cmp"
    assert main(["compare", "--output", str(out), "--workers", "2", *_args(backbone_checkpoint)]) == 0
    return {(r["method"], r["task"]): r for r in load_rows(out / "results.csv")}


def _files(run: str) -> set[str]:
    return {p.relative_to(run).as_posix() for p in Path(run).rglob("*") if p.is_file() and "checkpoint" not in p.parts}


def test_ray_gives_the_local_numbers_and_files_and_reruns_skip(cluster, reference, backbone_checkpoint, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--engine", "ray", "--output", str(out), *_args(backbone_checkpoint)]) == 0
    for name in ("results.csv", "results.json", "summary.md", "accuracy_vs_params.png", "per_task.png"):
        assert (out / name).is_file(), name
    rows = load_rows(out / "results.csv")
    assert [(r["method"], r["task"]) for r in rows] == list(reference)  # the local engine's order, too
    for r in rows:
        assert r["status"] == "ran"
        assert r["test_top1"] == reference[r["method"], r["task"]]["test_top1"]
        assert _files(r["output"]) == _files(reference[r["method"], r["task"]]["output"])
    assert not (out / ".peftvision-ray-marker").exists()

    assert main(["compare", "--engine", "ray", "--output", str(out), *_args(backbone_checkpoint)]) == 0
    rerun = load_rows(out / "results.csv")
    assert {r["status"] for r in rerun} == {"done"}
    assert [r["test_top1"] for r in rerun] == [r["test_top1"] for r in rows]


def test_a_killed_worker_run_resumes_from_its_checkpoint(cluster, reference, backbone_checkpoint, tmp_path):
    cluster.write_text("lora builtin:digits")
    try:
        out = tmp_path / "cmp"
        assert main(["compare", "--engine", "ray", "--output", str(out),
                     *_args(backbone_checkpoint, tasks="builtin:digits", methods="lora")]) == 0
    finally:
        cluster.unlink()
    assert cluster.with_suffix(".killed").exists(), "the hook did not kill the worker"
    (row,) = load_rows(out / "results.csv")
    assert row["status"] == "resumed"  # Ray ran the task again; it found the first attempt's checkpoint
    assert row["test_top1"] == reference["lora", "builtin:digits"]["test_top1"]
    assert json.loads((Path(row["output"]) / "metrics.json").read_text())["test_top1"] == row["test_top1"]


def test_return_mode_sends_the_run_files_back(cluster, reference, backbone_checkpoint, tmp_path):
    out = tmp_path / "cmp"
    broken = "imagefolder:" + str(tmp_path / "missing")
    assert main(["compare", "--engine", "ray", "--ray-files", "return", "--output", str(out),
                 *_args(backbone_checkpoint, tasks=f"builtin:shape_loc,{broken}", methods="lora")]) == 0
    done, failed = load_rows(out / "results.csv")
    assert done["status"] == "ran" and done["test_top1"] == reference["lora", "builtin:shape_loc"]["test_top1"]
    assert _files(done["output"]) == _files(reference["lora", "builtin:shape_loc"]["output"])
    assert not (Path(done["output"]) / "checkpoint").exists()  # what stays on the worker
    assert f"output: {done['output']}" in (Path(done["output"]) / "config.yaml").read_text()
    assert failed["status"] == "failed" and (Path(failed["output"]) / "error.txt").is_file()


def test_a_missing_ray_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["compare", "--engine", "ray", "--methods", "lora", "--tasks", TASKS, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "peftvision[ray]"' in err


def test_engine_flags_are_checked(tmp_path, capsys):
    assert main(["compare", "--run-cpus", "2", "--methods", "lora", "--tasks", TASKS, "--output", str(tmp_path)]) == 2
    assert "--run-cpus only apply to --engine ray" in capsys.readouterr().err


def test_an_address_nobody_listens_on_fails_fast():
    from peftvision.compare.ray import _reachable
    from peftvision.errors import ConfigError

    with pytest.raises(ConfigError, match="no Ray cluster at 127.0.0.1:1"):
        _reachable("127.0.0.1:1")  # Ray's own ray.init would retry it for minutes
    _reachable("auto")  # left to Ray, whose "no running instance" error is immediate
