"""Test helper run inside Ray workers (tests/test_compare_ray.py): kill a worker in the middle of a run, once.

A monkeypatch cannot reach Ray's worker processes, so the test's Ray job names `install` as its
`worker_process_setup_hook`: every worker then wraps `peftvision.training.finetune.finetune`. When the file named
by $PV_TEST_KILL_PLAN holds "METHOD DATASET", the first run of that pair to finish an epoch (its
checkpoint is written by then) SIGKILLs its own process, leaving PLAN.killed so that Ray's retry goes on.
Production code knows nothing of this.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any


def install() -> None:
    import importlib

    ft = importlib.import_module("peftvision.training.finetune")  # the module: `peftvision.training.finetune` is also the function

    plan = Path(os.environ["PV_TEST_KILL_PLAN"])
    inner = ft.finetune

    def finetune(cfg: Any, resume: bool = False, on_epoch_end: Any = None, **kwargs: Any) -> dict[str, Any]:
        def epoch_end(loop: Any) -> None:
            if on_epoch_end is not None:
                on_epoch_end(loop)
            if plan.is_file() and plan.read_text().split() == [cfg.method, cfg.dataset]:
                try:
                    os.close(os.open(plan.with_suffix(".killed"), os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return  # killed once already: this is the retry
                os.kill(os.getpid(), signal.SIGKILL)

        return inner(cfg, resume=resume, on_epoch_end=epoch_end, **kwargs)

    ft.finetune = finetune
