"""Run a federation on Flower's Simulation Engine inside the calling process."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mira.client.model import prepare_model
from mira.client.ranks import client_rank
from mira.config import Config, ConfigError
from mira.core import rules
from mira.data import load_client_data
from mira.federation.client_app import app as client_app
from mira.federation.server import FederationError
from mira.federation.server_app import make_server_app
from mira.graph.build import static_graph


def preflight(cfg: Config) -> str:
    """Everything that can fail before training: graph vs step, model, every client's data.

    Returns the local source of the base model (converted and cached once, here, so the
    workers only load it).
    """
    static_graph(cfg)
    base_source = prepare_model(cfg.model)
    try:
        ranks = [client_rank(cfg, partition) for partition in range(cfg.num_clients)]
        rules.resolve_pull_space(cfg.server.pull_space, ranks)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    for partition in range(cfg.num_clients):
        load_client_data(cfg, partition)
    return base_source


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


def run_simulation(cfg: Config, out_dir: Path, verbose: bool = False, resume: bool = False) -> None:
    """Start the Simulation Engine with one virtual SuperNode per client and run ``cfg``."""
    from flwr.simulation import run_simulation as flower_run_simulation

    if not verbose:
        quiet_libraries()
    base_source = preflight(cfg)
    cpus = os.cpu_count() or 1
    workers = min(cfg.federation.workers, cfg.num_clients, cpus)
    backend_config = {
        "client_resources": {"num_cpus": max(1, cpus // workers), "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "include_dashboard": False,
            "logging_level": logging.WARNING if not verbose else logging.INFO,
        },
    }
    errors: list[BaseException] = []
    flower_run_simulation(
        server_app=make_server_app(cfg, out_dir, base_source, errors, resume=resume),
        client_app=client_app,
        num_supernodes=cfg.num_clients,
        backend_config=backend_config,  # type: ignore[arg-type]
        verbose_logging=verbose,
    )
    if errors:
        raise errors[0]
    if not (out_dir / "metrics.jsonl").is_file():
        raise FederationError("the simulation ended before the first round completed")
