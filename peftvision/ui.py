"""What a person sees while training: a rich progress bar and a final summary table."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

Advance = Callable[[], None]  # one unit of work done


def print_wide(table: Any) -> None:
    """Print a rich table at its natural width. Off a terminal (a log file, CI) rich assumes 80
    columns and squeezes wider tables, cutting cells such as 2,710,468 to '2,710,…'."""
    from rich.console import Console

    console = Console()
    console.width = max(console.width, console.measure(table, options=console.options.update_width(10_000)).maximum)
    console.print(table)


@contextmanager
def progress_bar(description: str, total: int | None = None, enabled: bool = True) -> Iterator[Advance]:
    """A bar (or, without a total, a spinner) on stderr for one long step; it disappears when done.

    Drawn only on a terminal: in a log file or CI it prints nothing, so logs stay one line per event.
    If another bar is already live (inside a training run), the step shows as nothing extra."""
    from rich.console import Console
    from rich.errors import LiveError
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    if not enabled:
        yield lambda: None
        return
    bar = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    try:
        bar.start()
    except LiveError:  # one live display at a time
        yield lambda: None
        return
    try:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
    finally:
        bar.stop()


class Progress:
    """A rich progress bar over all steps of a run: loss, img/s and ETA. A no-op when disabled."""

    def __init__(self, epochs: int, enabled: bool = True) -> None:
        self.epochs, self.enabled = epochs, enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start_epoch(self, epoch: int, batches: int) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task("", total=batches * self.epochs, stats="", completed=epoch * batches)
        self._progress.update(self._task, description=f"epoch {epoch + 1}/{self.epochs}")

    def advance(self, loss: float, images_per_second: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, stats=f"loss {loss:.3f} {images_per_second:.0f} img/s")

    @contextmanager
    def step(self, description: str, total: int) -> Iterator[Advance]:
        """A second, transient bar in the same display (validation inside a run)."""
        if self._progress is None:
            yield lambda: None
            return
        task = self._progress.add_task(description, total=total, stats="")
        try:
            yield lambda: self._progress.advance(task)
        finally:
            self._progress.remove_task(task)

    def end_epoch(self, record: dict[str, Any]) -> None:
        if self._progress is not None and "val_top1" in record:
            self._progress.console.print(
                f"epoch {record['epoch']}: train loss {record['train_loss']:.3f}, "
                f"val loss {record['val_loss']:.3f}, val top-1 {record['val_top1']:.1f}%"
            )


def print_summary(metrics: dict[str, Any], output: Path) -> None:
    """The run's outcome in at most 100 columns, saying which images each number is on."""
    from rich.console import Console
    from rich.table import Table

    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}%"

    splits = metrics.get("splits") or {}

    def on(role: str) -> str:
        return f" on {splits[role]['split']}" if role in splits else ""

    table = Table(title=f"{metrics['method']} on {metrics['dataset']}", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    kept_val = f"{pct(metrics['best_val_top1'])} (epoch {metrics['best_epoch']}){on('val')}"
    selection = (metrics.get("selection") or {}).get("why")
    rows = [
        ("model", metrics["model"]),
        ("trainable", f"{metrics['trainable_params']:,} ({metrics['trainable_percent']:.3f}%)"),
        ("test top-1", pct(metrics["test_top1"]) + on("test")),
        ("test top-5", pct(metrics["test_top5"])),
        ("kept epoch's val top-1", kept_val if "val" in splits or metrics["best_val_top1"] is not None else "- (no validation)"),
        *((("selection", selection),) if selection else ()),
        *((("head start", _head_start(metrics["head_init"])),) if metrics.get("head_init") else ()),
        *((f"{role} images", f"{split['split']}: {split['about']} ({split['images']:,})") for role, split in splits.items()),
        ("preprocessing", {"crop": "the model's eval transform (resize, centre crop)",
                           "squash": "whole image resized to the input size (VTAB-1k)"}.get(metrics.get("resize") or "", "-")),
        ("adapter size", f"{metrics['adapter_bytes'] / 1e3:,.1f} KB"),
        ("wall time (train)", f"{metrics['train_seconds']:.1f} s, {metrics['images_per_second']:.0f} img/s"),
        ("peak memory", f"{metrics['peak_memory_mb']:.0f} MB"),
        ("output", str(output)),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    Console(width=min(100, Console().width) if Console().is_terminal else 100).print(table)


def _head_start(head_init: dict[str, Any]) -> str:
    """One line on where the head started: the linear probe (LP-FT) and its fit, or timm's random init."""
    ratio = head_init.get("lr_ratio", 1.0)
    trains = "" if ratio == 1 else ("; kept as fitted (head lr 0)" if ratio == 0 else f"; head lr x {ratio:g}")
    if head_init.get("init") != "probe":
        return "random (timm's init)" + trains
    scale = head_init.get("scale", 1.0)
    softened = "" if scale == 1 else f"; its logits x {scale:g}"
    return (head_init.get("about") or "linear probe on the frozen features") + softened + trains


class GracefulInterrupt:
    """Turn the first Ctrl-C / SIGTERM into a flag the training loop checks between steps (so it stops
    on a finished step with its checkpoint intact); a second one aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulInterrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class RunsProgress:
    """A comparison's live line (done / running / failed / ETA) over one printed line per finished run.

    Engines report what they submit and what finishes; `slots` is how many runs can execute at once, so
    runs beyond it count as queued rather than running. The ETA extrapolates from runs that actually
    trained: skipped (already finished) runs complete instantly and would make it far too hopeful.
    """

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled, self.slots = total, enabled, 1
        self.done = self.failed = self.in_flight = self.trained = 0
        self._progress: Any = None
        self._task: Any = None
        self._start = 0.0

    def __enter__(self) -> "RunsProgress":
        import time

        self._start = time.monotonic()
        return self

    def _live(self) -> Any:
        """The rich line, shown from the first news on: an engine that fails to start leaves one error line."""
        if self._progress is None and self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                TextColumn("[bold]runs"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[state]}"),
                TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
                console=Console(stderr=True), transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("", total=self.total, state="", eta="-")
        return self._progress

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def submitted(self) -> None:
        self.in_flight += 1
        self._refresh()

    def finished(self, row: dict[str, Any], submitted: bool = True) -> None:
        """`row` came back (from a submitted run, or found finished without submitting it)."""
        self.done += 1
        self.in_flight -= submitted
        self.failed += row["status"] == "failed"
        self.trained += row["status"] in ("ran", "resumed")
        self.note(_run_line(row, self.done, self.total), markup=True)
        self._refresh()

    def note(self, text: str, markup: bool = False) -> None:
        """A line above the live one (the engine's own news: cluster, file mode)."""
        if self._live() is not None:
            self._progress.console.print(text, soft_wrap=True, markup=markup, highlight=False)

    def _refresh(self) -> None:
        if self._live() is None:
            return
        import time

        running = min(self.in_flight, self.slots)
        state = f"{running} running, {self.in_flight - running} queued, {self.failed} failed"
        eta = "-"
        left = self.total - self.done
        if self.trained and left:
            seconds = (time.monotonic() - self._start) / self.trained * left
            eta = f"{int(seconds // 60)}:{int(seconds % 60):02d}"
        self._progress.update(self._task, completed=self.done, state=state, eta=eta if left else "0:00")


def _run_line(row: dict[str, Any], i: int, n: int) -> str:
    from rich.markup import escape  # task specs are paths: text, not rich markup

    wd = f", wd {row['weight_decay']:g}" if row["kind"] == "search" else ""  # grid points differ by it too
    what = escape(f"[{i}/{n}] {row['kind']} {row['method']} on {row['task']} (seed {row['seed']}, lr {row['lr']:g}{wd})")
    if row["status"] == "failed":
        return f"{what}: [red]failed[/red]: {escape(row.get('error') or '')}"
    score = row.get("test_top1") if row["kind"] == "final" else row.get("best_val_top1")
    label = "test" if row["kind"] == "final" else "val"
    return f"{what}: {row['status']}, {label} top-1 {score:.1f}%" if score is not None else f"{what}: {row['status']}"
