"""Run a federation on Flower's Simulation Engine inside the calling process.

This process is the server: it checks the config, builds the base model once, and never
touches a GPU (no CUDA context: ``resolve_device`` asks NVML). Each client process (a Ray
actor) loads the model on ``model.device``; ``federation.gpus_per_client`` is its Ray GPU
share, so several clients can train on one GPU at once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mira.client.model import check_target_modules, prepare_model, resolve_device
from mira.client.ranks import client_rank
from mira.config import Config, ConfigError
from mira.core import rules
from mira.data import load_client_data
from mira.federation.client_app import app as client_app
from mira.federation.preflight import check_lengths, check_model
from mira.federation.progress import Progress
from mira.federation.server import FederationError
from mira.federation.server_app import make_server_app
from mira.federation.watchdog import guard
from mira.graph.build import static_graph
from mira.results.rundir import METRICS


def preflight(cfg: Config) -> str:
    """Everything that can fail before training: graph vs step, model (it loads), device, LoRA
    target modules, every client's rank and data (files decode, targets fit model.max_length).

    Returns the local source of the base model (converted and cached once, here, so the
    workers only load it).
    """
    static_graph(cfg)
    base_source = prepare_model(cfg.model)
    tokenizer = check_model(cfg)
    check_target_modules(cfg.model, cfg.lora)
    check_gpu_share(cfg, resolve_device(cfg.model)[0])
    try:
        ranks = [client_rank(cfg, partition) for partition in range(cfg.num_clients)]
        rules.resolve_pull_space(cfg.server.pull_space, ranks)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    for partition in range(cfg.num_clients):
        load_client_data(cfg, partition)
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


class _DropDeprecationNotice(logging.Filter):
    """Hide Flower's notice that the in-process ``run_simulation`` entry point is deprecated:
    ``mira run`` uses it on purpose so the whole federation lives inside one command."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


def quiet_libraries() -> None:
    """Keep the terminal for mira's own progress lines (``--verbose`` shows everything).

    Environment variables are set before Ray starts, so its workers inherit them.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.WARNING)
    flwr_logger.addFilter(_DropDeprecationNotice())


def run_simulation(
    cfg: Config,
    out_dir: Path,
    verbose: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    clients: Any = None,
) -> None:
    """Start the Simulation Engine with one virtual SuperNode per client and run ``cfg``.

    ``progress`` shows the run (plain lines by default); ``clients`` replaces mira's ClientApp
    (tests inject faults this way). A watchdog ends the engine's processes when this one ends,
    even by SIGKILL (:mod:`mira.federation.watchdog`).
    """
    from flwr.simulation import run_simulation as flower_run_simulation

    if not verbose:
        quiet_libraries()
    base_source = preflight(cfg)
    # A client with no GPU share still sees the machine's GPUs (model.device decides), as
    # this process does when it reports the device; Ray would otherwise hide them.
    os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    cpus = os.cpu_count() or 1
    workers = min(cfg.federation.workers, cfg.num_clients, cpus)
    backend_config = {
        "client_resources": {
            "num_cpus": max(1, cpus // workers),
            "num_gpus": cfg.federation.gpus_per_client,
        },
        "init_args": {
            "num_cpus": cpus,
            "include_dashboard": False,
            "logging_level": logging.WARNING if not verbose else logging.INFO,
            # The clients' own logs (and Ray's notices about its actors) stay out of the
            # terminal unless asked for; a client's error still reaches the run as its reason.
            "log_to_driver": verbose,
        },
    }
    errors: list[BaseException] = []
    progress = progress or Progress(verbose)
    progress.note(
        f"starting the Simulation Engine: {workers} client process(es) for "
        f"{cfg.num_clients} clients, each loading {cfg.model.name}"
    )
    watchdog = guard()
    try:
        flower_run_simulation(
            server_app=make_server_app(
                cfg, out_dir, base_source, errors, resume=resume, progress=progress
            ),
            client_app=clients if clients is not None else client_app,
            num_supernodes=cfg.num_clients,
            backend_config=backend_config,  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    finally:
        progress.close()
        watchdog.close()
    if errors:
        raise errors[0]
    if not (out_dir / METRICS).is_file():
        raise FederationError("the simulation ended before the first round completed")
