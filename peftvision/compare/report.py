"""What a comparison reports: tables and plots of its runs.

A comparison's table has methods as rows, tasks as columns and the literature's two averages. Every
number there is recomputed from the per-run rows (results.csv), so the table can be checked against
the runs it summarises.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

GROUP_ORDER = ("natural", "specialized", "structured")
COLUMNS = [
    "kind", "method", "task", "task_group", "seed", "status", "test_top1", "best_val_top1", "lr", "weight_decay",
    "trainable_params", "trainable_percent", "total_params", "adapter_bytes", "train_seconds", "images_per_second",
    "peak_memory_mb", "epochs_run", "output", "error",
]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict[str, Any]], methods: list[str], tasks: list[str]) -> dict[str, Any]:
    """Per method: per-task mean/std over seeds, group means, both averages, cost columns."""
    final = [r for r in rows if r.get("kind") == "final"]
    groups = {r["task"]: r.get("task_group") for r in final if r.get("task_group")}
    table: dict[str, Any] = {}
    for m in methods:
        done = [r for r in final if r["method"] == m and r.get("status") != "failed" and r.get("test_top1") is not None]
        per_task: dict[str, dict[str, float] | None] = {}
        for t in tasks:
            scores = [r["test_top1"] for r in done if r["task"] == t]
            per_task[t] = dict(zip(("mean", "std"), _mean_std(scores)), n=len(scores)) if scores else None
        complete = {t: v["mean"] for t, v in per_task.items() if v is not None}
        group_means = {}
        for g in GROUP_ORDER:
            members = [complete[t] for t in tasks if groups.get(t) == g and t in complete]
            if members:
                group_means[g] = statistics.fmean(members)
        all_done = len(complete) == len(tasks)
        # per-seed averages over tasks, for the +- of the overall mean
        seeds = sorted({r["seed"] for r in done})
        seed_means = [
            statistics.fmean([r["test_top1"] for r in done if r["seed"] == s])
            for s in seeds if len([r for r in done if r["seed"] == s]) == len(tasks)
        ]
        table[m] = {
            "tasks": per_task,
            "groups": group_means,
            "mean_of_group_means": statistics.fmean(group_means.values()) if all_done and group_means else None,
            "mean_over_tasks": statistics.fmean(complete.values()) if all_done else None,
            "mean_over_tasks_std": _mean_std(seed_means)[1] if len(seed_means) > 1 else 0.0,
            "trainable_params": _median([r["trainable_params"] for r in done]),
            "trainable_percent": _median([r["trainable_percent"] for r in done]),
            "adapter_bytes": _median([r["adapter_bytes"] for r in done]),
            "train_seconds": sum(r["train_seconds"] for r in done),
            "peak_memory_mb": max((r["peak_memory_mb"] for r in done), default=None),
            "failed": sum(1 for r in final if r["method"] == m and r.get("status") == "failed"),
        }
    return {"methods": table, "tasks": tasks, "groups": groups}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _best(summary: dict[str, Any], key: Any) -> float | None:
    values = [v for v in (key(row) for row in summary["methods"].values()) if v is not None]
    return max(values) if values else None


def _short(task: str) -> str:
    return task.split(":", 1)[-1]


def table_cells(summary: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[tuple[str, bool]]]]]:
    """Column names, and per method its cells as (text, is best in column): one source for every table."""
    tasks = summary["tasks"]
    groups = [g for g in GROUP_ORDER if g in summary["groups"].values()]
    cols = [_short(t) for t in tasks] + [f"{g} mean" for g in groups] + ["mean of groups", "mean of tasks",
                                                                          "params (M)", "params %", "adapter", "train time", "peak mem"]
    getters: list[Any] = [lambda r, t=t: (r["tasks"][t] or {}).get("mean") for t in tasks]
    getters += [lambda r, g=g: r["groups"].get(g) for g in groups]
    getters += [lambda r: r["mean_of_group_means"], lambda r: r["mean_over_tasks"]]
    best = [_best(summary, g) for g in getters]
    rows = []
    for m, r in summary["methods"].items():
        cells: list[tuple[str, bool]] = []
        for i, g in enumerate(getters):
            v = g(r)
            if v is None:
                cells.append(("failed" if i < len(tasks) else "-", False))
                continue
            text = f"{v:.1f}"
            if i < len(tasks) and (r["tasks"][tasks[i]] or {}).get("n", 0) > 1:
                text += f" ± {r['tasks'][tasks[i]]['std']:.1f}"
            if i == len(getters) - 1 and r["mean_over_tasks_std"]:
                text += f" ± {r['mean_over_tasks_std']:.1f}"
            cells.append((text, best[i] is not None and math.isclose(v, best[i])))
        params = r["trainable_params"]
        cells += [
            ("-" if params is None else f"{params / 1e6:.3f}", False),
            ("-" if r["trainable_percent"] is None else f"{r['trainable_percent']:.2f}", False),
            ("-" if r["adapter_bytes"] is None else f"{r['adapter_bytes'] / 1e3:.0f} KB", False),
            (f"{r['train_seconds']:.0f} s", False),
            ("-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f} MB", False),
        ]
        rows.append((m, cells))
    return cols, rows


NOTE = (
    "Top-1 test accuracy (%), mean ± std over seeds; best in each column marked. 'mean of groups' averages "
    "the group means (the VTAB convention); 'mean of tasks' weighs every task alike."
)


def summary_markdown(summary: dict[str, Any], title: str) -> str:
    cols, rows = table_cells(summary)
    lines = [f"## {title}", "", "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m, cells in rows:
        lines.append(f"| {m} | " + " | ".join(f"**{t}**" if b else t for t, b in cells) + " |")
    return "\n".join(lines + ["", NOTE.replace("marked", "in **bold**")]) + "\n"


def print_table(summary: dict[str, Any], title: str, width: int = 100) -> None:
    """The same table in the terminal, within `width` columns: when every column does not fit, the
    per-task and cost columns stay in summary.md and the terminal shows the means and the size."""
    from rich.console import Console
    from rich.table import Table

    cols, rows = table_cells(summary)

    def build(keep: list[int], caption: str) -> Table:
        table = Table(title=title, caption=caption)
        table.add_column("method", no_wrap=True)
        for i in keep:
            table.add_column(cols[i], justify="right", no_wrap=True)
        for m, cells in rows:
            table.add_row(m, *(f"[bold green]{t}[/]" if b else t for t, b in (cells[i] for i in keep)))
        return table

    console = Console(width=width)
    table = build(list(range(len(cols))), NOTE.replace("marked", "in green"))
    if console.measure(table, options=console.options.update_width(10_000)).maximum > width:
        compact = [i for i, c in enumerate(cols) if c.endswith("mean") or c.startswith("mean of") or c in ("params %", "adapter")]
        table = build(compact, NOTE.replace("marked", "in green") + " Per-task and cost columns: summary.md.")
    console.print(table)


def plot(summary: dict[str, Any], root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import save_png

    methods = [m for m, r in summary["methods"].items() if r["trainable_params"] and r["mean_over_tasks"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        r = summary["methods"][m]
        ax.scatter(r["trainable_params"], r["mean_over_tasks"], s=40)
        ax.annotate(m, (r["trainable_params"], r["mean_over_tasks"]), textcoords="offset points", xytext=(5, 3))
    ax.set(xscale="log", xlabel="trainable parameters (log)", ylabel="mean top-1 over tasks (%)",
           title="accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(root / "accuracy_vs_params.png", fig)
    plt.close(fig)

    tasks = summary["tasks"]
    all_methods = list(summary["methods"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(1, len(all_methods)) / 3), 4))
    width = 0.8 / max(1, len(all_methods))
    for i, m in enumerate(all_methods):
        values = [(summary["methods"][m]["tasks"][t] or {}).get("mean", 0.0) for t in tasks]
        ax.bar([k + i * width for k in range(len(tasks))], values, width, label=m)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(tasks))], [_short(t) for t in tasks], rotation=30, ha="right")
    ax.set(ylabel="test top-1 (%)", title="per-task accuracy")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(root / "per_task.png", fig)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], cc: Any, tasks: list[str], root: Path) -> dict[str, Any]:
    from ..files import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in COLUMNS})
    atomic_write_text(root / "results.csv", buffer.getvalue())
    atomic_write_text(root / "results.json", json.dumps([{k: r.get(k) for k in COLUMNS} for r in rows], indent=2) + "\n")
    summary = summarize(rows, list(cc.methods), tasks)
    title = f"{cc.model}: {len(cc.methods)} methods x {len(tasks)} tasks x {cc.seeds} seed(s)"
    text = summary_markdown(summary, title)
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        text += "\nFailed runs:\n\n" + "\n".join(f"- {r['method']} on {r['task']} (seed {r['seed']}): {r['error']}" for r in failed) + "\n"
    atomic_write_text(root / "summary.md", text)
    plot(summary, root)
    if not cc.quiet:
        print_table(summary, title)
    return summary


def load_rows(path: Path) -> list[dict[str, Any]]:
    """results.csv back into typed rows (used by tests and by anyone re-plotting)."""
    numeric = {"seed", "test_top1", "best_val_top1", "lr", "weight_decay", "trainable_params", "trainable_percent",
               "total_params", "adapter_bytes", "train_seconds", "images_per_second", "peak_memory_mb", "epochs_run"}
    rows = []
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    for r in records:
        rows.append({k: (float(v) if k in numeric and v not in ("", None) else (None if v == "" else v)) for k, v in r.items()})
    return rows
