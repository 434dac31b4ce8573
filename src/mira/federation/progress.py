"""What a run shows while it works: a live bar in a terminal, plain lines anywhere else.

The server reports through :class:`Progress`: ``begin`` and ``advance`` for each exchange (one
bar per phase with clients done, the elapsed time and an estimate of what is left, and the
running mean train loss), ``round_done`` when a round's rows are written, ``note`` for what a
user should always see (the task graph, a client that failed, resuming) and ``detail`` for the
per-client lines that ``-v`` adds. In a terminal :class:`LiveProgress` draws the bars with rich
and prints every line as text, never as rich markup (``[round 1/2]`` stays). Elsewhere (CI, a
log file, ``flwr run``'s stream) :class:`PlainProgress` prints plain lines without control
characters, and a heartbeat line (clients done of the exchange's total) whenever an exchange
has printed nothing for ``HEARTBEAT_SECONDS``: a round of the real model takes minutes, and a
log that stays silent that long looks hung.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

HEARTBEAT_SECONDS = 30.0
"""Longest silence of plain output during an exchange."""
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
"""Terminal control sequences (CSI, OSC, two-character escapes) a message may carry, such as
a coloured log line relayed in a client's error."""


def plain_text(text: str) -> str:
    """``text`` without terminal control sequences."""
    return _ANSI.sub("", text)


@dataclass
class _Exchange:
    """The exchange under way: what the heartbeat reports."""

    phase: str
    total: int
    started: float
    done: int = 0


class Progress:
    """Plain lines; the base every progress display derives from.

    ``write`` prints one line (default: stdout, flushed). ``heartbeat``: during an exchange
    that has printed nothing for that many seconds, print ``  <phase>: <done>/<total> clients
    done, <elapsed> so far``; a background thread checks ``heartbeat / 10`` seconds apart, so
    no silence lasts longer than ``heartbeat``. None: no heartbeat. ``clock`` is the time
    source (tests pass a fake one and call :meth:`tick`).
    """

    def __init__(
        self,
        verbose: bool = False,
        write: Callable[[str], None] | None = None,
        heartbeat: float | None = HEARTBEAT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.verbose = verbose
        self._out = write or (lambda text: print(text, flush=True))
        self.heartbeat = heartbeat
        self._clock = clock
        self._rounds = 0
        self._started = clock()
        self._phase = ""
        self._lock = threading.RLock()  # the heartbeat thread writes too
        self._last_line = clock()
        self._exchange: _Exchange | None = None
        self._beating: tuple[threading.Thread, threading.Event] | None = None

    def _write(self, text: str) -> None:
        with self._lock:
            self._out(plain_text(text))
            self._last_line = self._clock()

    # -- what the server calls
    def start_run(self, rounds: int, first: int = 1) -> None:
        self._rounds = rounds
        self._first = first
        self._started = self._clock()

    def begin(self, phase: str, total: int) -> None:
        self._phase = phase
        self._losses: list[float] = []
        with self._lock:
            self._exchange = _Exchange(phase, total, self._clock())
        self._start_heartbeat()

    def advance(self, done: int, total: int, train_loss: float | None = None) -> None:
        if train_loss is not None:
            self._losses.append(train_loss)
        with self._lock:
            if self._exchange is not None:
                self._exchange.done, self._exchange.total = done, total
        if self.verbose:
            self._write(f"  {self._phase}: {done}/{total} clients done")

    def end(self) -> None:
        """The exchange is over."""
        with self._lock:
            self._exchange = None
        self._stop_heartbeat()

    def round_done(
        self,
        server_round: int,
        train_loss: float | None,
        eval_loss_mean: float | None,
        eval_loss_worst: float | None,
        failed: int = 0,
    ) -> None:
        """Round ``server_round``'s rows are written: its mean train loss, the mean and worst
        personalised eval loss over clients, and how many clients failed."""
        elapsed = self._clock() - self._started
        left = ""
        done = server_round - getattr(self, "_first", 1) + 1
        remaining = self._rounds - server_round
        if done > 0 and remaining > 0:
            left = f", about {_duration(elapsed / done * remaining)} left"
        self.note(
            f"[round {server_round}/{self._rounds}] train loss "
            f"{_fmt(train_loss)}, personalised eval loss mean "
            f"{_fmt(eval_loss_mean)} worst "
            f"{_fmt(eval_loss_worst)}"
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
        self._stop_heartbeat()

    # -- the heartbeat
    def tick(self) -> None:
        """Print the heartbeat line if an exchange is under way and nothing was printed for
        (nine tenths of) ``heartbeat`` seconds; the heartbeat thread calls this."""
        if self.heartbeat is None:
            return
        with self._lock:
            exchange, now = self._exchange, self._clock()
            if exchange is None or now - self._last_line < 0.9 * self.heartbeat:
                return
            self._write(
                f"  {exchange.phase}: {exchange.done}/{exchange.total} clients done, "
                f"{_duration(now - exchange.started)} so far"
            )

    def _start_heartbeat(self) -> None:
        if self.heartbeat is None or self._beating is not None:
            return
        stop = threading.Event()
        thread = threading.Thread(
            target=self._beat, args=(stop, self.heartbeat / 10), name="mira-heartbeat", daemon=True
        )
        self._beating = (thread, stop)
        thread.start()

    def _beat(self, stop: threading.Event, every: float) -> None:
        while not stop.wait(every):
            self.tick()

    def _stop_heartbeat(self) -> None:
        beating, self._beating = self._beating, None
        if beating is not None:
            thread, stop = beating
            stop.set()
            if thread is not threading.current_thread():
                thread.join(timeout=5)


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
        # Every line is text, not markup: '[round 1/2]' would otherwise be read as a style tag
        # and vanish. The bars show time passing, so no heartbeat.
        super().__init__(
            verbose, write=lambda text: self.console.print(_escape(text)), heartbeat=None
        )
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
        self._bar = self._bars.add_task(_escape(phase), total=total, loss="")

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

    def round_done(
        self,
        server_round: int,
        train_loss: float | None,
        eval_loss_mean: float | None,
        eval_loss_worst: float | None,
        failed: int = 0,
    ) -> None:
        super().round_done(server_round, train_loss, eval_loss_mean, eval_loss_worst, failed)
        if self._run_bar is not None:
            self._bars.update(self._run_bar, completed=server_round)

    def close(self) -> None:
        super().close()
        self._bars.stop()


def progress_for(verbose: bool, stream: TextIO | None = None) -> Progress:
    """A live display in a terminal, plain lines with a heartbeat anywhere else."""
    out = stream or sys.stdout
    if out.isatty():
        return LiveProgress(verbose, out)
    return Progress(verbose)


def _escape(text: str) -> str:
    """``text`` as rich markup that shows it as it is."""
    from rich.markup import escape

    return escape(plain_text(text))


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
