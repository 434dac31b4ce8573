"""Task graphs for MIRA's Laplacian pull: where the weights a_kl come from.

MIRA (Elbakary et al., IEEE Networking Letters 7(3), 2025; arXiv 2410.15524) regularises
``sum_k f_k(W_k) + lambda/2 * sum_k sum_l a_kl ||W_k - W_l||^2`` and takes the server step
``W_k <- W_k - gamma * sum_l a_kl (W_k - W_l)``. Every function here builds or checks the
K x K adjacency ``A = (a_kl)`` in client order.

Convention for every adjacency returned: float64, symmetric, non-negative, zero diagonal, and
(unless loaded from a user file) largest degree ``delta_k = sum_l a_kl`` at most 1, so any server
step ``gamma < 1`` keeps every self-weight ``1 - gamma * delta_k`` in (0, 1].

Pure numpy / scikit-learn: functions take and return arrays; only :func:`load_matrix` reads a
file and only :func:`plot_adjacency` writes one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mira.laplacian import validate_adjacency

Labels = Sequence[int] | np.ndarray
"""Cluster label of every client, in client order."""


def check_adjacency(adjacency: np.ndarray, num_clients: int | None = None) -> np.ndarray:
    """Validate a task graph; see :func:`mira.laplacian.validate_adjacency` (the one check)."""
    return validate_adjacency(adjacency, num_clients)


def degrees(adjacency: np.ndarray) -> np.ndarray:
    """Degrees delta_k = sum_l a_kl."""
    return np.asarray(adjacency, dtype=np.float64).sum(axis=1)


def max_stable_step(adjacency: np.ndarray) -> float:
    """Largest server step gamma is allowed to approach: 1 / max_k delta_k (inf if no edges).

    The self-weight of client k in the pull is 1 - gamma * delta_k; it stays in (0, 1] exactly
    when gamma < 1 / max_k delta_k (DESIGN.md, stability facts).
    """
    top = float(np.max(degrees(adjacency))) if np.size(adjacency) else 0.0
    return float("inf") if top <= 0.0 else 1.0 / top


def normalise_rows(adjacency: np.ndarray) -> np.ndarray:
    """Scale the whole graph so its largest degree is 1 (empty graphs are returned unchanged).

    Every entry is divided by the same number, max_k delta_k. Dividing each row by its own
    degree (a_kl / delta_k) would make the matrix row-stochastic but generally not symmetric
    (a_kl / delta_k != a_lk / delta_l when delta_k != delta_l), and the pull would then no longer
    be the gradient of the symmetric Laplacian regulariser lambda/2 sum a_kl ||W_k - W_l||^2:
    pairs would be pulled together with unequal strengths. A global scale keeps symmetry, keeps
    the ratios between edges, and makes any gamma < 1 stable.
    """
    matrix = check_adjacency(adjacency)
    top = float(np.max(degrees(matrix))) if matrix.size else 0.0
    return matrix if top <= 0.0 else matrix / top


def _scale_to_unit_degree(matrix: np.ndarray) -> np.ndarray:
    """Divide by the largest degree when it exceeds 1 (never scale a graph up)."""
    top = float(np.max(matrix.sum(axis=1))) if matrix.size else 0.0
    return matrix / top if top > 1.0 else matrix


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


def task_graph(client_tasks: Sequence[str]) -> np.ndarray:
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

    The matrix is validated with :func:`check_adjacency` but not rescaled: the caller decides
    between refusing an unstable step and :func:`normalise_rows`. Every error is a ValueError
    naming the file and the problem.
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
        return check_adjacency(matrix, num_clients)
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


# --- Graphs from client fingerprints (issue "Task graph from clustering of client fingerprints")


@dataclass(frozen=True)
class ClusterResult:
    """Outcome of :func:`cluster_fingerprints`.

    labels: cluster of every client, numbered 0, 1, ... in order of first appearance.
    k: number of clusters.
    score: silhouette of the chosen solution (0.0 when k == 1 or k == K, where it is undefined).
    scores: silhouette of every k tried by the automatic choice (empty when k was given).
    """

    labels: np.ndarray
    k: int
    score: float
    scores: dict[int, float] = field(default_factory=dict)


CLUSTER_METHODS = ("kmeans", "agglomerative")


def _check_fingerprints(fingerprints: np.ndarray) -> np.ndarray:
    points = np.asarray(fingerprints, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] < 1:
        raise ValueError(f"fingerprints must be a K x d matrix with K >= 1, got {points.shape}")
    if not np.all(np.isfinite(points)):
        row = int(np.argwhere(~np.isfinite(points))[0][0])
        raise ValueError(f"fingerprint of client {row} has non-finite values")
    return points


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0, 1, ... in order of first appearance (stable, readable output)."""
    _values, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse].astype(np.int64)


def _fit_labels(points: np.ndarray, method: str, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering, KMeans

    if k == 1:
        return np.zeros(points.shape[0], dtype=np.int64)
    if method == "kmeans":
        model = KMeans(n_clusters=k, n_init=10, random_state=seed)
        return _canonical(model.fit_predict(points))
    # Ward linkage is deterministic and matches k-means' within-cluster variance objective.
    return _canonical(AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(points))


def _silhouette(points: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    k = int(np.unique(labels).size)
    if k < 2 or k > points.shape[0] - 1:
        return 0.0
    return float(silhouette_score(points, labels, metric="euclidean"))


def cluster_fingerprints(
    fingerprints: np.ndarray,
    method: str = "kmeans",
    k: int | None = None,
    k_range: tuple[int, int] | None = None,
    seed: int = 0,
) -> ClusterResult:
    """Cluster client fingerprints [K, d] into task groups; labels feed :func:`cluster_graph`.

    method: 'kmeans' (k-means, n_init=10, random_state=seed) or 'agglomerative' (Ward linkage).
    k: number of clusters; None chooses it automatically.
    k_range: inclusive (k_min, k_max) tried by the automatic choice; None = (2, K - 1).
    seed: k-means initialisation seed.

    Automatic k maximises the silhouette (Rousseeuw 1987) over ``k_range``. Solutions with a
    singleton cluster are skipped unless every k gives one: a singleton gets no neighbour in the
    graph, and the silhouette of a lone point is 0 by convention, which otherwise rewards
    peeling off outliers. With fewer than 3 clients or fewer than 2 distinct fingerprints there
    is nothing to choose and the answer is one cluster (k = 1).
    """
    if method not in CLUSTER_METHODS:
        raise ValueError(f"unknown clustering method {method!r}; choose one of {CLUSTER_METHODS}")
    points = _check_fingerprints(fingerprints)
    num = points.shape[0]
    distinct = int(np.unique(points, axis=0).shape[0])
    if k is not None:
        if not 1 <= k <= num:
            raise ValueError(f"k must be in [1, {num}] for {num} clients, got {k}")
        if k > distinct:
            raise ValueError(f"k = {k} exceeds the {distinct} distinct fingerprints")
        labels = _fit_labels(points, method, k, seed)
        return ClusterResult(labels=labels, k=k, score=_silhouette(points, labels))
    if num < 3 or distinct < 2:
        return ClusterResult(labels=np.zeros(num, dtype=np.int64), k=1, score=0.0)
    low, high = k_range if k_range is not None else (2, num - 1)
    low, high = max(2, low), min(high, num - 1, distinct)
    if low > high:
        raise ValueError(f"k_range {k_range} leaves no k in [2, {min(num - 1, distinct)}]")
    candidates: dict[int, np.ndarray] = {}
    scores: dict[int, float] = {}
    for trial in range(low, high + 1):
        labels = _fit_labels(points, method, trial, seed)
        candidates[trial] = labels
        scores[trial] = _silhouette(points, labels)
    no_singletons = [t for t in candidates if np.bincount(candidates[t]).min() >= 2]
    pool = no_singletons or list(candidates)
    best = max(pool, key=lambda t: (scores[t], -t))  # ties go to the smaller k
    return ClusterResult(labels=candidates[best], k=best, score=scores[best], scores=scores)


def adjusted_rand_index(labels_true: Labels, labels_pred: Labels) -> float:
    """Adjusted Rand index between two labelings (1.0 = identical partitions up to renaming)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(labels_true), np.asarray(labels_pred)))


def _squared_distances(points: np.ndarray) -> np.ndarray:
    sq = np.sum(points * points, axis=1)
    dist2 = sq[:, None] + sq[None, :] - 2.0 * points @ points.T
    np.fill_diagonal(dist2, 0.0)
    return np.maximum((dist2 + dist2.T) / 2.0, 0.0)


def median_bandwidth(fingerprints: np.ndarray) -> float:
    """Median heuristic: sigma = median distance between distinct clients (1.0 if all equal)."""
    points = _check_fingerprints(fingerprints)
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

    The whole matrix is divided by its largest degree (see :func:`normalise_rows`), so it stays
    symmetric, the most connected client has degree exactly 1 like in :func:`cluster_graph`, and
    the same server step means the same strength whichever graph source is chosen.
    """
    points = _check_fingerprints(fingerprints)
    weights = _rbf(points, bandwidth)
    if labels is not None:
        label_array = np.asarray(labels)
        if label_array.shape != (points.shape[0],):
            raise ValueError(f"labels must have one entry per client ({points.shape[0]})")
        weights = weights * (label_array[:, None] == label_array[None, :])
    return normalise_rows(weights)


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
    points = _check_fingerprints(fingerprints)
    num = points.shape[0]
    edges = np.zeros((num, num), dtype=bool)
    if num > 1:
        nearest = _nearest(points, min(k, num - 1))
        edges[np.repeat(np.arange(num), nearest.shape[1]), nearest.ravel()] = True
    edges |= edges.T
    strength = _rbf(points, bandwidth) if weights == "rbf" else np.ones((num, num))
    return normalise_rows(np.where(edges, strength, 0.0))


def add_knn_edges(adjacency: np.ndarray, fingerprints: np.ndarray, k: int = 1) -> np.ndarray:
    """Give every isolated client (degree 0) edges to its k nearest clients.

    Each new edge has weight 1 / k, so a formerly isolated client gets degree 1 like a member of
    a uniform cluster; the edge is added in both directions to keep symmetry. If that raises some
    degree above 1, the whole graph is divided by its largest degree (see :func:`normalise_rows`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    points = _check_fingerprints(fingerprints)
    matrix = check_adjacency(adjacency, points.shape[0]).copy()
    num = points.shape[0]
    isolated = np.flatnonzero(matrix.sum(axis=1) == 0.0)
    if num < 2 or isolated.size == 0:
        return matrix
    nearest = _nearest(points, min(k, num - 1))
    weight = 1.0 / nearest.shape[1]
    for client in isolated:
        for other in nearest[client]:
            matrix[client, other] = matrix[other, client] = max(matrix[client, other], weight)
    return _scale_to_unit_degree(matrix)


def random_graph(num_clients: int, seed: int, threshold: float = 0.5) -> np.ndarray:
    """Random symmetric graph of the MIRA paper's experiments, scaled to max degree 1.

    a_kl = a_lk ~ Uniform[0, 1] for k < l and entries below ``threshold`` set to 0, as in the
    experiments of Elbakary et al.; then the whole matrix is divided by its largest degree (see
    :func:`normalise_rows`). Same seed, same graph.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.uniform(0.0, 1.0, size=(num_clients, num_clients)), k=1)
    upper[upper < threshold] = 0.0
    return normalise_rows(upper + upper.T)


def plot_adjacency(
    adjacency: np.ndarray,
    client_ids: Sequence[str],
    labels: Labels | None,
    path: str | Path,
) -> Path:
    """Write a PNG heatmap of the graph, clients ordered by cluster, boundaries drawn.

    adjacency: K x K task graph.
    client_ids: tick label of every client.
    labels: cluster of every client (None = one group, client order kept).
    path: output file; parent folders are created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = check_adjacency(adjacency)
    num = matrix.shape[0]
    if len(client_ids) != num:
        raise ValueError(f"{len(client_ids)} client ids for a {num} x {num} graph")
    label_array = np.zeros(num, dtype=np.int64) if labels is None else np.asarray(labels)
    if label_array.shape != (num,):
        raise ValueError(f"labels must have one entry per client ({num})")
    order = np.argsort(label_array, kind="stable")
    ordered = matrix[np.ix_(order, order)]
    names = [str(client_ids[i]) for i in order]

    side = float(min(20.0, max(4.0, 0.35 * num + 2.5)))
    # A Figure with its own Agg canvas: no global pyplot state, safe in any process or thread.
    figure = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(ordered, cmap="viridis", vmin=0.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="a_kl")
    axes.set_xticks(range(num), names, rotation=90, fontsize=8)
    axes.set_yticks(range(num), names, fontsize=8)
    sorted_labels = label_array[order]
    for boundary in np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 0.5:
        axes.axhline(boundary, color="white", linewidth=1.5)
        axes.axvline(boundary, color="white", linewidth=1.5)
    axes.set_title(f"Task graph ({num} clients, ordered by cluster)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out
