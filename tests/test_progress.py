"""What a run prints while it works: the lines in a terminal keep their brackets, and piped
output gets a heartbeat during a long exchange and no control characters."""

from __future__ import annotations

import io
import time

import pytest

from mira.federation.progress import LiveProgress, Progress, plain_text, progress_for

AGGREGATE = (0.5, 1.25, 2.0)  # mean train loss, mean and worst personalised eval loss
ROUND_LINE = "[round 1/2] train loss 0.5000, personalised eval loss mean 1.2500 worst 2.0000"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drive(progress: Progress) -> None:
    progress.start_run(2)
    progress.begin("round 1", 3)
    progress.advance(1, 3, 0.5)
    progress.end()
    progress.round_done(1, *AGGREGATE)
    progress.note("client [bold]qa-0[/bold] failed: \x1b[31mCUDA out of memory\x1b[0m")
    progress.close()


@pytest.mark.parametrize("terminal", [False, True])
def test_live_lines_are_text_not_rich_markup(terminal: bool, monkeypatch) -> None:
    # FORCE_COLOR makes rich treat the StringIO as a colour terminal, as a real one is
    if terminal:
        monkeypatch.setenv("FORCE_COLOR", "1")
    else:
        monkeypatch.delenv("FORCE_COLOR", raising=False)
    stream = io.StringIO()
    progress = LiveProgress(stream=stream)
    assert progress.console.is_terminal is terminal
    drive(progress)
    out = stream.getvalue()
    assert ("\x1b[" in out) is terminal  # colours only in a terminal
    text = plain_text(out)
    assert ROUND_LINE in text  # not ' train loss ...': the bracket survives
    assert "client [bold]qa-0[/bold] failed: CUDA out of memory" in text


def test_plain_lines_have_no_control_characters() -> None:
    lines: list[str] = []
    drive(Progress(write=lines.append, heartbeat=None))
    assert lines[0].startswith(ROUND_LINE + " (")
    assert lines[1] == "client [bold]qa-0[/bold] failed: CUDA out of memory"
    assert not any("\x1b" in line for line in lines)


def test_piped_output_gets_a_heartbeat_during_a_long_exchange() -> None:
    clock, lines = FakeClock(), []
    progress = Progress(write=lines.append, heartbeat=30.0, clock=clock)
    progress.start_run(2)
    progress.begin("round 1", 9)
    clock.now += 10
    progress.advance(2, 9, 0.7)  # not verbose: prints nothing
    clock.now += 16
    progress.tick()
    assert lines == []  # 26 s of silence
    clock.now += 2
    progress.tick()
    assert lines == ["  round 1: 2/9 clients done, 28s so far"]
    clock.now += 20
    progress.tick()
    assert len(lines) == 1  # 20 s since the last line
    progress.advance(5, 9)
    clock.now += 80
    progress.tick()
    assert lines[-1] == "  round 1: 5/9 clients done, 2m08s so far"
    progress.end()
    clock.now += 100
    progress.tick()
    assert len(lines) == 2  # between exchanges: the server's own lines, no heartbeat
    progress.begin("final evaluation", 9)
    clock.now += 20
    progress.note("a note")  # any line restarts the count
    clock.now += 20
    progress.tick()
    assert lines[-1] == "a note"
    clock.now += 10
    progress.tick()
    assert lines[-1] == "  final evaluation: 0/9 clients done, 50s so far"
    progress.close()


def test_the_heartbeat_thread_prints_in_real_time_and_stops_with_the_exchange() -> None:
    lines: list[str] = []
    progress = Progress(write=lines.append, heartbeat=0.2)
    progress.begin("round 3", 4)
    progress.advance(1, 4)
    time.sleep(0.75)
    progress.end()
    beats = list(lines)
    assert 2 <= len(beats) <= 5, beats
    assert all(line.startswith("  round 3: 1/4 clients done, ") for line in beats)
    time.sleep(0.4)
    assert lines == beats  # nothing after the exchange ended
    progress.close()


def test_progress_for_a_pipe_is_plain_with_a_heartbeat() -> None:
    piped = progress_for(False, io.StringIO())
    assert type(piped) is Progress and piped.heartbeat == 30.0

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    live = progress_for(False, Terminal())
    assert isinstance(live, LiveProgress) and live.heartbeat is None
    live.close()
