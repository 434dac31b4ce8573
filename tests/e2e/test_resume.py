"""A run killed with SIGKILL in the middle of a round resumes to the same adapters."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tomli_w
from safetensors.numpy import load_file, save_file

import faults
from mira.federation.simulation import run_simulation
from mira.results.errors import RunDirError
from mira.results.rundir import RunWriter, read_checkpoint, read_metrics
from mira.results.schema import AdapterFiles, ReportFiles, RunLayout

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parents[1]

# `mira run CONFIG --out OUT --verbose` with tests/faults.py's ClientApp in place of mira's.
DRIVER = (
    "import sys; from pathlib import Path; from mira.config import load_config; "
    "from mira.federation.simulation import run_simulation; "
    "run_simulation(load_config(sys.argv[1]), Path(sys.argv[2]), verbose=True, "
    "clients='faults:faulty_app')"
)


def _adapters(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    return {
        p.name: load_file(str(AdapterFiles(p).weights))
        for p in sorted(RunLayout(folder).adapters.iterdir())
    }


def _mira(*args: str) -> list[str]:
    return [sys.executable, "-m", "mira.cli", *args]


def _kill_when(proc: subprocess.Popen[str], marker: str, limit: float) -> list[psutil.Process]:
    """Read the run's output until ``marker`` shows up, then SIGKILL the mira process alone
    (not its process group: nothing is left to clean up after it but its watchdog). Returns
    the processes it had started."""
    seen: list[str] = []
    deadline = time.monotonic() + limit
    assert proc.stdout is not None
    started: list[psutil.Process] = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line or time.monotonic() > deadline:
                break
        started = psutil.Process(proc.pid).children(recursive=True)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert any(marker in line for line in seen), "".join(seen[-30:])
    return started


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _gone_within(processes: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """The processes still running after ``seconds`` (the watchdog should have ended them)."""
    _gone, alive = psutil.wait_procs(processes, timeout=seconds)
    for process in alive:  # do not leave them to the next test
        with contextlib.suppress(psutil.Error):
            process.kill()
    return alive


def test_sigkill_mid_round_then_resume_equals_uninterrupted(tiny_config, tmp_path, reliability):
    cfg = tiny_config("federation.rounds=3", "server.graph=clusters")
    config_path = tmp_path / "tiny.toml"
    config_path.write_text(tomli_w.dumps(cfg.to_dict()))

    whole = tmp_path / "whole"
    run_simulation(cfg, whole)

    broken = tmp_path / "broken"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Every client takes 5 s more in round 3 (tests/faults.py), so the kill after the first
    # reply of exchange 3 lands while the others still work, however fast the machine.
    hang = [{"client": c, "round": 3, "kind": "hang", "seconds": 5} for c in cfg.client_ids]
    slowed = {
        **env,
        faults.FAULTS: json.dumps(hang),
        "PYTHONPATH": os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(config_path), str(broken)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=slowed,
        start_new_session=True,
    )
    # Killed during exchange 3 (round 3's training, round 2's evaluation): exchange 2 is
    # complete, so round 1's rows are written and round 2 is trained but not yet evaluated.
    started = _kill_when(proc, "round 3: 1/", limit=240)
    assert any("ray" in _cmdline(p).lower() for p in started)
    left = _gone_within([p for p in started if "watchdog" not in _cmdline(p)], 30)
    assert not left, f"still running 30 s after mira was killed: {[_cmdline(p) for p in left]}"
    checkpoint = read_checkpoint(broken)
    assert checkpoint is not None and checkpoint.round == 2
    assert {r.round for r in read_metrics(broken).all()} == {1}

    # A fresh run into the same directory is refused; --resume continues it.
    refused = subprocess.run(
        _mira("run", str(config_path), "--out", str(broken)), capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run(
        _mira("run", "--resume", str(broken)), capture_output=True, text=True, env=env, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming after round 2" in resumed.stdout

    expected, got = _adapters(whole), _adapters(broken)
    assert sorted(expected) == sorted(got) == sorted(cfg.client_ids)
    for client in expected:
        for key, value in expected[client].items():
            np.testing.assert_allclose(got[client][key], value, rtol=0, atol=1e-6)
    rows = read_metrics(broken).clients
    assert sorted((r.round, r.client) for r in rows) == sorted(
        (n, c) for n in (1, 2, 3) for c in cfg.client_ids
    )
    whole_rows = {(r.round, r.client): r.eval_loss for r in read_metrics(whole).clients}
    for row in rows:
        assert row.eval_loss == pytest.approx(whole_rows[(row.round, row.client)], abs=1e-5)
    # The graph came from the checkpoint, not from new fingerprints.
    assert read_checkpoint(broken).clusters == read_checkpoint(whole).clusters  # type: ignore[union-attr]
    reliability.record(
        "the mira process SIGKILLed mid-round (round 3 of 3), then `mira run --resume`",
        "its Flower and Ray processes ended within 30 s; a fresh run into the folder was refused; "
        "the resumed run continued after round 2 and equals an uninterrupted run (adapters "
        "1e-6, every eval loss)",
        "3 of 3",
        broken,
    )


def test_auto_stopped_with_choices_pending_resumes_to_the_uninterrupted_run(
    tiny_config, tmp_path, monkeypatch
):
    """server.step = "auto" keeps no correctness in the clients: one forgets the adapter its
    node kept (a restarted process) and is sent it again; the run then stops with every
    client's choice pending, and the resumed run sends the adapters again and equals the
    uninterrupted one (eval losses and adapters exactly)."""
    from mira.federation import simulation
    from mira.federation.server import FederationError
    from mira.results.diff import run_differences

    monkeypatch.setattr(simulation, "client_app", faults.faulty_app)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv(faults.FAULTS, "[]")
    cfg = tiny_config("server.step='auto'", "data.val_size=3")
    whole = tmp_path / "whole"
    run_simulation(cfg, whole)
    # Exchange 3 is the final evaluation, where round 2's choices are made: all fail it.
    forget = {"client": "polarity-1", "round": 2, "kind": "forget"}
    stop = [{"client": client, "round": 3, "kind": "raise"} for client in cfg.client_ids]
    monkeypatch.setenv(faults.FAULTS, json.dumps([forget, *stop]))
    parts = tmp_path / "parts"
    with pytest.raises(FederationError, match="replied usably"):
        run_simulation(cfg, parts)
    checkpoint = read_checkpoint(parts)
    assert checkpoint is not None and checkpoint.round == 2
    assert all(client["has_mean"] for client in checkpoint.server["clients"])
    monkeypatch.setenv(faults.FAULTS, "[]")
    run_simulation(cfg, parts, resume=True)
    found = run_differences(whole, parts)
    assert found.pairs == 8 and found.eval_loss == 0.0 and found.adapter == 0.0
    # What travelled, in adapters: the uninterrupted run one per exchange (the neighbours'
    # mean after round 1); the forgetful client its adapter again in exchange 2, and every
    # client its adapter beside the mean in the first exchange after the resume.
    adapters = {
        run: {(r.round, r.client): r.bytes_down / r.bytes_up for r in read_metrics(run).clients}
        for run in (whole, parts)
    }
    for client in cfg.client_ids:
        assert adapters[whole][(1, client)] == adapters[parts][(1, client)] == 1
        assert adapters[whole][(2, client)] == 2
        assert adapters[parts][(2, client)] == (5 if client == "polarity-1" else 3)


# ------------------------------------------------------------------------------ integrity
def _stopped_run(cfg, folder: Path) -> None:
    """What a run stopped after exchange 3 leaves: config.toml, rows of rounds 1 and 2, and
    the checkpoint of round 3 (adapters of the config's clients)."""
    from test_rundir import checkpoint, client_rows

    writer = RunWriter(folder, cfg)
    writer.write_config()
    for rnd in (1, 2):
        writer.append_round(1.0, rnd, client_rows(rnd))
    writer.write_checkpoint(dataclasses.replace(checkpoint(3), config=None))
    writer.close()


def _scale_x50_without_hashes(folder: Path) -> None:
    path = RunLayout(folder).checkpoint_adapter_files()[0]
    save_file({k: v * 50 for k, v in load_file(str(path)).items()}, str(path), {"mira_round": "3"})
    state_path = RunLayout(folder).state
    state = json.loads(state_path.read_text())
    del state["adapters_sha256"], state["state_sha256"]
    state_path.write_text(json.dumps(state))


def _edit_step(folder: Path) -> None:
    path = RunLayout(folder).config
    path.write_text(path.read_text().replace("step = 0.3\n", "step = 0.9\n"))


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_scale_x50_without_hashes, "state.json has no state_sha256 entry"),
        (
            _edit_step,
            "config.toml differs from the config its checkpoint was computed with in "
            "server.step (server.step 0.3 -> 0.9)",
        ),
    ],
    ids=["adapters x50 without hashes", "server.step edited"],
)
def test_resume_refuses_a_tampered_run_before_starting_anything(
    tiny_config, tmp_path, capsys, tamper, expected
):
    from mira.cli import main

    folder = tmp_path / "run"
    _stopped_run(tiny_config(), folder)
    assert read_checkpoint(folder) is not None
    tamper(folder)
    lock = RunLayout(folder).lock  # rewritten by the refused resume (holder pid and time)

    def files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p != lock}

    before = files()
    assert main(["run", "--resume", str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err and "nothing was deleted" in err.lower()
    assert "mira run:" not in capsys.readouterr().out  # it never started
    assert files() == before


def test_the_server_refuses_to_resume_with_a_config_its_checkpoint_was_not_computed_with(
    tiny_config, tmp_path
):
    """flwr run --run-config can hand the ServerApp another config than config.toml."""
    from mira.config import ConfigError
    from mira.federation.server import run_federation

    _stopped_run(tiny_config(), tmp_path)
    with pytest.raises(ConfigError) as caught:
        run_federation(None, tiny_config("server.step=0.9"), tmp_path, "", resume=True)  # type: ignore[arg-type]
    assert "server.step differ from the config" in str(caught.value)
    assert "(server.step 0.3 -> 0.9)" in str(caught.value)


def test_a_full_disk_mid_run_ends_in_one_line_with_the_checkpoint_intact(
    tiny_config, tmp_path, monkeypatch, reliability
):
    """The ServerApp's writes hit ENOSPC: one RunDirError naming the folder, the checkpoint it
    verified intact and how to go on; nothing the run wrote before is touched."""
    from mira.federation.server import run_federation
    from mira.results import rundir

    _stopped_run(tiny_config(), tmp_path)
    before = {p: p.read_bytes() for p in RunLayout(tmp_path).checkpoint.iterdir()}

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(rundir, "write_atomic", full)
    with pytest.raises(RunDirError) as caught:
        run_federation(None, tiny_config(), tmp_path, "", resume=True)  # type: ignore[arg-type]
    text = str(caught.value)
    assert "\n" not in text and caught.value.__cause__ is None
    assert text == (
        f"{tmp_path}: No space left on device writing {RunLayout(tmp_path).config}; the run "
        "stopped. Its last checkpoint (after round 3) is intact: free some space and continue "
        f"with `mira run --resume {tmp_path}`"
    )
    assert {p: p.read_bytes() for p in RunLayout(tmp_path).checkpoint.iterdir()} == before
    monkeypatch.undo()
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.round == 3
    reliability.record(
        "the disk fills up while the run writes its folder (ENOSPC injected in the writer)",
        "the run ends with one line naming the folder and the file, says the last checkpoint "
        "(checked) is intact and that `mira run --resume` continues; no traceback",
        "2 of 3, checkpoint of 3 intact",
        tmp_path,
    )


def test_mira_run_prints_one_line_for_a_full_disk(tiny_config, tmp_path, monkeypatch, capsys):
    from mira.cli import main
    from mira.federation import simulation

    folder = tmp_path / "run"
    _stopped_run(tiny_config("federation.rounds=5"), folder)  # stopped before its last round

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(ReportFiles(folder).report_md))

    monkeypatch.setattr(simulation, "run_simulation", full)
    assert main(["run", "--resume", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"mira: {folder}: No space left on device writing ")
    assert f"intact: free some space and continue with `mira run --resume {folder}`" in err


def test_resume_of_a_finished_run_returns_at_once_without_the_engine(
    tiny_config, tmp_path, capsys, monkeypatch
):
    from mira.cli import main
    from mira.federation import simulation
    from test_rundir import checkpoint, client_rows

    def refuse(*args, **kwargs):
        raise AssertionError("the engine was started")

    monkeypatch.setattr(simulation, "run_simulation", refuse)
    monkeypatch.setattr(simulation.LocalSuperLink, "launch", refuse)
    folder = tmp_path / "run"
    cfg = tiny_config()  # 2 rounds
    writer = RunWriter(folder, cfg)
    writer.write_config()
    for rnd in (1, 2):
        writer.append_round(1.0, rnd, client_rows(rnd))
    writer.write_checkpoint(dataclasses.replace(checkpoint(2), config=None))  # after round 2
    writer.close()
    lock = RunLayout(folder).lock
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p != lock}

    assert main(["run", "--resume", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"{folder} finished all 2 rounds; nothing to resume" in out
    assert "--set federation.rounds=3" in out
    assert "Personalised eval loss after round 2" in out  # its final table
    files = ReportFiles(folder)
    assert files.report_md.is_file()  # it had none: written now
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p != lock}
    assert {p: after[p] for p in before} == before  # nothing of the run changed

    # Once it has its report, a resume only prints.
    report = files.report_md.read_bytes()
    assert main(["run", "--resume", str(folder)]) == 0
    assert "report:" not in capsys.readouterr().out
    assert files.report_md.read_bytes() == report

    # More rounds than it ran: it is not finished, so the engine is asked for.
    with pytest.raises(AssertionError, match="the engine was started"):
        main(["run", "--resume", str(folder), "--set", "federation.rounds=3"])
