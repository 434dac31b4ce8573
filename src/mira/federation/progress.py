"""What a run shows while it works: a live bar in a terminal, plain lines anywhere else.

The server reports through :class:`Progress`: ``begin`` and ``advance`` for each exchange (one
bar per phase with clients done, the elapsed time and an estimate of what is left, and the
running mean train loss), ``round_done`` when a round's rows are written, ``note`` for what a
user should always see (the task graph, a client that failed, resuming) and ``detail`` for the
per-client lines that ``-v`` adds. In a terminal :class:`LiveProgress` draws the bars with rich;
elsewhere (CI, a log file, ``flwr run``'s stream) :class:`PlainProgress` prints plain lines
without control characters.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


class Progress:
    """Plain lines; the base every progress display derives from."""

    def __init__(self, verbose: bool = False, write: Callable[[str], None] | None = None):
        self.verbose = verbose
        self._write = write or (lambda text: print(text, flush=True))
        self._rounds = 0
        self._started = time.monotonic()
        self._phase = ""

    # -- what the server calls
    def start_run(self, rounds: int, first: int = 1) -> None:
        self._rounds = rounds
        self._first = first
        self._started = time.monotonic()

    def begin(self, phase: str, total: int) -> None:
        self._phase = phase
        self._losses: list[float] = []

    def advance(self, done: int, total: int, train_loss: float | None = None) -> None:
        if train_loss is not None:
            self._losses.append(train_loss)
        if self.verbose:
            self._write(f"  {self._phase}: {done}/{total} clients done")

    def end(self) -> None:
        """The exchange is over."""

    def round_done(self, server_round: int, aggregate: dict[str, Any]) -> None:
        elapsed = time.monotonic() - self._started
        left = ""
        done = server_round - getattr(self, "_first", 1) + 1
        remaining = self._rounds - server_round
        if done > 0 and remaining > 0:
            left = f", about {_duration(elapsed / done * remaining)} left"
        failed = aggregate.get("clients_failed") or 0
        self.note(
            f"[round {server_round}/{self._rounds}] train loss "
            f"{_fmt(aggregate.get('train_loss_mean'))}, personalised eval loss mean "
            f"{_fmt(aggregate.get('personalised_eval_loss_mean'))} worst "
            f"{_fmt(aggregate.get('personalised_eval_loss_worst'))}"
            + (f", {failed} client(s) failed" if failed else "")
            + f" ({_duration(elapsed)} so far{left})"
        )

    def note(self, text: str) -> None:
        self._write(text)

    def detail(self, text: str) -> None:
        if self.verbose:
            self._write(text)

    def close(self) -> None:
        """Stop drawing (the run ended, well or not)."""


PlainProgress = Progress


class LiveProgress(Progress):
    """Bars drawn with rich in a terminal: this exchange's clients, and the whole run."""

    def __init__(self, verbose: bool = False, stream: TextIO | None = None):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self.console = Console(file=stream or sys.stdout)
        super().__init__(verbose, write=self.console.print)
        self._bars = RichProgress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._bars.start()
        self._run_bar: Any = None
        self._bar: Any = None

    def start_run(self, rounds: int, first: int = 1) -> None:
        super().start_run(rounds, first)
        self._run_bar = self._bars.add_task(
            "run", total=rounds, completed=first - 1, loss="", visible=True
        )

    def begin(self, phase: str, total: int) -> None:
        super().begin(phase, total)
        if self._bar is not None:
            self._bars.remove_task(self._bar)
        self._bar = self._bars.add_task(phase, total=total, loss="")

    def advance(self, done: int, total: int, train_loss: float | None = None) -> None:
        super().advance(done, total, train_loss)
        if self._bar is not None:
            losses = self._losses
            loss = f"train loss {sum(losses) / len(losses):.4f}" if losses else ""
            self._bars.update(self._bar, completed=done, total=total, loss=loss)

    def end(self) -> None:
        if self._bar is not None:
            self._bars.remove_task(self._bar)
            self._bar = None

    def round_done(self, server_round: int, aggregate: dict[str, Any]) -> None:
        super().round_done(server_round, aggregate)
        if self._run_bar is not None:
            self._bars.update(self._run_bar, completed=server_round)

    def close(self) -> None:
        self._bars.stop()


def progress_for(verbose: bool, stream: TextIO | None = None) -> Progress:
    """A live display in a terminal, plain lines anywhere else."""
    out = stream or sys.stdout
    if out.isatty():
        return LiveProgress(verbose, out)
    return Progress(verbose)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
