"""The apps on Flower's Deployment Engine: a real SuperLink and two SuperNodes on loopback.

One federated round of the tiny config (one client per task), submitted with
``flwr run . <connection> --run-config ... --stream`` exactly as the README's "Many machines"
section shows: the SuperLink and each SuperNode run in their own folder with their own
FLWR_HOME (as on separate machines), the connection lives in the CLI's
``$FLWR_HOME/config.toml``, and the ServerApp resolves the relative ``config`` and ``out``
paths in the folder the SuperLink was started from.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import tomli_w
from safetensors.numpy import load_file

from mira.results.rundir import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 60.0  # seconds for the SuperLink to accept connections
RUN_TIMEOUT = 240.0  # seconds for `flwr run --stream` (60-70 s on 2 cores)
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL at teardown


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all held open while choosing)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, from /proc; None if unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[19])


def _descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every descendant of ``pid`` (Linux; empty elsewhere)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _proc_stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found: list[tuple[int, int]] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child[0])
    return found


def _signal_if_same(pid: int, started: int, sig: signal.Signals) -> None:
    """Signal a process only if it is still the one we recorded (no pid reuse)."""
    stat = _proc_stat(pid)
    if stat is not None and stat[1] == started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"--- {path.name}: (no log)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(text)


class Processes:
    """The servers and the CLI this test starts, each logging to its own file."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        log = (self.log_dir / f"{name}.log").open("wb")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def exited(self, *names: str) -> list[str]:
        return [
            f"{n} (exit code {self.procs[n].poll()})"
            for n in names
            if self.procs[n].poll() is not None
        ]

    def logs(self) -> str:
        return "\n".join(tail(self.log_dir / f"{name}.log") for name in self.procs)

    def stop(self) -> None:
        """SIGTERM everything (servers, SuperExecs, ServerApp/ClientApp processes), then
        SIGKILL whatever is still there after STOP_TIMEOUT."""
        children = [c for p in self.procs.values() for c in _descendants(p.pid)]
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for pid, started in children:
            _signal_if_same(pid, started, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        while time.monotonic() < deadline and any(
            (s := _proc_stat(pid)) is not None and s[1] == started for pid, started in children
        ):
            time.sleep(0.2)
        for pid, started in children:
            _signal_if_same(pid, started, signal.SIGKILL)
        for log in self._logs:
            log.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    procs = Processes(log_dir)
    try:
        yield procs
    finally:
        procs.stop()


def wait_for_port(port: int, procs: Processes, name: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        dead = procs.exited(name)
        assert not dead, f"{name} exited before listening on {port}\n{procs.logs()}"
        assert time.monotonic() < deadline, (
            f"{name} not listening on 127.0.0.1:{port} after {STARTUP_TIMEOUT}s\n{procs.logs()}"
        )
        time.sleep(0.2)


def test_one_round_on_superlink_and_two_supernodes(tiny_config, cache_dir, tmp_path, processes):
    # federation.timeout bounds the ServerApp's wait for clients and replies; the run config's
    # `overrides` (below) brings the tiny config's 2 rounds down to 1.
    cfg = tiny_config("federation.timeout=120", clients=1)
    assert cfg.federation.rounds == 2 and cfg.num_clients == 2
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    (server_dir / "tiny.toml").write_text(tomli_w.dumps(cfg.to_dict()))

    base_env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec, flwr-*app
        "MIRA_CACHE": str(cache_dir),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
    }

    def env_for(name: str) -> tuple[Path, dict[str, str]]:
        home = tmp_path / "flwr-home" / name
        home.mkdir(parents=True)
        return home, {**base_env, "FLWR_HOME": str(home)}

    link_port, *node_ports = free_ports(1 + cfg.num_clients)

    _, link_env = env_for("superlink")
    processes.start(
        "superlink",
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
            "--disable-runtime-dependency-installation",
        ],
        cwd=server_dir,
        env=link_env,
    )
    wait_for_port(link_port, processes, "superlink")

    for partition, port in enumerate(node_ports):
        name = f"supernode-{partition}"
        node_dir = tmp_path / name
        node_dir.mkdir()
        _, node_env = env_for(name)
        processes.start(
            name,
            [
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--node-config",
                f"partition-id={partition} num-partitions={cfg.num_clients}",
            ],
            cwd=node_dir,
            env=node_env,
        )

    cli_home, cli_env = env_for("cli")
    (cli_home / "config.toml").write_text(
        tomli_w.dumps(
            {"superlink": {"local-test": {"address": f"127.0.0.1:{link_port}", "insecure": True}}}
        )
    )
    processes.start(
        "flwr-run",
        [
            str(BIN / "flwr"),
            "run",
            ".",
            "local-test",
            "--run-config",
            'config="tiny.toml" overrides="federation.rounds=1" out="runs/deployed"',
            "--stream",
        ],
        cwd=ROOT,
        env=cli_env,
    )

    started = time.monotonic()
    cli = processes.procs["flwr-run"]
    servers = ["superlink", *(f"supernode-{i}" for i in range(cfg.num_clients))]
    while cli.poll() is None:
        dead = processes.exited(*servers)
        assert not dead, f"{', '.join(dead)} stopped during the run\n{processes.logs()}"
        assert time.monotonic() - started < RUN_TIMEOUT, (
            f"flwr run did not finish within {RUN_TIMEOUT}s\n{processes.logs()}"
        )
        time.sleep(0.5)
    print(f"flwr run finished in {time.monotonic() - started:.1f}s")

    out = server_dir / "runs" / "deployed"
    cli_log = (processes.log_dir / "flwr-run.log").read_text(errors="replace")
    context = f"\n{processes.logs()}"
    assert cli.returncode == 0, f"flwr run exited with {cli.returncode}{context}"
    assert "Successfully started run" in cli_log, context
    assert (out / "metrics.jsonl").is_file(), f"no metrics.jsonl in {out}{context}"

    # The run config reached the ServerApp: its config file, its overrides, its output folder.
    written = tomllib.loads((out / "config.toml").read_text())
    assert written["federation"]["rounds"] == 1
    assert written["model"]["name"] == "tiny-random-llama"

    rows = read_metrics(out)
    client_rows = [r for r in rows if r["kind"] == "client"]
    assert [r["round"] for r in client_rows] == [1, 1], context
    assert [r["client"] for r in client_rows] == cfg.client_ids == ["polarity-0", "subject-0"]
    assert [r["task"] for r in client_rows] == cfg.client_tasks
    for row in client_rows:
        assert row["sampled"] is True
        assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0, row
        assert math.isfinite(row["eval_loss"]) and row["eval_loss"] > 0, row
        assert row["bytes_up"] > 0 and row["bytes_down"] > row["bytes_up"], row
    round_rows = [r for r in rows if r["kind"] == "round"]
    assert [r["round"] for r in round_rows] == [1]
    assert round_rows[0]["personalised_eval_loss_mean"] == pytest.approx(
        sum(r["eval_loss"] for r in client_rows) / len(client_rows)
    )

    graph = json.loads((out / "graph.json").read_text())
    assert graph["clients"] == cfg.client_ids
    assert graph["tasks"] == cfg.client_tasks

    for client in cfg.client_ids:
        weights = out / "adapters" / client / "adapter_model.safetensors"
        assert weights.is_file(), f"missing {weights}{context}"
        tensors = load_file(str(weights))
        assert tensors and all(np.isfinite(t).all() for t in tensors.values()), weights
