"""Run a federation on Flower's Simulation Engine, as one command.

Flower runs simulations through a SuperLink in simulation mode: ``flwr run`` submits an app to
it, and the SuperLink starts ``flwr-simulation``, the process that runs the ServerApp and,
through Ray, the ClientApps (the in-process ``flwr.simulation.run_simulation`` is deprecated
since flwr 1.41). :func:`run_simulation` does that for one run and cleans up after it:

1. it starts a SuperLink of its own (:class:`LocalSuperLink`: a free loopback port, a
   temporary FLWR_HOME, no runtime dependency installation, no update check), and while that
   process starts it checks the config and everything that can fail before training, here
   (:func:`preflight`); nothing is submitted before the checks pass;
3. it writes a minimal Flower app (a pyproject.toml naming mira's ServerApp, the ClientApp and
   this run's resolved config) and submits it with ``flwr run APP --stream``;
4. the ServerApp reports its progress and its outcome through a relay file
   (:mod:`mira.federation.relay`): the progress is shown here, and an exception the ServerApp
   raised is raised here, with its type and message;
5. once the ServerApp has written its outcome, it stops the SuperLink and everything it
   started (nothing of the run is left to do there: Flower's own orderly stop of Ray would
   only add seconds); a watchdog does the same if this process dies, even by SIGKILL
   (:mod:`mira.federation.watchdog`).

Each step is marked on the run's :class:`~mira.federation.progress.Progress` (its
``Timeline``), so ``mira run`` can say where the fixed seconds went.

This process and the ServerApp never touch a GPU (no CUDA context: ``resolve_device`` asks
NVML). Each client process (a Ray actor) loads the model on ``model.device``;
``federation.gpus_per_client`` is its Ray GPU share, so several clients can train on one GPU at
once.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psutil
import tomli_w

from mira.client.devices import resolve_device
from mira.client.quiet import plain_console
from mira.config import Config, ConfigError, to_toml
from mira.data import load_client_data
from mira.federation.preflight import check_lengths, check_model
from mira.federation.progress import Progress, plain_text
from mira.federation.relay import RelayReader
from mira.federation.server import FederationError
from mira.federation.server_app import server_preflight
from mira.federation.watchdog import guard
from mira.results.schema import RunLayout

SERVER_APP = "mira.federation.server_app:app"
# mira's ClientApp, by name: Flower's processes import it, this one never needs to (tests put
# another ClientApp here).
client_app: Any = "mira.federation.client_app:app"
CONNECTION = "mira-run"  # the SuperLink connection in the temporary FLWR_HOME
STARTUP_TIMEOUT = 60.0  # seconds for the SuperLink to accept connections
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when stopping it
# ... once the ServerApp has written its outcome: nothing there is left to finish, and Ray's
# client processes take seconds to wind down on SIGTERM.
DONE_GRACE = 0.5
POLL_SECONDS = 0.2
LOG_TAIL = 40  # lines of Flower's output kept to explain a failure


def preflight(cfg: Config) -> str:
    """Everything that can fail before training: every client's data first (built-in tasks
    fetched if missing, files decode), so a task that cannot be had is named before any model
    is fetched or converted; then the model loads (:func:`check_model`), what the server checks
    (:func:`~mira.federation.server_app.server_preflight`: graph vs step, model, LoRA target
    modules, ranks), the device, and the targets fit model.max_length.

    Returns the local source of the base model (converted and cached once, here, so the
    workers only load it).
    """
    if cfg.federation.node_keys:
        raise ConfigError(
            f"federation.node_keys = {cfg.federation.node_keys!r} binds clients to SuperNode "
            "keys, which the Simulation Engine's nodes do not have: leave it empty for `mira "
            "run` and give it to the Deployment Engine's runs (README, 'Many machines')"
        )
    for partition in range(cfg.num_clients):
        load_client_data(cfg, partition)
    tokenizer = check_model(cfg)  # first: a mistyped name fails before the server reads it
    base_source = server_preflight(cfg)
    check_gpu_share(cfg, resolve_device(cfg.model)[0])
    check_lengths(cfg, tokenizer)
    return base_source


def check_gpu_share(cfg: Config, device: str) -> None:
    """Ray would wait forever for GPUs a machine does not have: refuse a GPU share unless the
    clients train on CUDA."""
    gpus = cfg.federation.gpus_per_client
    if gpus > 0 and not device.startswith("cuda"):
        raise ConfigError(
            f"federation.gpus_per_client = {gpus:g} reserves GPUs for the clients, but they "
            f"train on {device!r} (model.device = {cfg.model.device!r}); it needs a CUDA GPU: "
            "set it to 0, or run where torch sees one"
        )


def quiet_libraries() -> None:
    """Keep the terminal for mira's own progress lines (``--verbose`` shows everything).

    Environment variables are set before Flower's processes start, so they inherit them.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def client_workers(cfg: Config) -> int:
    """Client processes running at once: ``federation.workers``, at most one per client and
    per core."""
    return min(cfg.federation.workers, cfg.num_clients, os.cpu_count() or 1)


def federation_config(cfg: Config, verbose: bool) -> dict[str, Any]:
    """The simulation federation for ``flwr run --federation-config``: one virtual SuperNode
    per client, ``federation.workers`` client processes sharing the cores, each reserving
    ``federation.gpus_per_client`` of a GPU."""
    cpus = os.cpu_count() or 1
    return {
        "num-supernodes": cfg.num_clients,
        "client-resources-num-cpus": max(1, cpus // client_workers(cfg)),
        "client-resources-num-gpus": float(cfg.federation.gpus_per_client),
        "init-args-num-cpus": cpus,
        "init-args-logging-level": "INFO" if verbose else "WARNING",
        # The clients' own logs (and Ray's notices about its actors) stay out of the
        # terminal unless asked for; a client's error still reaches the run as its reason.
        "init-args-log-to-driver": verbose,
        "verbose": verbose,
    }


def _toml_value(value: Any) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def app_reference(app: Any) -> str:
    """``module:attribute`` of a ClientApp: Flower's processes import it by that name.

    ``app`` is a reference already, or an object bound at the top level of an imported module
    (not this one: tests replace :data:`client_app` here, which a fresh process would not
    see).
    """
    if isinstance(app, str):
        return app
    for name, module in list(sys.modules.items()):
        if module is None or name in ("__main__", __name__):
            continue
        for attribute, value in list(vars(module).items()):
            if value is app:
                return f"{name}:{attribute}"
    raise ConfigError(
        "the ClientApp to simulate must be bound at the top level of an importable module "
        "(Flower's processes import it by name), or be given as 'module:attribute'"
    )


def write_app(
    folder: Path,
    cfg: Config,
    out_dir: Path,
    resume: bool,
    clients: str,
    relay: Path,
    verbose: bool = False,
) -> Path:
    """A Flower app for this run: a pyproject.toml naming the ServerApp, the ClientApp and the
    run config (the resolved config, written beside it; ``verbose``: the apps show the
    libraries' output). Returns the app's folder."""
    config = folder / "config.toml"
    config.write_text(to_toml(cfg))
    app_dir = folder / "app"
    app_dir.mkdir()
    pyproject = {
        "project": {
            "name": "mira-run",
            "version": "1.0.0",
            "description": "One mira run on Flower's Simulation Engine",
            "license": "Apache-2.0",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "mira",
                    "components": {"serverapp": SERVER_APP, "clientapp": clients},
                    "config": {
                        "config": str(config),
                        "overrides": "",
                        "out": str(Path(out_dir).resolve()),
                        "resume": resume,
                        "verbose": verbose,
                        "relay": str(relay),
                    },
                }
            }
        },
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return app_dir


def _scripts_path() -> str:
    """PATH with this Python's scripts first: Flower starts ``flwr-simulation`` by name."""
    return os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def end_process_tree(pid: int, grace: float = STOP_GRACE) -> None:
    """SIGTERM a process and all its descendants, then SIGKILL those still there after
    ``grace`` seconds."""
    try:
        root = psutil.Process(pid)
        family = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for process in family:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _gone, alive = psutil.wait_procs(family, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


class LocalSuperLink:
    """A SuperLink in simulation mode for one run, on a free loopback port, with its FLWR_HOME
    in ``folder``: no runtime dependency installation (the apps use this environment), no
    update check, no telemetry unless FLWR_TELEMETRY_ENABLED says otherwise.

    Plaintext on 127.0.0.1: while it runs, any process on this machine can reach its port (as
    with ``flwr run``'s own local SuperLink); it is stopped, with everything it started, when
    the run ends.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.home = folder / "flwr-home"
        self.log = folder / "superlink.log"
        self.env = {
            **os.environ,
            "PATH": _scripts_path(),
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
            # The SuperExec that starts the simulation process looks for a submitted run every
            # second by default: a tenth of that, so the run starts when submitted.
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
            "PYTHONUNBUFFERED": "1",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self, name: str) -> str:
        found = shutil.which(name, path=self.env["PATH"])
        if found is None:
            raise FederationError(
                f"Flower's `{name}` command is not installed next to this Python "
                f"({sysconfig.get_path('scripts')}); reinstall mira with flwr[simulation]"
            )
        return found

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink and wait until it accepts connections."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the SuperLink's process; :meth:`wait_ready` waits for it to listen."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port = _free_port()
        connection = {"address": f"127.0.0.1:{port}", "insecure": True}
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        (self.home / "config.toml").write_text(tomli_w.dumps(config))
        command = [
            self._command("flower-superlink"),
            "--simulation",
            "--insecure",
            *("--host", "127.0.0.1", "--port", str(port)),
            "--disable-runtime-dependency-installation",
        ]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # this run stops it, not a Ctrl-C to the terminal
            )
        self.launched = time.monotonic()

    def wait_ready(self) -> None:
        """Wait until the launched SuperLink accepts connections (``STARTUP_TIMEOUT`` after
        its launch at most)."""
        assert self.process is not None, "launch() first"
        deadline = self.launched + STARTUP_TIMEOUT
        while not _listening(self.port):
            code = self.process.poll()
            if code is not None or time.monotonic() > deadline:
                state = f"exited with code {code}" if code is not None else "did not start"
                raise FederationError(
                    f"Flower's SuperLink {state} within {STARTUP_TIMEOUT:g}s; its log:\n"
                    + _tail(self.log)
                )
            time.sleep(POLL_SECONDS)

    def run(
        self, app_dir: Path, federation: dict[str, Any], relay: RelayReader, verbose: bool
    ) -> str:
        """Submit the app with ``flwr run --stream`` and replay the relay until the run ends:
        the ServerApp wrote its outcome (then ``flwr run`` is stopped at once, and the
        display's ``shutdown`` phase begins), or Flower's run ended without one.

        Flower's stream (its logs, the ServerApp's and, with ``verbose``, Ray's and the
        clients') goes to the terminal with ``verbose``; otherwise its last lines are kept.
        Returns them.
        """
        settings = " ".join(f"{key}={_toml_value(v)}" for key, v in federation.items())
        command = [
            self._command("flwr"),
            *("run", str(app_dir), CONNECTION),
            *("--federation-config", settings),
            "--stream",
        ]
        tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
        cli = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.folder,
            start_new_session=True,
        )
        assert cli.stdout is not None
        reader = threading.Thread(target=_read_stream, args=(cli.stdout, tail, verbose))
        reader.start()
        try:
            while cli.poll() is None and not relay.ended:
                relay.poll()
                time.sleep(POLL_SECONDS)
            relay.poll()
            if relay.ended:
                relay.progress.phase("shutdown")
            else:
                reader.join()
        finally:
            if cli.poll() is None:
                end_process_tree(cli.pid, DONE_GRACE if relay.ended else STOP_GRACE)
            reader.join(timeout=STOP_GRACE)
        return "\n".join(tail)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop the SuperLink and everything it started (the simulation, Ray), SIGKILLing
        what is left ``grace`` seconds after SIGTERM."""
        if self.process is not None:
            end_process_tree(self.process.pid, grace)
            self.process.wait()
            self.process = None


def _read_stream(stream: IO[bytes], tail: collections.deque[str], verbose: bool) -> None:
    """Keep the last lines of ``flwr run``'s stream (for an error message, so without colour
    codes) and, with ``verbose``, print each line: as Flower coloured it on a terminal, plain
    when the output is piped or written to a file or NO_COLOR is set."""
    coloured = not plain_console()
    for raw in stream:
        line = raw.decode(errors="replace").rstrip("\n")
        plain = plain_text(line)
        tail.append(plain)
        if verbose:
            print(line if coloured else plain, flush=True)


def run_simulation(
    cfg: Config,
    out_dir: Path,
    verbose: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    clients: Any = None,
) -> None:
    """Run ``cfg`` on Flower's Simulation Engine, one virtual SuperNode per client, into
    ``out_dir`` (continuing the run there with ``resume``).

    ``progress`` shows the run (plain lines by default); ``clients`` replaces mira's ClientApp
    (a ClientApp at the top level of an importable module, or its ``module:attribute``; tests
    inject faults this way). An exception the ServerApp raised is raised here.
    """
    progress = progress or Progress(verbose)
    progress.phase("preflight")
    if not verbose:
        quiet_libraries()
    # A client with no GPU share still sees the machine's GPUs (model.device decides), as
    # this process does when it reports the device; Ray would otherwise hide them.
    os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    clientapp = app_reference(clients if clients is not None else client_app)
    watchdog = guard()
    try:
        with tempfile.TemporaryDirectory(prefix="mira-run-", ignore_cleanup_errors=True) as tmp:
            folder = Path(tmp)
            superlink, relay = LocalSuperLink(folder), None
            # Its start (seconds of imports in a process of its own) overlaps the checks.
            superlink.launch()
            try:
                preflight(cfg)
                progress.phase("engine")
                progress.note(
                    f"starting the Simulation Engine: {client_workers(cfg)} client process(es) "
                    f"for {cfg.num_clients} clients, each loading {cfg.model.name}"
                )
                superlink.wait_ready()
                relay = RelayReader(folder / "relay.jsonl", progress)
                app_dir = write_app(folder, cfg, out_dir, resume, clientapp, relay.path, verbose)
                flower_tail = superlink.run(
                    app_dir, federation_config(cfg, verbose), relay, verbose
                )
            finally:
                superlink.stop(DONE_GRACE if relay is not None and relay.ended else STOP_GRACE)
    finally:
        progress.close()
        watchdog.close()
    assert relay is not None
    if relay.error is not None:
        raise relay.error
    if not relay.done:
        raise FederationError(
            "Flower's simulation stopped before the ServerApp finished; its last lines:\n"
            + flower_tail
        )
    if not RunLayout(out_dir).metrics.is_file():
        raise FederationError("the simulation ended before the first round completed")
