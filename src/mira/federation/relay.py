"""What a ServerApp running in Flower's simulation process tells the ``mira run`` that started
it: its progress as it happens, and how it ended.

``mira run`` hands the ServerApp the path of a relay file (run config ``relay``). The ServerApp
reports through :class:`RelayProgress`, which writes one JSON line per
:class:`~mira.federation.progress.Progress` call, and ends the file with its outcome: ``done``,
or the exception it raised, pickled, so that the caller raises the same type with the same
message (``FederationError``, ``ConfigError``, ``RunDirError``, ...). :class:`RelayReader`
reads the file as it grows and replays each call on the caller's own display.
"""

from __future__ import annotations

import base64
import json
import pickle
import traceback
from pathlib import Path
from typing import Any

from mira.federation.progress import Progress
from mira.federation.server import FederationError

# The Progress calls a ServerApp makes (mira.federation.server); each is replayed as is.
CALLS = ("start_run", "begin", "advance", "end", "round_done", "note", "detail")


class RelayProgress(Progress):
    """A :class:`Progress` that writes every call to the relay file instead of a terminal."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    def _send(self, entry: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")

    def _call(self, name: str, *args: Any) -> None:
        self._send({"call": name, "args": list(args)})

    def start_run(self, rounds: int, first: int = 1) -> None:
        self._call("start_run", rounds, first)

    def begin(self, phase: str, total: int) -> None:
        self._call("begin", phase, total)

    def advance(self, done: int, total: int, train_loss: float | None = None) -> None:
        self._call("advance", done, total, train_loss)

    def end(self) -> None:
        self._call("end")

    def round_done(
        self,
        server_round: int,
        train_loss: float | None,
        eval_loss_mean: float | None,
        eval_loss_worst: float | None,
        failed: int = 0,
    ) -> None:
        self._call("round_done", server_round, train_loss, eval_loss_mean, eval_loss_worst, failed)

    def note(self, text: str) -> None:
        self._call("note", text)

    def detail(self, text: str) -> None:
        self._call("detail", text)

    def finish(self, error: BaseException | None = None) -> None:
        """The last line: the run is done, or ``error`` stopped it."""
        if error is None:
            self._send({"done": True})
            return
        try:
            pickled = base64.b64encode(pickle.dumps(error)).decode("ascii")
        except Exception:  # an exception that does not pickle still reaches the caller as text
            pickled = ""
        self._send(
            {
                "error": pickled,
                "text": f"{type(error).__name__}: {error}",
                "traceback": "".join(traceback.format_exception(error)),
            }
        )


class RelayReader:
    """Reads a relay file as the ServerApp writes it and replays it on ``progress``."""

    def __init__(self, path: Path, progress: Progress):
        self.path = Path(path)
        self.progress = progress
        self.done = False
        self.error: BaseException | None = None
        self._offset = 0
        self._partial = ""

    def poll(self) -> None:
        """Replay every complete line written since the last poll."""
        if not self.path.is_file():
            return
        with self.path.open() as handle:
            handle.seek(self._offset)
            text = handle.read()
            self._offset = handle.tell()
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()  # a line still being written
        for line in lines:
            if line.strip():
                self._replay(json.loads(line))

    @property
    def ended(self) -> bool:
        """The ServerApp wrote its outcome."""
        return self.done or self.error is not None

    def _replay(self, entry: dict[str, Any]) -> None:
        if "call" in entry:
            if entry["call"] in CALLS:
                getattr(self.progress, entry["call"])(*entry["args"])
        elif entry.get("done"):
            self.done = True
        elif "error" in entry:
            self.error = _unpickle(entry)


def _unpickle(entry: dict[str, Any]) -> BaseException:
    error: BaseException
    try:
        error = pickle.loads(base64.b64decode(entry["error"]))
        if not isinstance(error, BaseException):
            raise TypeError(type(error).__name__)
    except Exception:
        error = FederationError(f"the ServerApp failed: {entry.get('text', '')}")
    error.add_note(f"raised in the ServerApp's process:\n{entry.get('traceback', '')}")
    return error
