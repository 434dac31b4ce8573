"""Task graphs for MIRA's Laplacian pull: where the weights a_kl come from.

MIRA (Elbakary et al., IEEE Networking Letters 7(3), 2025; arXiv 2410.15524) regularises
``sum_k f_k(W_k) + lambda/2 * sum_k sum_l a_kl ||W_k - W_l||^2`` and takes the server step
``W_k <- W_k - gamma * sum_l a_kl (W_k - W_l)``. Every function here builds or checks the
K x K adjacency ``A = (a_kl)`` in client order.

Convention for every adjacency returned: float64, symmetric, non-negative, zero diagonal, and
(unless loaded from a user file) largest degree ``delta_k = sum_l a_kl`` at most 1, so any server
step ``gamma < 1`` keeps every self-weight ``1 - gamma * delta_k`` in (0, 1].

Pure numpy: functions take and return arrays; only :func:`load_matrix` reads a file. Clustering
of fingerprints is :mod:`mira.graph.clustering`; choosing the graph of a run from its config is
:mod:`mira.graph.build`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mira.core.mixing import degrees, validate_adjacency
from mira.graph.clustering import check_fingerprints

Labels = Sequence[int] | np.ndarray
"""Cluster label of every client, in client order."""


def scale_to_unit_max_degree(adjacency: np.ndarray, only_down: bool = False) -> np.ndarray:
    """Divide the whole graph by its largest degree max_k delta_k, so that it becomes 1
    (with ``only_down``, only when it exceeds 1; an empty graph is returned unchanged).

    Every entry is divided by the same number. Dividing each row by its own degree
    (a_kl / delta_k) would make the matrix row-stochastic but generally not symmetric
    (a_kl / delta_k != a_lk / delta_l when delta_k != delta_l), and the pull would then no longer
    be the gradient of the symmetric Laplacian regulariser lambda/2 sum a_kl ||W_k - W_l||^2:
    pairs would be pulled together with unequal strengths. A global scale keeps symmetry, keeps
    the ratios between edges, and makes any server step below 1 stable.
    """
    matrix = validate_adjacency(adjacency)
    top = float(np.max(degrees(matrix))) if matrix.size else 0.0
    if top <= 0.0 or (only_down and top <= 1.0):
        return matrix
    return matrix / top


def cluster_graph(labels: Labels) -> np.ndarray:
    """Uniform within-cluster graph: a_kl = 1 / (n_c - 1) for k != l both in cluster c.

    Each client of a cluster of size n_c >= 2 then has degree exactly 1; singletons have degree 0
    (no neighbour, pure local training). The matrix is symmetric because a_kl depends only on the
    shared cluster.
    """
    label_array = np.asarray(labels)
    if label_array.ndim != 1:
        raise ValueError(f"labels must be a 1-d sequence, got shape {label_array.shape}")
    num = label_array.shape[0]
    matrix = np.zeros((num, num), dtype=np.float64)
    for label in np.unique(label_array):
        members = np.flatnonzero(label_array == label)
        if members.size < 2:
            continue
        matrix[np.ix_(members, members)] = 1.0 / (members.size - 1)
    np.fill_diagonal(matrix, 0.0)
    return matrix


def declared_task_graph(client_tasks: Sequence[str]) -> np.ndarray:
    """Oracle graph from declared tasks: clients of the same task are uniform neighbours."""
    _names, labels = np.unique(np.asarray(list(client_tasks), dtype=object), return_inverse=True)
    return cluster_graph(labels.astype(np.int64))


def full_graph(num_clients: int) -> np.ndarray:
    """Fully connected graph with a_kl = 1 / (K - 1): every client has degree 1 (K >= 2)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    return cluster_graph(np.zeros(num_clients, dtype=np.int64))


def load_matrix(path: str | Path, num_clients: int) -> np.ndarray:
    """Read a user-supplied K x K adjacency (.json list of lists, .csv without header, or .npy).

    The matrix is validated with :func:`mira.core.mixing.validate_adjacency` but not rescaled:
    the caller decides between refusing an unstable step and :func:`scale_to_unit_max_degree`.
    Every error is a ValueError naming the file and the problem.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"graph file {file} does not exist")
    suffix = file.suffix.lower()
    try:
        if suffix == ".json":
            raw: object = json.loads(file.read_text())
        elif suffix == ".csv":
            raw = _read_csv(file)
        elif suffix == ".npy":
            raw = np.load(file, allow_pickle=False)
        else:
            raise ValueError(f"unknown format {suffix!r}; use .json, .csv or .npy")
        matrix = _as_float_matrix(raw, strings_allowed=suffix == ".csv")
        return validate_adjacency(matrix, num_clients)
    except ValueError as err:
        raise ValueError(f"graph file {file}: {err}") from err


def _read_csv(file: Path) -> list[list[str]]:
    rows = []
    for line in file.read_text().splitlines():
        if line.strip():
            rows.append([cell.strip() for cell in line.split(",")])
    return rows


def _as_float_matrix(raw: object, strings_allowed: bool) -> np.ndarray:
    """A 2-d float array from nested lists / an array, with a precise error otherwise."""
    if isinstance(raw, np.ndarray):
        if raw.ndim != 2:
            raise ValueError(f"expected a 2-d matrix, got an array of shape {raw.shape}")
        if not np.issubdtype(raw.dtype, np.number) or np.issubdtype(raw.dtype, np.complexfloating):
            raise ValueError(f"non-numeric array of dtype {raw.dtype}")
        return raw.astype(np.float64)
    if not isinstance(raw, list) or not all(isinstance(row, list) for row in raw):
        raise ValueError("expected a list of rows (a list of lists of numbers)")
    widths = {len(row) for row in raw}
    if len(widths) > 1:
        raise ValueError(f"rows have different lengths: {sorted(widths)}")
    values = np.empty((len(raw), widths.pop() if widths else 0), dtype=np.float64)
    for i, row in enumerate(raw):
        for j, cell in enumerate(row):
            allowed = (int, float, str) if strings_allowed else (int, float)
            if isinstance(cell, bool) or not isinstance(cell, allowed):
                raise ValueError(f"non-numeric entry at row {i}, column {j}: {cell!r}")
            try:
                values[i, j] = float(cell)
            except ValueError:
                raise ValueError(f"non-numeric entry at row {i}, column {j}: {cell!r}") from None
    return values


def _squared_distances(points: np.ndarray) -> np.ndarray:
    sq = np.sum(points * points, axis=1)
    dist2 = sq[:, None] + sq[None, :] - 2.0 * points @ points.T
    np.fill_diagonal(dist2, 0.0)
    return np.maximum((dist2 + dist2.T) / 2.0, 0.0)


def median_bandwidth(fingerprints: np.ndarray) -> float:
    """Median heuristic: sigma = median distance between distinct clients (1.0 if all equal)."""
    points = check_fingerprints(fingerprints)
    dist2 = _squared_distances(points)
    off = np.sqrt(dist2[~np.eye(points.shape[0], dtype=bool)])
    sigma = float(np.median(off)) if off.size else 0.0
    return sigma if sigma > 0.0 else 1.0


def _rbf(points: np.ndarray, bandwidth: float | None) -> np.ndarray:
    sigma = median_bandwidth(points) if bandwidth is None else float(bandwidth)
    if not sigma > 0.0 or not np.isfinite(sigma):
        raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
    weights = np.exp(-_squared_distances(points) / (2.0 * sigma * sigma))
    np.fill_diagonal(weights, 0.0)
    return weights


def rbf_graph(
    fingerprints: np.ndarray,
    labels: Labels | None = None,
    bandwidth: float | None = None,
) -> np.ndarray:
    """RBF-kernel graph a_kl = exp(-||f_k - f_l||^2 / (2 sigma^2)), scaled to max degree 1.

    fingerprints: [K, d] client fingerprints.
    labels: cluster labels; when given, only within-cluster pairs keep their weight.
    bandwidth: sigma; None = median heuristic (:func:`median_bandwidth`).

    The whole matrix is divided by its largest degree (:func:`scale_to_unit_max_degree`), so it
    stays
    symmetric, the most connected client has degree exactly 1 like in :func:`cluster_graph`, and
    the same server step means the same strength whichever graph source is chosen.
    """
    points = check_fingerprints(fingerprints)
    weights = _rbf(points, bandwidth)
    if labels is not None:
        label_array = np.asarray(labels)
        if label_array.shape != (points.shape[0],):
            raise ValueError(f"labels must have one entry per client ({points.shape[0]})")
        weights = weights * (label_array[:, None] == label_array[None, :])
    return scale_to_unit_max_degree(weights)


def _nearest(points: np.ndarray, k: int) -> np.ndarray:
    """Indices [K, k] of each client's k nearest other clients (ties broken by index)."""
    dist2 = _squared_distances(points)
    np.fill_diagonal(dist2, np.inf)
    return np.argsort(dist2, axis=1, kind="stable")[:, :k]


def knn_graph(
    fingerprints: np.ndarray,
    k: int,
    weights: str = "uniform",
    bandwidth: float | None = None,
) -> np.ndarray:
    """Symmetrised k-nearest-neighbour graph, scaled to max degree 1.

    fingerprints: [K, d] client fingerprints.
    k: neighbours per client (clipped to K - 1); an edge exists when either end chose the other.
    weights: 'uniform' (every edge 1) or 'rbf' (RBF kernel, see :func:`rbf_graph`).
    bandwidth: RBF sigma; None = median heuristic.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if weights not in ("uniform", "rbf"):
        raise ValueError(f"unknown knn weights {weights!r}; choose 'uniform' or 'rbf'")
    points = check_fingerprints(fingerprints)
    num = points.shape[0]
    edges = np.zeros((num, num), dtype=bool)
    if num > 1:
        nearest = _nearest(points, min(k, num - 1))
        edges[np.repeat(np.arange(num), nearest.shape[1]), nearest.ravel()] = True
    edges |= edges.T
    strength = _rbf(points, bandwidth) if weights == "rbf" else np.ones((num, num))
    return scale_to_unit_max_degree(np.where(edges, strength, 0.0))


def add_knn_edges(adjacency: np.ndarray, fingerprints: np.ndarray, k: int = 1) -> np.ndarray:
    """Give every isolated client (degree 0) edges to its k nearest clients.

    Each new edge has weight 1 / k, so a formerly isolated client gets degree 1 like a member of
    a uniform cluster; the edge is added in both directions to keep symmetry. If that raises some
    degree above 1, the whole graph is divided by its largest degree
    (:func:`scale_to_unit_max_degree`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    points = check_fingerprints(fingerprints)
    matrix = validate_adjacency(adjacency, points.shape[0]).copy()
    num = points.shape[0]
    isolated = np.flatnonzero(matrix.sum(axis=1) == 0.0)
    if num < 2 or isolated.size == 0:
        return matrix
    nearest = _nearest(points, min(k, num - 1))
    weight = 1.0 / nearest.shape[1]
    for client in isolated:
        for other in nearest[client]:
            matrix[client, other] = matrix[other, client] = max(matrix[client, other], weight)
    return scale_to_unit_max_degree(matrix, only_down=True)


def random_graph(num_clients: int, seed: int, threshold: float = 0.5) -> np.ndarray:
    """Random symmetric graph of the MIRA paper's experiments, scaled to max degree 1.

    a_kl = a_lk ~ Uniform[0, 1] for k < l and entries below ``threshold`` set to 0, as in the
    experiments of Elbakary et al.; then the whole matrix is divided by its largest degree (see
    :func:`scale_to_unit_max_degree`). Same seed, same graph.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.uniform(0.0, 1.0, size=(num_clients, num_clients)), k=1)
    upper[upper < threshold] = 0.0
    return scale_to_unit_max_degree(upper + upper.T)
