"""What a run shows while it works: a live bar in a terminal, plain lines anywhere else, and
where its seconds went.

The server reports through :class:`Progress`: ``begin`` and ``advance`` for each exchange (one
bar per phase with clients done, the elapsed time and an estimate of what is left, and the
running mean train loss), ``round_done`` when a round's rows are written, ``note`` for what a
user should always see (the task graph, a client that failed, resuming) and ``detail`` for the
per-client lines that ``-v`` adds. ``mira run`` marks its own phases with ``phase`` (checks,
engine start, shutdown, report). In a terminal :class:`LiveProgress` draws the bars with rich
and prints every line as text, never as rich markup (``[round 1/2]`` stays). Elsewhere (CI, a
log file, ``flwr run``'s stream) :class:`PlainProgress` prints plain lines without control
characters, and a heartbeat line (clients done of the exchange's total, or the start-up step
under way) whenever nothing was printed for ``HEARTBEAT_SECONDS``: a round of the real model
takes minutes, and a log that stays silent that long looks hung.

Where the time goes (:class:`Timeline`): every call is stamped on the display's clock, so the
phases of a run are known as it goes; ``mira run -v`` prints them and run.json keeps them
(``startup``). The estimate of what is left (:func:`seconds_left`) covers the rounds still to
come, the final evaluation and the wrap-up (stopping the engine, the report), not the rounds
alone: a short run is mostly its fixed cost.
"""

from __future__ import annotations

import itertools
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

HEARTBEAT_SECONDS = 30.0
"""Longest silence of plain output during an exchange or a start-up step."""

WRAP_UP_SECONDS = 4.0
"""Estimate of what follows the final evaluation in ``mira run``: stopping the engine, the final
table and the report (docs/startup.md measures it)."""

FINAL_EVALUATION = "final evaluation"
ROUND_PREFIX = "round "
"""How the server names its last exchange and its round exchanges ('round 3')
(:func:`mira.federation.server.run_federation`)."""

PHASES = {
    "imports": "starting mira",
    "preflight": "checking the data, the model and the config",
    "engine": "starting Flower's SuperLink and simulation process",
    "clients_start": "starting Ray and the client processes",
    "model_load": "a client process loads the base model and answers for its first client",
    "identify": "the other clients' identities (and fingerprints), the task graph",
    "rounds": "training rounds",
    "final_evaluation": "final evaluation",
    "shutdown": "stopping the engine",
    "report": "writing the final table and the report",
}
"""The phases of one ``mira run``, in order, and what a user is told of each. Everything before
``rounds`` is the start-up; ``rounds`` is the only part that grows with the number of rounds."""

STARTUP = ("imports", "preflight", "engine", "clients_start", "model_load", "identify")

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
"""Terminal control sequences (CSI, OSC, two-character escapes) a message may carry, such as
a coloured log line relayed in a client's error."""


def plain_text(text: str) -> str:
    """``text`` without terminal control sequences."""
    return _ANSI.sub("", text)


# ---------------------------------------------------------------------------- where time goes
class Timeline:
    """The phases of a run (:data:`PHASES`) with the time each began, on one clock."""

    def __init__(self, clock: Callable[[], float], start: float | None = None):
        self._clock = clock
        self.start = clock() if start is None else start
        self.marks: list[tuple[str, float]] = []

    @property
    def current(self) -> str | None:
        return self.marks[-1][0] if self.marks else None

    def mark(self, phase: str, at: float | None = None) -> None:
        """``phase`` begins now (or at ``at``); the phase before it ends there."""
        self.marks.append((phase, self._clock() if at is None else at))

    def seconds(self, now: float | None = None) -> dict[str, float]:
        """Seconds spent in each phase so far (a phase entered twice adds up), in order of
        first entry; the phase under way counts up to ``now``. The time before the first mark
        counts as ``imports``."""
        now = self._clock() if now is None else now
        spent: dict[str, float] = {}
        edges = [("imports", self.start), *self.marks, ("", now)]
        for (phase, began), (_, ended) in itertools.pairwise(edges):
            spent[phase] = spent.get(phase, 0.0) + max(0.0, ended - began)
        return spent


def startup_record(seconds: dict[str, float]) -> dict[str, float]:
    """run.json's ``startup``: seconds per phase (:data:`PHASES`), rounded to 0.1 s, then
    ``to_round_1`` (every phase before the rounds), ``fixed`` (everything but the rounds) and
    ``total``."""
    record = {phase: round(seconds[phase], 1) for phase in PHASES if phase in seconds}
    total = sum(seconds.values())
    record["to_round_1"] = round(sum(seconds.get(p, 0.0) for p in STARTUP), 1)
    record["fixed"] = round(total - seconds.get("rounds", 0.0), 1)
    record["total"] = round(total, 1)
    return record


def describe_startup(record: dict[str, float]) -> list[str]:
    """The lines ``mira run -v`` prints about where the time went."""
    lines = [
        f"time: {_duration(record['total'])} in all, {_duration(record['to_round_1'])} before "
        f"round 1, {_duration(record['fixed'])} not in rounds"
    ]
    width = max(len(phase) for phase in PHASES)
    for phase, what in PHASES.items():
        if phase in record:
            lines.append(f"  {phase:<{width}} {record[phase]:7.1f} s  {what}")
    return lines


# ---------------------------------------------------------------------------- what is left
@dataclass
class RoundTimes:
    """The seconds of a run's round exchanges so far, for the estimate of what is left.

    Exchange ``first`` of a new run only trains (nothing was evaluated before it); every later
    round exchange evaluates the adapter of the round before and trains; the final evaluation
    only evaluates. So the evaluation's share is what a later round takes beyond the first.
    """

    rounds: int  # the run's last round
    first: int = 1  # the first round of this session (later when resumed)
    seconds: tuple[float, ...] = ()  # each round exchange's seconds, from round ``first`` on

    def round_seconds(self) -> float | None:
        """One more round: the mean of the rounds so far."""
        return sum(self.seconds) / len(self.seconds) if self.seconds else None

    def final_seconds(self) -> float | None:
        """The final evaluation: a later round's mean minus the first (train-only) round when
        both are known and that leaves something, else one round (an evaluation and a
        training: more than the evaluation alone)."""
        if not self.seconds:
            return None
        if self.first == 1 and len(self.seconds) >= 2:
            later = self.seconds[1:]
            evaluation = sum(later) / len(later) - self.seconds[0]
            if evaluation > 0:
                return evaluation
        return self.round_seconds()


def seconds_left(
    times: RoundTimes,
    current: tuple[float, int, int] | None = None,
    in_final: bool = False,
    wrap_up: float = WRAP_UP_SECONDS,
) -> float | None:
    """Seconds left in the run, or None before anything was measured.

    ``times``: the round exchanges finished. ``current``: the exchange under way, as (seconds
    so far, clients done, clients asked); ``in_final``: it is the final evaluation. Left = the
    rest of the current exchange (its pace so far, or the estimate of a whole one less its
    seconds so far) + the rounds not begun (:meth:`RoundTimes.round_seconds` each) + the final
    evaluation unless under way (:meth:`RoundTimes.final_seconds`) + ``wrap_up``.
    """
    whole = times.round_seconds()
    rest = 0.0
    begun = len(times.seconds)
    if current is not None:
        elapsed, done, total = current
        if not in_final:
            begun += 1
        if done > 0:
            paced = elapsed / done * max(0, total - done)
            if whole is None:
                whole = elapsed / done * total  # the first round, from its own pace
            rest = paced
        elif whole is not None:
            expected = times.final_seconds() if in_final else whole
            rest = max(0.0, (expected or whole) - elapsed)
        else:
            return None
    if whole is None:
        return None
    if in_final:
        return rest + wrap_up
    rounds_left = max(0, times.rounds - times.first + 1 - begun)
    return rest + rounds_left * whole + (times.final_seconds() or whole) + wrap_up


# ---------------------------------------------------------------------------- the displays
@dataclass
class _Exchange:
    """The exchange under way: what the heartbeat reports."""

    phase: str
    total: int
    started: float
    done: int = 0
    in_round: bool = False  # a round exchange of this run
    final: bool = False  # the final evaluation


class Progress:
    """Plain lines; the base every progress display derives from.

    ``write`` prints one line (default: stdout, flushed). ``heartbeat``: when nothing was
    printed for that many seconds during an exchange, print ``  <phase>: <done>/<total>
    clients done, <elapsed> so far[, about <left> left]``, and during a start-up step
    ``  <step>: <elapsed> so far``; a background thread checks ``heartbeat / 10`` seconds
    apart, so no silence lasts longer than ``heartbeat``. None: no heartbeat. ``clock`` is the
    time source (tests pass a fake one and call :meth:`tick`); the run's clock starts when the
    display is made (``started`` sets it earlier: ``mira run`` passes its process's start).
    """

    def __init__(
        self,
        verbose: bool = False,
        write: Callable[[str], None] | None = None,
        heartbeat: float | None = HEARTBEAT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        started: float | None = None,
    ):
        self.verbose = verbose
        self._out = write or (lambda text: print(text, flush=True))
        self.heartbeat = heartbeat
        self._clock = clock
        self.timeline = Timeline(clock, started)
        self.times: RoundTimes | None = None  # set when the rounds start
        self._rounds = 0
        self._exchanges = 0  # exchanges begun so far
        self._phase = ""
        self._lock = threading.RLock()  # the heartbeat thread writes too
        self._last_line = clock()
        self._exchange: _Exchange | None = None
        self._beating: tuple[threading.Thread, threading.Event] | None = None

    def _write(self, text: str) -> None:
        with self._lock:
            self._out(plain_text(text))
            self._last_line = self._clock()

    # -- what mira run calls
    def phase(self, name: str) -> None:
        """``mira run``'s own step ``name`` (a key of :data:`PHASES`) begins now."""
        with self._lock:
            self.timeline.mark(name)
        if name in STARTUP:
            self._start_heartbeat()

    # -- what the server calls
    def start_run(self, rounds: int, first: int = 1) -> None:
        with self._lock:
            self._rounds = rounds
            self.times = RoundTimes(rounds, first)
            self.timeline.mark("rounds")

    def begin(self, phase: str, total: int) -> None:
        self._phase = phase
        self._losses: list[float] = []
        with self._lock:
            self._exchanges += 1
            if self.times is None:  # first contact: who are you, then identify
                self.timeline.mark("clients_start" if self._exchanges == 1 else "model_load")
            elif phase == FINAL_EVALUATION:
                self.timeline.mark("final_evaluation")
            self._exchange = _Exchange(
                phase,
                total,
                self._clock(),
                in_round=self.times is not None and phase.startswith(ROUND_PREFIX),
                final=self.times is not None and phase == FINAL_EVALUATION,
            )
        self._start_heartbeat()

    def advance(self, done: int, total: int, train_loss: float | None = None) -> None:
        if train_loss is not None:
            self._losses.append(train_loss)
        with self._lock:
            if self._exchange is not None:
                self._exchange.done, self._exchange.total = done, total
            if self.timeline.current == "model_load":  # the first identity is back
                self.timeline.mark("identify")
        if self.verbose:
            self._write(f"  {self._phase}: {done}/{total} clients done")

    def end(self) -> None:
        """The exchange is over."""
        with self._lock:
            exchange, self._exchange = self._exchange, None
            if exchange is not None and exchange.in_round and self.times is not None:
                seconds = self._clock() - exchange.started
                self.times.seconds = (*self.times.seconds, seconds)
        if self.timeline.current not in STARTUP:
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
        elapsed = self._clock() - self.timeline.start
        left = self.seconds_left() if server_round < self._rounds else None
        self.note(
            f"[round {server_round}/{self._rounds}] train loss "
            f"{_fmt(train_loss)}, personalised eval loss mean "
            f"{_fmt(eval_loss_mean)} worst "
            f"{_fmt(eval_loss_worst)}"
            + (f", {failed} client(s) failed" if failed else "")
            + f" ({_duration(elapsed)} so far"
            + (f", about {_duration(left)} left" if left is not None else "")
            + ")"
        )

    def note(self, text: str) -> None:
        self._write(text)

    def detail(self, text: str) -> None:
        if self.verbose:
            self._write(text)

    def close(self) -> None:
        """Stop drawing (the run ended, well or not)."""
        self._stop_heartbeat()

    # -- the estimate
    def seconds_left(self) -> float | None:
        """What is left of the run (:func:`seconds_left`); None before the rounds, or before
        anything of them was measured."""
        with self._lock:
            if self.times is None:
                return None
            exchange, current, in_final = self._exchange, None, False
            if exchange is not None and (exchange.in_round or exchange.final):
                current = (self._clock() - exchange.started, exchange.done, exchange.total)
                in_final = exchange.final
            return seconds_left(self.times, current, in_final)

    # -- the heartbeat
    def tick(self) -> None:
        """Print the heartbeat line if an exchange or a start-up step is under way and nothing
        was printed for (nine tenths of) ``heartbeat`` seconds; the heartbeat thread calls
        this."""
        if self.heartbeat is None:
            return
        with self._lock:
            exchange, now = self._exchange, self._clock()
            if now - self._last_line < 0.9 * self.heartbeat:
                return
            if exchange is not None:
                left = self.seconds_left()
                self._write(
                    f"  {exchange.phase}: {exchange.done}/{exchange.total} clients done, "
                    f"{_duration(now - exchange.started)} so far"
                    + (f", about {_duration(left)} left in the run" if left is not None else "")
                )
            elif self.timeline.current in STARTUP:
                step, began = self.timeline.marks[-1]
                self._write(f"  {PHASES[step]}: {_duration(now - began)} so far")

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
    """Bars drawn with rich in a terminal: this exchange's clients, and the whole run with the
    estimate of what is left (:func:`seconds_left`)."""

    def __init__(
        self, verbose: bool = False, stream: TextIO | None = None, started: float | None = None
    ):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as RichProgress

        self.console = Console(file=stream or sys.stdout)
        # Every line is text, not markup: '[round 1/2]' would otherwise be read as a style tag
        # and vanish. The bars show time passing, so no heartbeat.
        super().__init__(
            verbose,
            write=lambda text: self.console.print(_escape(text)),
            heartbeat=None,
            started=started,
        )
        self._bars = RichProgress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[left]}"),
            console=self.console,
            transient=False,
        )
        self._bars.start()
        self._run_bar: Any = None
        self._bar: Any = None

    def _show_left(self) -> None:
        if self._run_bar is not None:
            left = self.seconds_left()
            text = f"about {_duration(left)} left" if left is not None else ""
            self._bars.update(self._run_bar, left=text)

    def start_run(self, rounds: int, first: int = 1) -> None:
        super().start_run(rounds, first)
        self._run_bar = self._bars.add_task(
            "run", total=rounds, completed=first - 1, loss="", left="", visible=True
        )

    def begin(self, phase: str, total: int) -> None:
        super().begin(phase, total)
        if self._bar is not None:
            self._bars.remove_task(self._bar)
        self._bar = self._bars.add_task(_escape(phase), total=total, loss="", left="")

    def advance(self, done: int, total: int, train_loss: float | None = None) -> None:
        super().advance(done, total, train_loss)
        if self._bar is not None:
            losses = self._losses
            loss = f"train loss {sum(losses) / len(losses):.4f}" if losses else ""
            self._bars.update(self._bar, completed=done, total=total, loss=loss)
        self._show_left()

    def end(self) -> None:
        super().end()
        if self._bar is not None:
            self._bars.remove_task(self._bar)
            self._bar = None
        self._show_left()

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


def progress_for(
    verbose: bool, stream: TextIO | None = None, started: float | None = None
) -> Progress:
    """A live display in a terminal, plain lines with a heartbeat anywhere else; the run's
    clock starts at ``started`` (default: now)."""
    out = stream or sys.stdout
    if out.isatty():
        return LiveProgress(verbose, out, started=started)
    return Progress(verbose, started=started)


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
