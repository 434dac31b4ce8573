"""The task graph a run uses: which ``server.graph`` source, built from what, and checked.

Pure apart from its inputs: a validated config and, for fingerprint graphs, the clients'
fingerprints (a [K, d] array that the server received; it never sees data). The step
check lives here so that it runs before any training: ``server.step * max degree`` must
stay below 1 under ``mira``, else the self-weight ``1 - step * degree`` leaves (0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mira import graph, rules
from mira.config import FINGERPRINT_GRAPHS, Config, ConfigError


@dataclass
class TaskGraph:
    adjacency: np.ndarray
    clusters: list[int]
    source: str
    info: dict[str, Any] = field(default_factory=dict)


def needs_fingerprints(cfg: Config) -> bool:
    return cfg.server.graph in FINGERPRINT_GRAPHS


def _task_labels(tasks: list[str]) -> list[int]:
    order: dict[str, int] = {}
    return [order.setdefault(t, len(order)) for t in tasks]


def check_step(cfg: Config, adjacency: np.ndarray | None) -> None:
    """Refuse a MIRA step too large for the graph (before training)."""
    if cfg.server.method != "mira":
        return
    # Fingerprint graphs are scaled to max degree 1 when they are built.
    degree = 1.0 if adjacency is None else float(adjacency.sum(axis=1).max(initial=0.0))
    if cfg.server.step * degree >= 1.0:
        raise ConfigError(
            f"server.step = {cfg.server.step} is too large for this graph: step * max degree = "
            f"{cfg.server.step * degree:.3g} >= 1 (the self-weight 1 - step * degree would "
            f"leave (0, 1]); use server.step < {1.0 / degree:.4g}"
        )


def static_graph(cfg: Config) -> TaskGraph | None:
    """The graph when it needs no fingerprints (None for 'clusters' and 'knn'), checked."""
    tasks = cfg.client_tasks
    k = len(tasks)
    source = cfg.server.graph
    if source in FINGERPRINT_GRAPHS:
        check_step(cfg, None)
        return None
    if source == "tasks":
        adjacency = graph.task_graph(tasks)
        result = TaskGraph(adjacency, _task_labels(tasks), "tasks")
    elif source == "full":
        result = TaskGraph(graph.full_graph(k), [0] * k, "full")
    elif source == "random":
        adjacency = graph.random_graph(k, cfg.federation.seed, cfg.server.random_threshold)
        result = TaskGraph(adjacency, rules.connected_components(adjacency), "random")
    else:
        try:
            adjacency = graph.load_matrix(source, k)
        except ValueError as err:
            raise ConfigError(f"server.graph: {err}") from err
        result = TaskGraph(adjacency, rules.connected_components(adjacency), f"file:{source}")
    check_step(cfg, result.adjacency)
    return result


def fingerprint_graph(cfg: Config, fingerprints: np.ndarray) -> TaskGraph:
    """'clusters' or 'knn' from the clients' fingerprints, with its quality recorded.

    ``info`` holds the chosen k and its silhouette (clusters), and the adjusted Rand index
    of the clusters against the declared task labels.
    """
    tasks = cfg.client_tasks
    server = cfg.server
    info: dict[str, Any] = {"fingerprint": server.fingerprint, "dim": server.fingerprint_dim}
    if server.graph == "clusters":
        result = graph.cluster_fingerprints(
            fingerprints,
            method=server.cluster_method,
            k=server.num_clusters or None,
            seed=cfg.federation.seed,
        )
        labels = [int(c) for c in result.labels]
        if server.edge_weights == "rbf":
            adjacency = graph.rbf_graph(fingerprints, labels)
        else:
            adjacency = graph.cluster_graph(labels)
        if server.knn:
            adjacency = graph.add_knn_edges(adjacency, fingerprints, server.knn)
        info.update(
            {
                "cluster_method": server.cluster_method,
                "k": int(result.k),
                "k_chosen": "given" if server.num_clusters else "silhouette",
                "silhouette": float(result.score),
                "silhouette_by_k": {str(k): float(v) for k, v in result.scores.items()},
            }
        )
    else:
        adjacency = graph.knn_graph(fingerprints, server.knn, weights=server.edge_weights)
        labels = rules.connected_components(adjacency)
        info["knn"] = server.knn
    info["ari_vs_declared_tasks"] = float(graph.adjusted_rand_index(_task_labels(tasks), labels))
    built = TaskGraph(graph.check_adjacency(adjacency), labels, server.graph, info)
    check_step(cfg, built.adjacency)
    return built
