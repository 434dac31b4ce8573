"""What a run prints while it works: the lines in a terminal keep their brackets, piped
output gets a heartbeat during a long exchange or start-up step and no control characters, the
estimate of what is left counts the final evaluation and the wrap-up, and the phases of a run
add up to its time."""

from __future__ import annotations

import io
import time

import pytest

from mira.federation.progress import (
    WRAP_UP_SECONDS,
    LiveProgress,
    Progress,
    RoundTimes,
    Timeline,
    describe_startup,
    plain_text,
    progress_for,
    seconds_left,
    startup_record,
)

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
    # 2 of 9 clients in 28 s: 98 s more for this round, 126 s for round 2, a final
    # evaluation estimated as one round (nothing else measured yet) and the wrap-up: 354 s
    assert WRAP_UP_SECONDS == 4.0
    assert lines == ["  round 1: 2/9 clients done, 28s so far, about 5m54s left in the run"]
    clock.now += 20
    progress.tick()
    assert len(lines) == 1  # 20 s since the last line
    progress.advance(5, 9)
    clock.now += 80
    progress.tick()
    assert lines[-1].startswith("  round 1: 5/9 clients done, 2m08s so far, about ")
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
    # round 1 took 128 s; the final evaluation, estimated as one round, has 78 s left
    assert (
        lines[-1] == "  final evaluation: 0/9 clients done, 50s so far, about 1m22s left in the run"
    )
    progress.close()


def test_the_heartbeat_thread_prints_in_real_time_and_stops_with_the_exchange() -> None:
    lines: list[str] = []
    progress = Progress(write=lines.append, heartbeat=0.2)
    progress.start_run(3, first=3)
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


# ------------------------------------------------------------------------------ the estimate
def test_the_final_evaluation_is_what_a_later_round_takes_beyond_the_first() -> None:
    # Round 1 only trains; rounds 2 and 3 evaluate the round before and train: 4 s of evaluation.
    assert RoundTimes(5, seconds=(10.0, 14.0, 14.0)).final_seconds() == 4.0
    assert RoundTimes(5, seconds=(10.0, 14.0, 14.0)).round_seconds() == pytest.approx(38 / 3)
    # Nothing to tell the evaluation from: one whole round (more than an evaluation alone).
    assert RoundTimes(5, seconds=(10.0,)).final_seconds() == 10.0
    assert RoundTimes(5, seconds=(14.0, 9.0)).final_seconds() == 11.5  # round 1 was slower
    assert RoundTimes(5, first=3, seconds=(14.0, 12.0)).final_seconds() == 13.0  # resumed
    assert RoundTimes(5).final_seconds() is None and RoundTimes(5).round_seconds() is None


def test_what_is_left_counts_the_rounds_the_final_evaluation_and_the_wrap_up() -> None:
    times = RoundTimes(4, seconds=(10.0, 14.0))  # rounds 1 and 2 done: 12 s a round
    # rounds 3 and 4, the final evaluation (14 - 10), the wrap-up
    assert seconds_left(times, wrap_up=3.0) == 2 * 12 + 4 + 3
    # round 3 under way, 1 of 3 clients done in 6 s: 12 s more for it, then round 4
    assert seconds_left(times, (6.0, 1, 3), wrap_up=3.0) == 12 + 12 + 4 + 3
    # round 3 under way, no client done after 5 s: a whole round less those 5 s
    assert seconds_left(times, (5.0, 0, 3), wrap_up=3.0) == 7 + 12 + 4 + 3
    # ... and after 20 s: nothing of it left to count, but not less
    assert seconds_left(times, (20.0, 0, 3), wrap_up=3.0) == 0 + 12 + 4 + 3
    # the final evaluation under way: its rest at its own pace, then the wrap-up
    done = RoundTimes(4, seconds=(10.0, 14.0, 14.0, 14.0))
    assert seconds_left(done, (2.0, 1, 4), in_final=True, wrap_up=3.0) == 6 + 3
    assert seconds_left(done, (1.0, 0, 4), in_final=True, wrap_up=3.0) == 3 + 3


def test_nothing_is_estimated_before_anything_was_measured() -> None:
    assert seconds_left(RoundTimes(3)) is None
    assert seconds_left(RoundTimes(3), (30.0, 0, 9)) is None  # round 1, nobody done yet
    # the first client of round 1 sets the pace of every round: 9 x 10 s a round
    assert seconds_left(RoundTimes(3), (10.0, 1, 9), wrap_up=5.0) == 80 + 2 * 90 + 90 + 5


def test_a_round_line_counts_from_the_start_of_mira_run_and_estimates_the_rest() -> None:
    clock, lines = FakeClock(), []
    progress = Progress(write=lines.append, heartbeat=None, clock=clock, started=clock.now - 40)
    progress.phase("preflight")  # the 40 s before: imports
    clock.now += 20
    progress.phase("engine")
    clock.now += 30
    progress.begin("identify", 2)  # first contact: the client processes start
    clock.now += 25
    progress.end()
    progress.begin("identify", 2)  # each client process loads the model
    clock.now += 10
    progress.advance(1, 2)  # the first identity
    clock.now += 5
    progress.advance(2, 2)
    progress.end()
    progress.start_run(3)
    for server_round, seconds in ((1, 10.0), (2, 14.0)):
        progress.begin(f"round {server_round}", 2)
        clock.now += seconds
        progress.advance(2, 2, 0.5)
        progress.end()
    progress.round_done(1, *AGGREGATE)
    # 40 + 20 + 30 + 25 + 15 + 10 + 14 s so far; round 3 (12 s), the final evaluation (4 s)
    # and the wrap-up left
    assert lines[-1] == f"{ROUND_LINE.replace('1/2', '1/3')} (2m34s so far, about 20s left)"
    progress.begin("round 3", 2)
    clock.now += 12
    progress.end()
    progress.round_done(2, *AGGREGATE)
    # the final evaluation: (14 + 12) / 2 - 10 = 3 s, and the wrap-up
    assert lines[-1].endswith("(2m46s so far, about 7s left)")
    progress.begin("final evaluation", 2)
    clock.now += 3
    progress.end()
    progress.round_done(3, *AGGREGATE)
    assert lines[-1].endswith("(2m49s so far)")  # the last round: no estimate
    progress.phase("shutdown")
    clock.now += 2
    progress.phase("report")
    clock.now += 3
    record = startup_record(progress.timeline.seconds())
    assert record == {
        "imports": 40.0,
        "preflight": 20.0,
        "engine": 30.0,
        "clients_start": 25.0,
        "model_load": 10.0,
        "identify": 5.0,
        "rounds": 36.0,
        "final_evaluation": 3.0,
        "shutdown": 2.0,
        "report": 3.0,
        "to_round_1": 130.0,
        "fixed": 138.0,
        "total": 174.0,
    }
    described = describe_startup(record)
    assert described[0] == "time: 2m54s in all, 2m10s before round 1, 2m18s not in rounds"
    assert described[4] == "  clients_start       25.0 s  starting Ray and the client processes"


def test_a_phase_entered_twice_adds_up() -> None:
    clock = FakeClock()
    timeline = Timeline(clock)
    for phase, seconds in (("preflight", 2.0), ("engine", 3.0), ("preflight", 4.0)):
        timeline.mark(phase)
        clock.now += seconds
    assert timeline.seconds() == {"imports": 0.0, "preflight": 6.0, "engine": 3.0}


def test_piped_output_gets_a_heartbeat_during_a_long_start_up_step() -> None:
    clock, lines = FakeClock(), []
    progress = Progress(write=lines.append, heartbeat=30.0, clock=clock)
    progress.phase("engine")
    clock.now += 26
    progress.tick()
    assert lines == []
    clock.now += 2
    progress.tick()
    assert lines == ["  starting Flower's SuperLink and simulation process: 28s so far"]
    progress.begin("identify", 4)  # the first exchange: the client processes start
    clock.now += 40
    progress.advance(1, 4)
    progress.tick()
    assert lines[-1] == "  identify: 1/4 clients done, 40s so far"  # no estimate yet
    progress.end()
    clock.now += 30
    progress.tick()  # between the two identify exchanges: still start-up
    assert lines[-1] == "  starting Ray and the client processes: 1m10s so far"
    progress.start_run(2)
    clock.now += 60
    progress.tick()  # the rounds have begun, no exchange under way: the server's own lines
    assert len(lines) == 3
    progress.close()
