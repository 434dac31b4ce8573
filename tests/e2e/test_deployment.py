"""The apps on Flower's Deployment Engine, secured as the README's "Many machines" section
says: a real SuperLink with TLS and SuperNode authentication, and SuperNodes on loopback.

Each test makes its certificate authority, the SuperLink's certificate and one key per
SuperNode with the README's openssl and ssh-keygen commands, registers the SuperNodes' public
keys with ``flwr supernode register``, and submits the run with
``flwr run . <connection> --run-config ... --stream``. The SuperLink and each SuperNode run in
their own folder with their own FLWR_HOME (as on separate machines), the connection lives in
the CLI's ``$FLWR_HOME/config.toml``, and the ServerApp resolves the relative ``config`` and
``out`` paths in the folder the SuperLink was started from.

- One round of the tiny config with two SuperNodes, while a SuperNode with an unregistered key,
  one with no key, and a plaintext SuperNode and CLI are refused; with a client table
  (``federation.node_keys``), a SuperNode with a registered key of its own that claims another
  node's partition-id is refused and is sent nothing but the "who" query.
- A SuperNode killed (SIGKILL) while round 2 trains: the round completes without it, its
  replacement (same partition-id, a newly registered key) rejoins for round 3, and a second
  SuperNode claiming a partition-id already held is refused while the run goes on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import tomli_w
from safetensors.numpy import load_file

from mira.results.rundir import RunDirError, read_checkpoint, read_metrics
from mira.results.schema import RunLayout

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 60.0  # seconds for the SuperLink to accept connections
RUN_TIMEOUT = 900.0  # seconds for `flwr run --stream` of one round (60-90 s on 2 idle cores)
FAULT_RUN_TIMEOUT = 900.0  # seconds for the 3-round, 4-client run with a fault
REFUSED_TIMEOUT = 120.0  # seconds for a refused SuperNode to give up and exit
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL at teardown
CONNECTION = "local-test"  # the CLI's connection to the SuperLink, over TLS
PLAINTEXT = "plaintext"  # the same address without TLS: must be refused

# ---------------------------------------------------------------------------- processes


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


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


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
        self._children: list[tuple[int, int]] = []  # descendants of processes killed early

    def start(self, name: str, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        log = (self.log_dir / f"{name}.log").open("wb")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def exited(self, *names: str) -> list[str]:
        return [
            f"{n} (exit code {self.procs[n].poll()})"
            for n in names
            if self.procs[n].poll() is not None
        ]

    def logs(self) -> str:
        return "\n".join(tail(self.log_dir / f"{name}.log") for name in self.procs)

    def kill(self, name: str) -> None:
        """SIGKILL a server's process group and everything it started (its SuperExec and
        ClientApp processes run in sessions of their own), as if its machine died."""
        proc = self.procs[name]
        children = _descendants(proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid, started in children:
            _signal_if_same(pid, started, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)

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


# ---------------------------------------------------------------------------- credentials


def _run_tool(args: list[str], cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


# The README's commands (SERVER there is localhost here: the SuperLink listens on loopback).
CERTIFICATE_COMMANDS = [
    "openssl req -x509 -newkey rsa:4096 -sha256 -days 365 -nodes"
    ' -keyout ca.key -out ca.crt -subj "/CN=mira federation CA"',
    'openssl req -newkey rsa:4096 -nodes -keyout server.key -out server.csr -subj "/CN=localhost"',
    "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365"
    " -sha256 -extfile server.ext -out server.pem",
]
SERVER_EXT = "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
# The SuperLink's TLS and authentication flags, as in the README.
SUPERLINK_SECURITY = (
    "--ssl-ca-certfile certificates/ca.crt --ssl-certfile certificates/server.pem"
    " --ssl-keyfile certificates/server.key --enable-supernode-auth"
    " --disable-runtime-dependency-installation"
)
NODE_KEY_COMMAND = 'ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f {name}'


def make_certificates(folder: Path) -> None:
    """A CA, and the SuperLink's key and certificate signed by it for the addresses it is
    reached at (here only loopback)."""
    folder.mkdir(parents=True)
    (folder / "server.ext").write_text(SERVER_EXT)
    for command in CERTIFICATE_COMMANDS:
        _run_tool(shlex.split(command), folder)


def make_node_key(folder: Path, name: str) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format (``name``, ``name.pub``); returns the private
    key's path."""
    folder.mkdir(parents=True, exist_ok=True)
    _run_tool(shlex.split(NODE_KEY_COMMAND.format(name=name)), folder)
    return folder / name


@pytest.fixture(scope="module")
def tools() -> None:
    missing = [tool for tool in ("openssl", "ssh-keygen") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} to make certificates and keys")


# ---------------------------------------------------------------------------- the federation


@dataclass
class Federation:
    """A SuperLink with TLS and SuperNode authentication, its SuperNodes and the CLI, each
    with its own folder and FLWR_HOME, as on separate machines."""

    tmp_path: Path
    processes: Processes
    cache_dir: Path

    def __post_init__(self) -> None:
        self.server_dir = self.tmp_path / "server"
        self.server_dir.mkdir()
        self.certs = self.tmp_path / "server" / "certificates"
        make_certificates(self.certs)
        self.keys = self.tmp_path / "keys"
        self.link_port = free_ports(1)[0]
        self.base_env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec, ...
            "MIRA_CACHE": str(self.cache_dir),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.cli_home, self.cli_env = self.home("cli")
        address = f"127.0.0.1:{self.link_port}"
        connections = {
            CONNECTION: {"address": address, "root-certificates": str(self.certs / "ca.crt")},
            PLAINTEXT: {"address": address, "insecure": True},
        }
        (self.cli_home / "config.toml").write_text(tomli_w.dumps({"superlink": connections}))

    def home(self, name: str) -> tuple[Path, dict[str, str]]:
        home = self.tmp_path / "flwr-home" / name
        home.mkdir(parents=True, exist_ok=True)
        return home, {**self.base_env, "FLWR_HOME": str(home)}

    def start_superlink(self) -> None:
        _, env = self.home("superlink")
        self.processes.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                *shlex.split(SUPERLINK_SECURITY),
                *("--host", "127.0.0.1", "--port", str(self.link_port)),
            ],
            cwd=self.server_dir,
            env=env,
        )
        wait_for_port(self.link_port, self.processes, "superlink")

    def flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A `flwr` CLI command, run to its end from the CLI's home."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            cwd=self.tmp_path,
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT * 2,
            check=False,
        )

    def register(self, key: Path) -> int:
        """`flwr supernode register KEY.pub CONNECTION`: the SuperLink admits this key."""
        done = self.flwr("supernode", "register", f"{key}.pub", CONNECTION, "--format", "json")
        assert done.returncode == 0, f"register failed:\n{done.stdout}\n{done.stderr}"
        answer = json.loads(done.stdout[done.stdout.index("{") :])
        assert answer["success"], done.stdout
        return int(answer["node-id"])

    def node_status(self) -> dict[int, str]:
        """`flwr supernode list --format json`: {node id: status} as the SuperLink knows it."""
        done = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        assert done.returncode == 0, f"list failed:\n{done.stdout}\n{done.stderr}"
        answer = json.loads(done.stdout[done.stdout.index("{") :])
        return {int(n["node-id"]): n["status"] for n in answer["nodes"]}

    def start_supernode(
        self,
        name: str,
        partition: int,
        partitions: int,
        key: Path | None,
        extra: tuple[str, ...] = (),
        tls: bool = True,
    ) -> None:
        node_dir = self.tmp_path / name
        node_dir.mkdir(exist_ok=True)
        _, env = self.home(name)
        security = ["--root-certificates", str(self.certs / "ca.crt")] if tls else ["--insecure"]
        if key is not None:
            security += ["--auth-supernode-private-key", str(key)]
        self.processes.start(
            name,
            [
                str(BIN / "flower-supernode"),
                *security,
                *("--superlink", f"127.0.0.1:{self.link_port}"),
                *("--host", "127.0.0.1", "--port", str(free_ports(1)[0])),
                *("--node-config", f"partition-id={partition} num-partitions={partitions}"),
                *extra,
            ],
            cwd=node_dir,
            env=env,
        )

    def start_run(self, config: dict, run_config: str) -> Path:
        """Write the config where the SuperLink runs and submit the run; returns the run dir."""
        (self.server_dir / "tiny.toml").write_text(tomli_w.dumps(config))
        self.processes.start(
            "flwr-run",
            [str(BIN / "flwr"), "run", ".", CONNECTION, "--run-config", run_config, "--stream"],
            cwd=ROOT,
            env=self.cli_env,
        )
        return self.server_dir / "runs" / "deployed"

    def wait_run(self, servers: list[str], timeout: float) -> float:
        """Wait for `flwr run --stream` to end while ``servers`` stay up; returns seconds."""
        started = time.monotonic()
        cli = self.processes.procs["flwr-run"]
        while cli.poll() is None:
            dead = self.processes.exited(*servers)
            assert not dead, f"{', '.join(dead)} stopped during the run\n{self.processes.logs()}"
            assert time.monotonic() - started < timeout, (
                f"flwr run did not finish within {timeout}s\n{self.processes.logs()}"
            )
            time.sleep(0.5)
        return time.monotonic() - started


@pytest.fixture
def federation(tmp_path, processes, cache_dir, tools) -> Federation:
    return Federation(tmp_path, processes, cache_dir)


def wait_exit(processes: Processes, name: str, timeout: float) -> int:
    try:
        return processes.procs[name].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} still runs after {timeout}s\n{processes.logs()}")


def wait_online(federation: Federation, nodes: list[int], timeout: float) -> None:
    """Until the SuperLink lists every one of ``nodes`` online (each SuperNode connected)."""
    deadline = time.monotonic() + timeout
    while True:
        status = federation.node_status()
        if all(status.get(node) == "online" for node in nodes):
            return
        assert time.monotonic() < deadline, (
            f"nodes not online after {timeout}s: {status}\n{federation.processes.logs()}"
        )
        time.sleep(1.0)


def client_rows(out: Path) -> dict[tuple[int, str], dict]:
    return {(r.round, r.client): r for r in read_metrics(out).clients}


# ---------------------------------------------------------------------------- tests


def test_one_round_with_tls_and_supernode_auth(tiny_config, federation, processes, reliability):
    # federation.timeout bounds the ServerApp's wait for clients and replies; the run config's
    # `overrides` (below) brings the tiny config's 2 rounds down to 1.
    cfg = tiny_config("federation.timeout=240", clients=1)
    assert cfg.federation.rounds == 2 and cfg.num_clients == 2
    federation.start_superlink()

    keys = [make_node_key(federation.keys, f"supernode-{i}") for i in range(cfg.num_clients)]
    registered = [federation.register(key) for key in keys]
    intruder = make_node_key(federation.keys, "intruder")  # made, never registered
    # A third machine with a registered key of its own whose SuperNode says it holds client 0.
    # The client table binds partition-id 0 to supernode-0's key (its .pub file, relative to
    # the table) and 1 to supernode-1's (the key's text).
    impostor = make_node_key(federation.keys, "impostor")
    impostor_id = federation.register(impostor)
    table = {"0": "../keys/supernode-0.pub", "1": Path(f"{keys[1]}.pub").read_text().strip()}
    (federation.server_dir / "node_keys.toml").write_text(tomli_w.dumps(table))

    # Refused: an unregistered key, no key (self-registration is off), no TLS.
    refused = {
        "unregistered-key": dict(key=intruder),
        "no-key": dict(key=None),
        # (flower-supernode itself refuses a key without TLS, so this one has none)
        "plaintext": dict(key=None, tls=False, extra=("--max-retries", "2")),
    }
    for name, how in refused.items():
        federation.start_supernode(name, 1, cfg.num_clients, **how)  # type: ignore[arg-type]
    plaintext_cli = federation.flwr("supernode", "list", PLAINTEXT, "--format", "json")

    for partition, key in enumerate(keys):
        federation.start_supernode(f"supernode-{partition}", partition, cfg.num_clients, key)
    federation.start_supernode("impostor", 0, cfg.num_clients, impostor)
    # All connected before the run starts, so the server asks every one of them who it is.
    wait_online(federation, [*registered, impostor_id], STARTUP_TIMEOUT)
    out = federation.start_run(
        cfg.to_dict(),
        'config="tiny.toml" overrides="federation.rounds=1" out="runs/deployed" '
        'federation.node_keys="node_keys.toml"',
    )
    servers = ["superlink", "impostor", *(f"supernode-{i}" for i in range(cfg.num_clients))]
    seconds = federation.wait_run(servers, RUN_TIMEOUT)
    print(f"flwr run finished in {seconds:.1f}s")

    cli = processes.procs["flwr-run"]
    cli_log = processes.log("flwr-run")
    context = f"\n{processes.logs()}"
    assert cli.returncode == 0, f"flwr run exited with {cli.returncode}{context}"
    assert "Successfully started run" in cli_log, context
    assert RunLayout(out).metrics.is_file(), f"no {RunLayout(out).metrics.name} in {out}{context}"

    # (a) SuperNodes without an authorised key are refused, and exit.
    for name, code in (("unregistered-key", "[code: 2004]"), ("no-key", "[code: 2001]")):
        assert wait_exit(processes, name, REFUSED_TIMEOUT) != 0, context
        log = processes.log(name)
        assert "Failed to initialize the connection to the SuperLink" in log, log
        assert code in log, log
    # (b) Plaintext is refused: the SuperNode gives up, the CLI cannot reach the SuperLink.
    assert wait_exit(processes, "plaintext", REFUSED_TIMEOUT) != 0, context
    log = processes.log("plaintext")
    assert "Failed to initialize the connection to the SuperLink" in log, log
    assert "Server disconnected without sending a response" in log, log
    assert '"success": true' not in plaintext_cli.stdout, plaintext_cli.stdout
    assert "Connection to the SuperLink is unavailable" in plaintext_cli.stdout, (
        plaintext_cli.stdout
    )
    # The SuperLink knows the registered nodes and no one else.
    assert federation.node_status() == dict.fromkeys([*registered, impostor_id], "online")
    # (c) The impostor's key is registered but not bound to the client it claims: the server
    # names it and refuses it, and it is sent the "who" query only (no config view, no
    # adapter); supernode-0 keeps client 0.
    refusal = (
        f"node {impostor_id} claims partition-id 0 (client polarity-0), but its key is not in "
        "node_keys.toml; refused: it gets no config and no adapter"
    )
    assert refusal in cli_log, cli_log[-3000:]
    assert "not bound to SuperNode keys" not in cli_log, cli_log[-3000:]
    impostor_log = processes.log("impostor")
    assert impostor_log.count("Receiving: query message") == 1, impostor_log
    assert "Receiving: train message" not in impostor_log, impostor_log
    assert "Receiving: evaluate message" not in impostor_log, impostor_log

    # The run config reached the ServerApp: its config file, its overrides, its output folder.
    written = tomllib.loads(RunLayout(out).config.read_text())
    assert written["federation"]["rounds"] == 1
    assert written["model"]["name"] == "tiny-random-llama"

    rows = read_metrics(out)
    clients = rows.clients
    assert [r.round for r in clients] == [1, 1], context
    assert [r.client for r in clients] == cfg.client_ids == ["polarity-0", "subject-0"]
    assert [r.task for r in clients] == cfg.client_tasks
    for row in clients:
        assert row.sampled is True and row.status == "ok", row
        assert math.isfinite(row.train_loss) and row.train_loss > 0, row
        assert math.isfinite(row.eval_loss) and row.eval_loss > 0, row
        # Down: the adapter to train in round 1, then the pulled one to evaluate after it;
        # up: the trained adapter (the evaluation reply carries no arrays).
        assert row.bytes_up > 0 and row.bytes_down == 2 * row.bytes_up, row
    round_rows = rows.rounds
    assert [r.round for r in round_rows] == [1]
    assert round_rows[0].personalised_eval_loss_mean == pytest.approx(
        sum(r.eval_loss for r in clients) / len(clients)
    )

    graph = json.loads(RunLayout(out).graph.read_text())
    assert graph["clients"] == cfg.client_ids
    assert graph["tasks"] == cfg.client_tasks

    for client in cfg.client_ids:
        weights = RunLayout(out).adapter(client).weights
        assert weights.is_file(), f"missing {weights}{context}"
        tensors = load_file(str(weights))
        assert tensors and all(np.isfinite(t).all() for t in tensors.values()), weights
    reliability.record(
        "SuperNodes with an unregistered key, with no key, and without TLS (deployment)",
        "each refused at connection (exit code 305); the run went on with the registered ones",
        "1 of 1",
        out,
    )
    reliability.record(
        "a SuperNode with a registered key of its own claims another node's partition-id, with "
        "a client table (deployment)",
        "refused before it was sent any config (the server names the node and the id it "
        "claimed); it received the 'who' query only; the holder kept its client and the run "
        "went on",
        "1 of 1",
        out,
    )


def wait_for_round(out: Path, trained: int, processes: Processes, timeout: float) -> None:
    """Until the run's checkpoint holds round ``trained``: the next exchange is being sent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(RunDirError, OSError, ValueError):
            checkpoint = read_checkpoint(out)
            if checkpoint is not None and checkpoint.round >= trained:
                return
        assert processes.procs["flwr-run"].poll() is None, f"the run ended\n{processes.logs()}"
        time.sleep(0.2)
    pytest.fail(f"round {trained} not checkpointed within {timeout}s\n{processes.logs()}")


def wait_for_clientapp(processes: Processes, name: str, timeout: float) -> bool:
    """Whether a ClientApp process of SuperNode ``name`` is running (within ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [pid for pid, _ in _descendants(processes.procs[name].pid)]
        if any("flwr-clientapp" in _cmdline(pid) for pid in pids):
            return True
        time.sleep(0.2)
    return False


def test_supernode_killed_mid_round_rejoins_and_a_duplicate_is_refused(
    tiny_config, federation, processes, reliability
):
    # Four clients, three rounds. round_timeout bounds the wait for the killed client; it must
    # also leave the healthy ones time to train (four ClientApp processes share 2 cores).
    cfg = tiny_config(
        "federation.rounds=3", "federation.timeout=240", "federation.round_timeout=90"
    )
    assert cfg.num_clients == 4
    assert cfg.client_ids == ["polarity-0", "polarity-1", "subject-0", "subject-1"]
    victim, victim_id, held = 1, "polarity-1", "polarity-0"
    federation.start_superlink()
    keys = [make_node_key(federation.keys, f"supernode-{i}") for i in range(cfg.num_clients)]
    # Registered beforehand, as an operator would provision them: the key of the victim's
    # replacement machine, and an impostor's key.
    replacement = make_node_key(federation.keys, f"supernode-{victim}-new")
    duplicate = make_node_key(federation.keys, "duplicate")
    for key in [*keys, replacement, duplicate]:
        federation.register(key)
    for partition, key in enumerate(keys):
        federation.start_supernode(f"supernode-{partition}", partition, cfg.num_clients, key)
    out = federation.start_run(cfg.to_dict(), 'config="tiny.toml" out="runs/deployed"')

    # Round 2 is under way once round 1 is checkpointed; kill the victim while its ClientApp
    # works on round 2's message (or, at worst, before it pulled it: the same to the server).
    wait_for_round(out, 1, processes, FAULT_RUN_TIMEOUT / 2)
    working = wait_for_clientapp(processes, f"supernode-{victim}", 30.0)
    processes.kill(f"supernode-{victim}")
    print(f"supernode-{victim} killed (its round-2 ClientApp was running: {working})")

    # Its replacement: the same partition-id with the new key. (Restarted with its old key, a
    # SuperNode is refused until the SuperLink has marked the dead one offline, up to 60 s:
    # see the README.) And the impostor: a partition-id another SuperNode holds.
    federation.start_supernode("replacement", victim, cfg.num_clients, replacement)
    federation.start_supernode("duplicate", 0, cfg.num_clients, duplicate)

    healthy = [f"supernode-{i}" for i in range(cfg.num_clients) if i != victim]
    seconds = federation.wait_run(
        ["superlink", *healthy, "replacement", "duplicate"], FAULT_RUN_TIMEOUT
    )
    print(f"flwr run finished in {seconds:.1f}s")

    cli = processes.procs["flwr-run"]
    cli_log = processes.log("flwr-run")
    context = f"\n{processes.logs()}"
    assert cli.returncode == 0, f"flwr run exited with {cli.returncode}{context}"
    assert RunLayout(out).metrics.is_file(), f"no {RunLayout(out).metrics.name} in {out}{context}"

    rows = client_rows(out)
    assert sorted({r for r, _ in rows}) == [1, 2, 3], context
    # Round 2 completed without the victim: its row says so and names it.
    lost = rows[(2, victim_id)]
    assert lost.status in ("timeout", "failed"), lost
    assert victim_id in lost.reason, lost
    assert lost.train_loss is None, lost
    # Its replacement was adopted before round 3 and trained it.
    assert f"client {victim_id} rejoined on node" in cli_log, context
    back = rows[(3, victim_id)]
    assert back.status == "ok", back
    assert math.isfinite(back.train_loss) and back.train_loss > 0, back
    assert math.isfinite(back.eval_loss) and back.eval_loss > 0, back
    for (server_round, client), row in rows.items():
        if client != victim_id or server_round == 1:
            assert row.status == "ok", row
            assert math.isfinite(row.train_loss), row
        if row.status == "ok":
            # One message per client per round; the last round's row also counts the final
            # evaluation's (the adapter again, both ways of equal size).
            sent = 2 if server_round == cfg.federation.rounds else 1
            assert row.bytes_down == sent * row.bytes_up > 0, row
    # The duplicate was asked who it is, never given work, and the run went on with the
    # holder keeping its client.
    assert processes.procs["duplicate"].poll() is None, "the refused SuperNode was stopped"
    duplicate_log = processes.log("duplicate")
    assert "Receiving: query message" in duplicate_log, duplicate_log
    assert "Receiving: train message" not in duplicate_log, duplicate_log
    assert "Receiving: evaluate message" not in duplicate_log, duplicate_log
    reliability.record(
        "a SuperNode killed (SIGKILL) while round 2 trains (deployment, TLS + node auth)",
        f"status {lost.status} ({lost.reason}); a replacement SuperNode with the same "
        "partition-id rejoined and trained round 3",
        "3 of 3",
        out,
    )
    assert f"claims client {held}, which node" in cli_log and "refused" in cli_log, cli_log[-3000:]
    reliability.record(
        "a second SuperNode claims a partition-id another live node holds (deployment)",
        "refused (the server says so); the holder kept its client and the run went on",
        "3 of 3",
        out,
    )
