"""The lr search of benchmarks/default-lr.md, for any methods: which lr a method takes on the embedded backbone.

    python benchmarks/default_lr.py --methods vera,oft,gps,rep-adapter --lrs 3e-3,1e-2,3e-2 \
        [--tasks builtin:count,builtin:landcover] [--output benchmarks/results-default-lr.json]

Each run is `Job("search", method, task, 0, lr, 1e-4, out)` through `peftvision.compare.run_job` with
`CompareConfig(epochs=2)` (batch 64, train800 -> val200, the default comparison's budget), on the
embedded `pv_vit_tiny_32`, seed 0: val200 top-1, never test. Finished runs are appended to --output
at once, so an interrupted search resumes; the table of every run in --output is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from peftvision.compare.jobs import CompareConfig, Job, run_job


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", required=True)
    p.add_argument("--lrs", default="3e-3,1e-2,3e-2")
    p.add_argument("--tasks", default="builtin:count,builtin:landcover")
    p.add_argument("--output", default="benchmarks/results-default-lr.json")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "peftvision-default-lr"))
    args = p.parse_args()
    out = Path(args.output)
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {(r["method"], r["task"], r["lr"]) for r in rows}
    cc = CompareConfig(epochs=2, quiet=True)
    for method in args.methods.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            for task in args.tasks.split(","):
                if (method, task, lr) in done:
                    continue
                job = Job("search", method, task, 0, lr, 1e-4, str(Path(args.work) / method / task.replace(":", "-") / f"lr{lr:g}"))
                start = time.time()
                row = run_job(job, cc, threads=2)
                rows.append({"method": method, "task": task, "lr": lr, "val_top1": row.get("best_val_top1"),
                             "status": row.get("status"), "error": row.get("error"),
                             "seconds": time.time() - start, "date": time.strftime("%Y-%m-%d %H:%M")})
                out.write_text(json.dumps(rows, indent=1))
                print(method, task, lr, rows[-1]["val_top1"], rows[-1]["status"], flush=True)
    tasks = args.tasks.split(",")
    print("| method | lr | " + " | ".join(f"{t} val200 top-1" for t in tasks) + " | mean |")
    print("|---|---|" + "---|" * (len(tasks) + 1))
    for method in dict.fromkeys(r["method"] for r in rows):
        for lr in sorted({r["lr"] for r in rows if r["method"] == method}):
            got = {r["task"]: r["val_top1"] for r in rows if r["method"] == method and r["lr"] == lr}
            cells = [got.get(t) for t in tasks]
            mean = statistics.mean(c for c in cells if c is not None) if all(c is not None for c in cells) else None
            print(f"| {method} | {lr:g} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells)
                  + f" | {'-' if mean is None else f'{mean:.2f}'} |")


if __name__ == "__main__":
    main()
