"""`compare --engine ray`: every run is one Ray task, on one machine or on a cluster.

The only module that imports Ray (lazily: it is the optional extra `peftvision[ray]`). A task runs the
ordinary `run_job` in its own worker process with the resources asked for (`--run-cpus`, also its torch
threads; `--run-gpus`), so the guarantees are the local engine's: a finished run is skipped, a run with
a `checkpoint/` resumes (also when Ray retries a task whose worker died), a failing run is recorded.

Files: a worker that sees the driver's output directory (it can read a marker file holding a random
token the driver wrote there) writes its run directory in place: "shared". One that cannot trains in a
temp directory on its node and sends the run's small files (adapter, metrics, history, curves, config,
log; not `checkpoint/`) back with its result, and the driver writes them: "return". `--ray-files`
forces either; "auto" decides per run, so a cluster where only some nodes mount the output works too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
import traceback
from collections import Counter, deque
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..ui import RunsProgress
from .jobs import CompareConfig, Job, Then, failed_row, run_job

MARKER = ".peftvision-ray-marker"
RETRIES = 3  # a task whose worker process died is run again, resuming from its checkpoint
_MODE_TEXT = {"shared": "wrote their files in place (shared filesystem)",
              "return": "sent their files back to the driver (no shared filesystem)"}


def import_ray() -> Any:
    """The `ray` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError('--engine ray needs Ray, an optional extra: pip install "peftvision[ray]"') from None
    return ray


def execute(jobs: list[Job], cc: CompareConfig, progress: RunsProgress, then: Then) -> list[dict[str, Any]]:
    """Submit `jobs` (and what `then` adds) as Ray tasks; rows in the order they finished."""
    ray = import_ray()
    started = _connect(ray, cc)
    root = Path(cc.output).resolve()
    token = secrets.token_hex(16)
    marker = root / MARKER
    refs: dict[Any, Job] = {}
    try:
        marker.write_text(token)
        cpus, gpus = _resources(ray, cc)
        progress.slots = _slots(ray, cpus, gpus)
        progress.note(f"ray: {progress.slots} run(s) at a time, each {cpus:g} CPU(s) and {gpus:g} GPU(s)")
        remote = ray.remote(_run_remote).options(num_cpus=cpus, num_gpus=gpus, max_retries=RETRIES)
        threads = max(1, int(cpus))
        cc_abs = _absolute(cc)

        def submit(job: Job) -> Any:
            return remote.remote(_absolute_job(job), cc_abs, threads, str(marker), token, cc.ray_files)

        rows, modes = _loop(ray, jobs, cc_abs, progress, then, refs, submit)
        summary = ", ".join(f"{n} run(s) {_MODE_TEXT[m]}" for m, n in modes.items())
        progress.note(f"ray: {summary or 'every run was already finished'}")
        return rows
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref)  # running tasks get KeyboardInterrupt: they stop with their checkpoint intact
        if refs:
            ray.wait(list(refs), num_returns=len(refs), timeout=10)
        raise
    finally:
        marker.unlink(missing_ok=True)
        if started:
            ray.shutdown()


def _loop(ray: Any, jobs: list[Job], cc: CompareConfig, progress: RunsProgress, then: Then,
          refs: dict[Any, Job], submit: Any) -> tuple[list[dict[str, Any]], Counter]:
    """Keep the cluster fed: runs already finished are read here, the others submitted; each row that
    comes back may unlock more jobs (`then`). `refs` (in flight) is the caller's, to cancel on Ctrl-C."""
    rows: list[dict[str, Any]] = []
    modes: Counter = Counter()
    queue = deque(jobs)
    while queue or refs:
        while queue:
            job = queue.popleft()
            if (Path(job.output) / "metrics.json").is_file():  # no task (and no round trip) for a finished run
                rows.append(run_job(job, cc, 1))
                progress.finished(rows[-1], submitted=False)
                queue.extend(then(rows[-1]))
            else:
                refs[submit(job)] = job
                progress.submitted()
        if not refs:
            break
        (ref,), _ = ray.wait(list(refs), num_returns=1)
        job = refs.pop(ref)
        row, mode = _collect(ray, ref, job)
        if mode is not None:
            modes[mode] += 1
        rows.append(row)
        progress.finished(row)
        queue.extend(then(row))
    return rows, modes


def _collect(ray: Any, ref: Any, job: Job) -> tuple[dict[str, Any], str | None]:
    """A task's row, its returned files written here; a task Ray gave up on becomes a failed row."""
    try:
        row, files, mode = ray.get(ref)
    except Exception as e:  # noqa: BLE001 - the worker died RETRIES + 1 times, or Ray itself failed
        message = f"ray: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return failed_row(job, message, "".join(traceback.format_exception(e))), None
    row["output"] = job.output
    if files is not None:
        _write_back(Path(job.output), files)
    return row, mode


def _write_back(out: Path, files: dict[str, bytes]) -> None:
    """A returned run directory, each file atomically; files of an earlier attempt not in it go (as run_job
    clears a run that failed before its first checkpoint)."""
    from ..files import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file() and stale.name not in files:
            stale.unlink()
    for rel, data in files.items():
        if rel == "config.yaml":  # it names the worker's temp directory: point it here, so --recipe reruns it
            import yaml

            config = yaml.safe_load(data)
            config["output"] = str(out)
            data = yaml.safe_dump(config, sort_keys=False).encode()
        atomic_write(out / rel, lambda tmp, data=data: Path(tmp).write_bytes(data))


# ----------------------------------------------------------------------------- in the worker

def _run_remote(job: Job, cc: CompareConfig, threads: int, marker: str, token: str,
                files: str) -> tuple[dict[str, Any], dict[str, bytes] | None, str]:
    """One run on a Ray worker: in place when this node sees the driver's output, else in a temp dir."""
    if files == "shared" or (files == "auto" and _sees(marker, token)):
        if files == "shared" and not _sees(marker, token):
            message = (f"this worker ({os.uname().nodename}) cannot see the driver's output directory "
                       f"{Path(marker).parent}; mount it on every node or use --ray-files return")
            row = {**dataclasses.asdict(job), "status": "failed", "error": message}
            return row, {"error.txt": (message + "\n").encode()}, "return"
        return run_job(job, cc, threads), None, "shared"
    # The temp dir is named by the run's config: when Ray retries a killed task on this node, the
    # retry resumes from the checkpoint there.
    key = hashlib.sha256(json.dumps(dataclasses.asdict(job.config(cc)), sort_keys=True, default=str).encode())
    work = Path(tempfile.gettempdir()) / "peftvision-ray" / key.hexdigest()[:20]
    row = run_job(dataclasses.replace(job, output=str(work)), cc, threads)
    returned = {p.relative_to(work).as_posix(): p.read_bytes() for p in sorted(work.rglob("*"))
                if p.is_file() and p.relative_to(work).parts[0] != "checkpoint"}
    shutil.rmtree(work, ignore_errors=True)
    return row, returned, "return"


def _sees(marker: str, token: str) -> bool:
    try:
        return Path(marker).read_text() == token
    except OSError:
        return False


# ----------------------------------------------------------------------------- the cluster

def _connect(ray: Any, cc: CompareConfig) -> bool:
    """Use the Ray already initialised in this process, else connect to `cc.ray_address`, else start a
    small local cluster. True when this call initialised Ray (so the caller shuts it down)."""
    import logging

    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if cc.ray_address is None and not os.environ.get("RAY_ADDRESS"):
        # A cluster of this machine's cores; its workers import the same peftvision as this process.
        package_parent = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=os.cpu_count() or 1, object_store_memory=200 * 2**20,
                 runtime_env={"env_vars": {"PYTHONPATH": path}}, **quiet)
        return True
    where = cc.ray_address or os.environ.get("RAY_ADDRESS", "")
    _reachable(where)
    try:
        ray.init(address=cc.ray_address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot connect to Ray at {where} ({str(e).splitlines()[0]}); "
                          f"start a cluster with `ray start --head` or leave out --ray-address") from None
    return True


def _reachable(address: str) -> None:
    """A HOST:PORT nobody listens on fails here in seconds: Ray itself retries it for minutes."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", a ray:// client address: Ray's own error is quick enough
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"no Ray cluster at {address} ({e.strerror or e}); start one with `ray start --head` "
                          f"and pass the address it prints, or leave out --ray-address") from None


def _resources(ray: Any, cc: CompareConfig) -> tuple[float, float]:
    """Per run: 1 GPU when the cluster has GPUs (and the CPUs of a GPU's share of its node), else 1 CPU."""
    nodes = _nodes(ray)
    has_gpus = any(n.get("GPU", 0) for n in nodes)
    gpus = cc.run_gpus if cc.run_gpus is not None else (1.0 if has_gpus else 0.0)
    if cc.run_cpus is not None:
        cpus = cc.run_cpus
    elif gpus:
        cpus = max(1.0, min(math.floor(n["CPU"] / n["GPU"] * gpus) for n in nodes if n.get("GPU", 0)))
    else:
        cpus = 1.0
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
        raise ConfigError(f"no Ray node has {cpus:g} CPU(s) and {gpus:g} GPU(s) for a run (the largest has "
                          f"{biggest.get('CPU', 0):g} and {biggest.get('GPU', 0):g}); lower --run-cpus / --run-gpus")
    return cpus, gpus


def _slots(ray: Any, cpus: float, gpus: float) -> int:
    """How many runs the cluster holds at once (for the progress line's running / queued)."""
    def fits(n: dict[str, float]) -> int:
        by_cpu = math.floor(n.get("CPU", 0) / cpus + 1e-9)
        return min(by_cpu, math.floor(n.get("GPU", 0) / gpus + 1e-9)) if gpus else by_cpu

    return max(1, sum(fits(n) for n in _nodes(ray)))


def _nodes(ray: Any) -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _absolute(cc: CompareConfig) -> CompareConfig:
    """Workers may start elsewhere than the driver's working directory: paths given relative become absolute."""
    if cc.checkpoint and os.path.exists(cc.checkpoint):
        return dataclasses.replace(cc, checkpoint=os.path.abspath(cc.checkpoint))
    return cc


def _absolute_job(job: Job) -> Job:
    return dataclasses.replace(job, output=os.path.abspath(job.output))
