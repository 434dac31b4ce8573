"""Run a federation on Flower's Simulation Engine inside the calling process."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mira.config import Config
from mira.data import load_client_data
from mira.federation.client_app import app as client_app
from mira.federation.server_app import make_server_app
from mira.federation.strategy import FederationError, build_graph
from mira.model import prepare_model


def preflight(cfg: Config) -> str:
    """Everything that can fail before training: graph vs step, model, every client's data.

    Returns the local source of the base model (converted and cached once, here, so the
    workers only load it).
    """
    build_graph(cfg)
    base_source = prepare_model(cfg.model)
    for partition in range(cfg.num_clients):
        load_client_data(cfg, partition)
    return base_source


def run_simulation(cfg: Config, out_dir: Path, verbose: bool = False) -> None:
    """Start the Simulation Engine with one virtual SuperNode per client and run ``cfg``."""
    from flwr.simulation import run_simulation as flower_run_simulation

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
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    errors: list[BaseException] = []
    flower_run_simulation(
        server_app=make_server_app(cfg, out_dir, base_source, errors),
        client_app=client_app,
        num_supernodes=cfg.num_clients,
        backend_config=backend_config,  # type: ignore[arg-type]
        verbose_logging=verbose,
    )
    if errors:
        raise errors[0]
    if not (out_dir / "metrics.jsonl").is_file():
        raise FederationError("the simulation ended before the first round completed")
