"""`peftvision compare`: files, numbers consistent with the runs, resumability, failures isolated."""

from __future__ import annotations

import json
import statistics

import pytest

from peftvision.cli import main
from peftvision.compare.report import load_rows

TASKS = "builtin:digits,shape_loc"
ARGS = ["--methods", "linear,lora", "--epochs", "1", "--max-test", "200", "--quiet"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PEFTVISION_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def args(backbone_checkpoint) -> list[str]:
    return [*ARGS[:-1], "--model", "pv_vit_tiny_32", "--checkpoint", backbone_checkpoint, "--quiet"]


def test_compare_writes_consistent_results_and_resumes(tmp_path, capsys, args):
    out = tmp_path / "cmp"
    broken = "imagefolder:" + str(tmp_path / "missing")
    assert main(["compare", "--tasks", f"{TASKS},{broken}", "--output", str(out), *args]) == 0
    for name in ("results.csv", "results.json", "summary.md", "accuracy_vs_params.png", "per_task.png"):
        assert (out / name).is_file(), name

    rows = load_rows(out / "results.csv")
    pairs = {(r["method"], r["task"]) for r in rows}
    assert len(rows) == 6 and pairs == {(m, t) for m in ("linear", "lora") for t in ("builtin:digits", "builtin:shape_loc", broken)}
    assert json.loads((out / "results.json").read_text())[0]["method"] == rows[0]["method"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["task"] for r in failed} == {broken} and all("no such folder" in r["error"] or "missing" in r["error"] for r in failed)
    done = [r for r in rows if r["status"] != "failed"]
    assert len(done) == 4
    # random-init features of 8x8 digits are nearly linearly separable (README: 93% for a probe); chance is 10%
    digits_probe = next(r for r in done if (r["method"], r["task"]) == ("linear", "builtin:digits"))
    assert digits_probe["test_top1"] > 50, digits_probe
    # each result is an ordinary finetune run directory
    for r in done:
        metrics = json.loads(open(f"{r['output']}/metrics.json").read())
        assert metrics["test_top1"] == pytest.approx(r["test_top1"])

    # the summary's numbers are recomputed from results.csv
    summary = (out / "summary.md").read_text()
    for method in ("linear", "lora"):
        scores = {r["task"]: r["test_top1"] for r in done if r["method"] == method}
        line = next(ln for ln in summary.splitlines() if ln.startswith(f"| {method} |"))
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        assert float(cells[1]) == pytest.approx(scores["builtin:digits"], abs=0.06)
        assert float(cells[2]) == pytest.approx(scores["builtin:shape_loc"], abs=0.06)
        assert cells[3] == "failed"
        natural, structured = float(cells[4]), float(cells[5])
        assert natural == pytest.approx(scores["builtin:digits"], abs=0.06)
        assert structured == pytest.approx(scores["builtin:shape_loc"], abs=0.06)
        assert cells[6] == "-" and cells[7] == "-", "no average over an incomplete set of tasks"
    assert "Failed runs" in summary

    # a rerun skips every finished run (and retries the failed ones)
    capsys.readouterr()
    assert main(["compare", "--tasks", TASKS, "--output", str(out), *args[:-1]]) == 0
    rerun = load_rows(out / "results.csv")
    assert {r["status"] for r in rerun} == {"done"}
    assert [r["test_top1"] for r in rerun] == [r["test_top1"] for r in done]
    summary = (out / "summary.md").read_text()
    line = next(ln for ln in summary.splitlines() if ln.startswith("| lora |"))
    cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
    lora = [r["test_top1"] for r in rerun if r["method"] == "lora"]
    assert float(cells[5]) == pytest.approx(statistics.fmean(lora), abs=0.06)  # mean of groups (shown rounded to 0.1)
    assert float(cells[6]) == pytest.approx(statistics.fmean(lora), abs=0.06)  # mean of tasks
    assert "lora" in capsys.readouterr().out


def test_compare_rejects_bad_input(tmp_path, capsys):
    assert main(["compare", "--methods", "lora,nope", "--tasks", TASKS, "--output", str(tmp_path)]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert main(["compare", "--tasks", "builtin:nope", "--output", str(tmp_path)]) == 2
    assert "unknown built-in task 'nope'" in capsys.readouterr().err


def test_load_rows_closes_its_file(tmp_path):
    import gc
    import warnings

    (tmp_path / "results.csv").write_text("method,test_top1\nlora,81.5\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_rows(tmp_path / "results.csv") == [{"method": "lora", "test_top1": 81.5}]
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_search_unlocks_each_grids_final_runs_as_soon_as_it_is_done(tmp_path):
    from peftvision.compare.jobs import CompareConfig
    from peftvision.compare.plan import LR_GRID, WD_GRID, _plan

    cc = CompareConfig(methods=("linear", "lora"), model="pv_vit_tiny_32", search=True, seeds=2)
    grid, then = _plan(cc, ["builtin:digits", "builtin:shape_loc"], tmp_path)
    # the linear probe picks its own L2 and ignores lr and wd: one point per task, the whole grid for LoRA
    assert len(grid) == 2 * (1 + len(LR_GRID) * len(WD_GRID)) and {j.kind for j in grid} == {"search"}
    linear = [j for j in grid if j.method == "linear"]
    assert [j.task for j in linear] == ["builtin:digits", "builtin:shape_loc"]
    linear_finals = then({"kind": "search", "method": "linear", "task": "builtin:digits", "lr": linear[0].lr,
                          "weight_decay": linear[0].weight_decay, "status": "ran", "best_val_top1": 90.0})
    assert [(j.kind, j.seed) for j in linear_finals] == [("final", 0), ("final", 1)]
    lora_digits = [j for j in grid if (j.method, j.task) == ("lora", "builtin:digits")]
    row = lambda j, top1: {"kind": j.kind, "method": j.method, "task": j.task, "lr": j.lr,  # noqa: E731
                           "weight_decay": j.weight_decay, "status": "ran", "best_val_top1": top1}
    for i, job in enumerate(lora_digits[:-1]):  # other grids may still be running
        assert then(row(job, 50.0 + (i == 2))) == []
    finals = then(row(lora_digits[-1], 10.0))
    assert [(j.kind, j.method, j.task, j.seed) for j in finals] == [("final", "lora", "builtin:digits", s) for s in (0, 1)]
    assert {(j.lr, j.weight_decay) for j in finals} == {(lora_digits[2].lr, lora_digits[2].weight_decay)}
    assert then({**row(finals[0], 60.0), "kind": "final"}) == []
