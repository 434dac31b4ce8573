"""Nothing of a run outlives it: a watchdog process that ends the run's helper processes when
the process that started them is gone, however it went (SIGKILL included).

The Simulation Engine starts Ray's helper processes (its store, its scheduler, one worker per
client process, about 1.2 GB together) as descendants of the ``mira`` process. A process
killed with SIGKILL runs no clean-up, so :func:`guard` starts this module as a separate
process in its own session that holds the read end of a pipe: while the run lives, it notes
the run's descendants every second; when the pipe closes (the run ended, or was killed) it
sends them SIGTERM, then SIGKILL to those still there a few seconds later. A process is only
signalled if it is still the one noted (same pid and start time), never a stranger that
reused a pid.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from typing import IO

import psutil

GRACE_SECONDS = 5.0
POLL_SECONDS = 1.0


def guard() -> IO[bytes]:
    """Start the watchdog for this process; closing the returned pipe (or dying) ends it."""
    # Processes this one had started before the run are not the run's (a test runner's
    # helpers, a tracking service): they are left alone.
    before = [str(p.pid) for p in psutil.Process().children(recursive=True)]
    watcher = subprocess.Popen(
        [sys.executable, "-m", "mira.federation.watchdog", str(os.getpid()), *before],
        stdin=subprocess.PIPE,
        start_new_session=True,  # a signal to the run's process group does not reach it
    )
    assert watcher.stdin is not None
    return watcher.stdin


def _descendants(pid: int) -> dict[int, float]:
    try:
        return {p.pid: p.create_time() for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _alive(pid: int, created: float) -> psutil.Process | None:
    try:
        process = psutil.Process(pid)
        return process if process.create_time() == created else None
    except psutil.Error:
        return None


def watch(parent: int, stream: IO[bytes], spare: set[int] | None = None) -> None:
    """Note ``parent``'s descendants until ``stream`` ends, then end them (all but ``spare``)."""
    noted: dict[int, float] = {}
    spare = {os.getpid(), *(spare or set())}
    while True:
        noted.update(_descendants(parent))
        for pid in spare:
            noted.pop(pid, None)
        ready, _, _ = select.select([stream], [], [], POLL_SECONDS)
        if ready and not stream.read(1):
            break
    left = [p for pid, created in noted.items() if (p := _alive(pid, created)) is not None]
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    _gone, still = psutil.wait_procs(left, timeout=GRACE_SECONDS)
    for process in still:
        with contextlib.suppress(psutil.Error):
            process.kill()


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.stdin.buffer, {int(pid) for pid in sys.argv[2:]})
