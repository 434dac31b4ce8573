"""The two ways onto Flower's Simulation Engine with the tiny model: `mira run` (its own
SuperLink, the ServerApp's progress relayed back) and `flwr run .` (the run config's dotted
keys, the report and final table written by the ServerApp)."""

from __future__ import annotations

import re
import subprocess
import tomllib
import warnings
from pathlib import Path

import pytest
import tomli_w

from mira.federation.progress import Progress
from mira.federation.simulation import CONNECTION, LocalSuperLink, run_simulation
from mira.results.rundir import read_metrics
from mira.results.schema import ReportFiles, RunLayout

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A line of Flower's logger ("WARNING :   ...", "DEBUG 2026-...: ..."), also from a Ray actor.
FLOWER_LOG_LINE = re.compile(r"^(?:\(\w+ pid=\d+\)\s*)?(?:DEBUG|INFO|WARNING|ERROR)\b")


class RoundsSeen(Progress):
    """Keeps what the relay replays at the end of each round."""

    def __init__(self) -> None:
        super().__init__(verbose=True)
        self.rounds: dict[int, tuple[float | None, float | None]] = {}

    def round_done(
        self,
        server_round: int,
        train_loss: float | None,
        eval_loss_mean: float | None,
        eval_loss_worst: float | None,
        failed: int = 0,
    ) -> None:
        super().round_done(server_round, train_loss, eval_loss_mean, eval_loss_worst, failed)
        self.rounds[server_round] = (eval_loss_mean, train_loss)


def test_mira_run_emits_no_flower_deprecation_and_relays_every_round(
    tiny_config, tmp_path, capfd, monkeypatch
):
    superlink_logs: list[str] = []
    stop = LocalSuperLink.stop

    def keep_log_then_stop(link: LocalSuperLink, *args: float) -> None:
        stop(link, *args)
        superlink_logs.append(link.log.read_text(errors="replace"))

    monkeypatch.setattr(LocalSuperLink, "stop", keep_log_then_stop)
    cfg = tiny_config()
    seen = RoundsSeen()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_simulation(cfg, tmp_path, verbose=True, progress=seen)
    # Everything Flower said: its stream (simulation process, Ray's actors, the CLI) and the
    # SuperLink's own log.
    printed = ANSI.sub("", "".join([*capfd.readouterr(), *superlink_logs]))
    assert "Starting Flower SuperLink" in printed
    # verbose: Flower's own logs (the simulation process's, Ray's actors') reached us.
    assert "Starting Flower Simulation" in printed, printed[-3000:]
    assert "DEPRECATED" not in printed
    flower_lines = [line for line in printed.splitlines() if FLOWER_LOG_LINE.match(line)]
    assert flower_lines and not [line for line in flower_lines if "deprecat" in line.lower()]
    from_flower = [w for w in caught if "flwr" in w.filename or "Flower" in str(w.message)]
    assert not from_flower, [str(w.message) for w in from_flower]
    # The rounds shown here are the rounds written there.
    rows = {r.round: r for r in read_metrics(tmp_path).rounds}
    assert sorted(seen.rounds) == sorted(rows) == [1, 2]
    for server_round, shown in seen.rounds.items():
        row = rows[server_round]
        recorded = (row.personalised_eval_loss_mean, row.train_loss_mean)
        assert shown == pytest.approx(recorded, rel=1e-12)


def _flwr_run(link: LocalSuperLink, run_config: str, cwd: Path) -> str:
    done = subprocess.run(
        [
            "flwr",
            *("run", str(ROOT), CONNECTION),
            *("--run-config", run_config),
            *("--federation-config", "num-supernodes=4"),
            "--stream",
        ],
        env=link.env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = ANSI.sub("", done.stdout + done.stderr)
    assert done.returncode == 0, output[-3000:]
    return output


def test_flwr_run_takes_dotted_keys_and_writes_the_report(tiny_config, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(tiny_config().to_dict()))  # 2 rounds, method mira
    out = tmp_path / "out"
    run_config = f"config='{config}' out='{out}' federation.rounds=1 server.method='fedit'"
    (tmp_path / "link").mkdir()
    with LocalSuperLink(tmp_path / "link") as link:
        stream = _flwr_run(link, run_config, tmp_path)
        written = tomllib.loads(RunLayout(out).config.read_text())
        assert (written["federation"]["rounds"], written["server"]["method"]) == (1, "fedit")
        assert ReportFiles(out).report_md.is_file() and ReportFiles(out).report_html.is_file()
        report = ReportFiles(out)
        assert f"report: {report.report_md} and {report.report_html}" in stream
        assert "Personalised eval loss after round 1" in stream
        # The libraries' output stays off the stream (tests/unit/federation/test_quiet_apps.py).
        assert "Loading weights" not in stream and "FutureWarning" not in stream, stream
        clients = read_metrics(out).clients
        assert {r.round for r in clients} == {1} and len(clients) == 4
        for row in clients:  # the final table shows each client's loss
            assert re.search(rf"\| {row.client} .*{row.eval_loss:.3f}", stream), row

        # The same folder again: refused, nothing written over.
        before = RunLayout(out).metrics.read_text()
        again = _flwr_run(link, run_config, tmp_path)
        assert "already holds a run" in again, again[-3000:]
        assert RunLayout(out).metrics.read_text() == before
