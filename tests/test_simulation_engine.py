"""The two ways onto Flower's Simulation Engine with the tiny model: `mira run` (its own
SuperLink, the ServerApp's progress relayed back) and `flwr run .` (the run config's dotted
keys, the report and final table written by the ServerApp)."""

from __future__ import annotations

import re
import subprocess
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mira.federation.progress import Progress
from mira.federation.simulation import CONNECTION, LocalSuperLink, run_simulation
from mira.results.rundir import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A line of Flower's logger ("WARNING :   ...", "DEBUG 2026-...: ..."), also from a Ray actor.
FLOWER_LOG_LINE = re.compile(r"^(?:\(\w+ pid=\d+\)\s*)?(?:DEBUG|INFO|WARNING|ERROR)\b")


class RoundsSeen(Progress):
    """Keeps what the relay replays at the end of each round."""

    def __init__(self) -> None:
        super().__init__(verbose=True)
        self.rounds: dict[int, dict[str, Any]] = {}

    def round_done(self, server_round: int, aggregate: dict[str, Any]) -> None:
        super().round_done(server_round, aggregate)
        self.rounds[server_round] = aggregate


def test_mira_run_emits_no_flower_deprecation_and_relays_every_round(
    tiny_config, tmp_path, capfd, monkeypatch
):
    superlink_logs: list[str] = []
    stop = LocalSuperLink.stop

    def keep_log_then_stop(link: LocalSuperLink) -> None:
        stop(link)
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
    rows = {r["round"]: r for r in read_metrics(tmp_path) if r["kind"] == "round"}
    assert sorted(seen.rounds) == sorted(rows) == [1, 2]
    for server_round, aggregate in seen.rounds.items():
        for key in ("personalised_eval_loss_mean", "train_loss_mean"):
            assert aggregate[key] == pytest.approx(rows[server_round][key], rel=1e-12)


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
        written = tomllib.loads((out / "config.toml").read_text())
        assert (written["federation"]["rounds"], written["server"]["method"]) == (1, "fedit")
        assert (out / "report.md").is_file() and (out / "report.html").is_file()
        assert f"report: {out / 'report.md'} and {out / 'report.html'}" in stream
        assert "Personalised eval loss after round 1" in stream
        clients = [r for r in read_metrics(out) if r["kind"] == "client"]
        assert {r["round"] for r in clients} == {1} and len(clients) == 4
        for row in clients:  # the final table shows each client's loss
            assert re.search(rf"\| {row['client']} .*{row['eval_loss']:.3f}", stream), row

        # The same folder again: refused, nothing written over.
        before = (out / "metrics.jsonl").read_text()
        again = _flwr_run(link, run_config, tmp_path)
        assert "already holds a run" in again, again[-3000:]
        assert (out / "metrics.jsonl").read_text() == before
