"""The local engine: a comparison's jobs in this process, or in `workers` processes splitting the cores."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from ..ui import RunsProgress
from .jobs import CompareConfig, Job, Then, run_job


def execute(jobs: list[Job], cc: CompareConfig, progress: RunsProgress, then: Then) -> list[dict[str, Any]]:
    """In this process, or in `cc.workers` processes splitting the cores between them."""
    threads = max(1, (os.cpu_count() or 1) // max(1, cc.workers))
    progress.slots = cc.workers
    rows: list[dict[str, Any]] = []
    if cc.workers <= 1:
        queue = deque(jobs)
        while queue:
            progress.submitted()
            rows.append(run_job(queue.popleft(), cc, threads))
            progress.finished(rows[-1])
            queue.extend(then(rows[-1]))
        return rows
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=cc.workers, mp_context=mp.get_context("spawn")) as pool:
        def submit(job: Job) -> Future:
            progress.submitted()
            return pool.submit(run_job, job, cc, threads)

        pending = {submit(job) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    rows.append(fut.result())
                    progress.finished(rows[-1])
                    pending |= {submit(job) for job in then(rows[-1])}
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # queued runs never start; running ones stop resumably
            raise
    return rows
