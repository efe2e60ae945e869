"""What one run reports besides its metrics: its history (history.csv), curves (curves.png) and memory peak."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- one run

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_top1", "lr", "seconds"]


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    from ..files import write_csv

    write_csv(path, history, HISTORY_COLUMNS)


def plot_curves(path: Path, history: list[dict[str, Any]], title: str) -> None:
    """Loss and accuracy per epoch, as a PNG people can look at."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import save_png

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    if any("val_loss" in r for r in history):
        ax1.plot(epochs, [r.get("val_loss") for r in history], marker="o", label="val")
        ax2.plot(epochs, [r.get("val_top1") for r in history], marker="o", color="tab:green")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax1.legend()
    ax2.set(xlabel="epoch", ylabel="top-1 (%)", title="validation accuracy")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    save_png(path, fig)
    plt.close(fig)


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or the process's peak RSS on CPU.

    On Linux the peak RSS is read from /proc (VmHWM): `ru_maxrss` survives fork + exec, so a process
    started by a big parent would report the parent's peak.
    """
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def reset_peak_memory() -> None:
    """Start `peak_memory_mb` afresh, so that runs sharing a process (`compare`) each report their own
    peak rather than the largest so far. On Linux, writing 5 to /proc/self/clear_refs resets VmHWM."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak stays process-wide (the largest of the runs so far)
