"""Clustering client fingerprints into task groups, and comparing partitions.

The server clusters the fingerprints clients send (:mod:`mira.graph.fingerprint`); the labels
feed :func:`mira.graph.sources.cluster_graph`. Scikit-learn does the clustering and the scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mira.config import CLUSTER_METHODS

Labels = Sequence[int] | np.ndarray
"""Cluster label of every client, in client order."""


def check_fingerprints(fingerprints: np.ndarray) -> np.ndarray:
    """Fingerprints as a finite float64 K x d matrix; ValueError naming the bad client."""
    points = np.asarray(fingerprints, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] < 1:
        raise ValueError(f"fingerprints must be a K x d matrix with K >= 1, got {points.shape}")
    if not np.all(np.isfinite(points)):
        row = int(np.argwhere(~np.isfinite(points))[0][0])
        raise ValueError(f"fingerprint of client {row} has non-finite values")
    return points


def connected_components(adjacency: np.ndarray) -> list[int]:
    """Cluster label of every client: the connected components of the graph, in order."""
    k = adjacency.shape[0]
    labels = [-1] * k
    current = 0
    for start in range(k):
        if labels[start] >= 0:
            continue
        stack = [start]
        labels[start] = current
        while stack:
            node = stack.pop()
            for other in np.flatnonzero(adjacency[node] > 0):
                if labels[other] < 0:
                    labels[other] = current
                    stack.append(int(other))
        current += 1
    return labels


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
    points = check_fingerprints(fingerprints)
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
    # A k above K / 2 always leaves a cluster of at most one client, which is chosen only when
    # every k does: those are tried only then (with hundreds of clients, half the fits or less).
    for span in ((low, min(high, num // 2)), (max(low, num // 2 + 1), high)):
        if candidates and any(np.bincount(c).min() >= 2 for c in candidates.values()):
            break
        for trial in range(span[0], span[1] + 1):
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
