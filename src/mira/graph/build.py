"""The task graph of a run: which ``server.graph`` source, built from what, and checked.

Pure apart from its inputs: a validated config and, for fingerprint graphs, the clients'
fingerprints (a [K, d] array that the server received; it never sees data). The step is
checked here, before any training, with the project's one stability check
(:func:`mira.core.mixing.check_step`): ``server.step * max degree`` must stay below 1 under a
fixed-step ``mira``, else the self-weight ``1 - step * degree`` leaves (0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mira.config import FINGERPRINT_GRAPHS, RULES, Config, ConfigError, FixedStep
from mira.core.mixing import check_step, validate_adjacency
from mira.graph import sources
from mira.graph.clustering import adjusted_rand_index, cluster_fingerprints, connected_components


@dataclass
class TaskGraph:
    """The graph a run uses: adjacency a_kl, cluster of every client, where it came from."""

    adjacency: np.ndarray
    clusters: list[int]
    source: str
    info: dict[str, Any] = field(default_factory=dict)


def needs_fingerprints(cfg: Config) -> bool:
    """Whether the server must ask the clients for fingerprints before round 1.

    Only graph-using rules need a graph (:attr:`mira.config.Rule.uses_graph`): ``fedit`` and
    ``local`` never read it.
    """
    return cfg.server.graph in FINGERPRINT_GRAPHS and RULES[cfg.server.method].uses_graph


def declared_labels(tasks: list[str]) -> list[int]:
    """Declared task names -> labels 0, 1, ... in order of first appearance."""
    order: dict[str, int] = {}
    return [order.setdefault(t, len(order)) for t in tasks]


def check_config_step(cfg: Config, adjacency: np.ndarray | None) -> None:
    """Refuse a fixed MIRA step too large for the graph (before training), as a ConfigError.

    A :class:`~mira.config.LearnedMix` (``server.step = "auto"``) has no step to check: each
    client's mix weight lies in [0, 1].
    """
    policy = cfg.server.policy
    if not RULES[cfg.server.method].uses_step or not isinstance(policy, FixedStep):
        return
    # Fingerprint graphs are scaled to max degree 1 when they are built.
    graph = np.ones((2, 2)) - np.eye(2) if adjacency is None else adjacency
    try:
        check_step(policy.step, graph)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def static_graph(cfg: Config) -> TaskGraph | None:
    """The graph when it needs no fingerprints (None for 'clusters' and 'knn'), checked."""
    tasks = cfg.client_tasks
    k = len(tasks)
    source = cfg.server.graph
    if source in FINGERPRINT_GRAPHS:
        check_config_step(cfg, None)
        return None
    if source == "tasks":
        result = TaskGraph(sources.declared_task_graph(tasks), declared_labels(tasks), "tasks")
    elif source == "full":
        result = TaskGraph(sources.full_graph(k), [0] * k, "full")
    elif source == "random":
        adjacency = sources.random_graph(k, cfg.federation.seed, cfg.server.random_threshold)
        result = TaskGraph(adjacency, connected_components(adjacency), "random")
    else:
        try:
            adjacency = sources.load_matrix(source, k)
        except ValueError as err:
            raise ConfigError(f"server.graph: {err}") from err
        result = TaskGraph(adjacency, connected_components(adjacency), f"file:{source}")
    check_config_step(cfg, result.adjacency)
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
        result = cluster_fingerprints(
            fingerprints,
            method=server.cluster_method,
            k=server.num_clusters or None,
            seed=cfg.federation.seed,
        )
        labels = [int(c) for c in result.labels]
        if server.edge_weights == "rbf":
            adjacency = sources.rbf_graph(fingerprints, labels)
        else:
            adjacency = sources.cluster_graph(labels)
        if server.knn:
            adjacency = sources.add_knn_edges(adjacency, fingerprints, server.knn)
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
        adjacency = sources.knn_graph(fingerprints, server.knn, weights=server.edge_weights)
        labels = connected_components(adjacency)
        info["knn"] = server.knn
    info["ari_vs_declared_tasks"] = float(adjusted_rand_index(declared_labels(tasks), labels))
    built = TaskGraph(validate_adjacency(adjacency), labels, server.graph, info)
    check_config_step(cfg, built.adjacency)
    return built


def placeholder_graph(cfg: Config) -> TaskGraph:
    """The graph recorded by rules that use none (fedit, local) when the config names a
    fingerprint graph: no edges, every client its own cluster."""
    k = cfg.num_clients
    return TaskGraph(np.zeros((k, k)), list(range(k)), "none", {"used_by_rule": False})
