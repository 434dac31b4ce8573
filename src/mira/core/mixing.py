"""Task graph -> mixing matrix: MIRA's I - step * L and the baselines' row-stochastic rows.

MIRA (Elbakary et al., "MIRA: A Method of Federated Multi-Task Learning for Large Language
Models", IEEE Networking Letters 7(3), 2025; arXiv 2410.15524) keeps one LoRA adapter per client
and, after the local steps of a round, pulls every client toward its task-graph neighbours
(paper eq. 8; docs/design.md, "The pull"):

    W_k <- W_k - gamma * sum_l a_kl (W_k - W_l)        gamma = eta * lambda.

The update is simultaneous, so it is one matrix product over clients: W_new = M @ W with the
mixing matrix M = I - gamma * L, where L = D - A is the graph Laplacian (D = diag(delta_k),
delta_k = sum_l a_kl). Row k of M holds 1 - gamma * delta_k on the diagonal and gamma * a_kl
elsewhere; it is a convex combination exactly when gamma * max_k delta_k < 1
(:func:`check_step`, the one stability check of the project).

The baselines are other mixing matrices (:func:`fedavg_mixing`, :func:`cluster_mixing`,
:func:`cluster_merge_mixing`), and :func:`neighbour_mean_rows` gives the rows a_kl / delta_k of
each client's neighbour mean M_k that ``server.step = "auto"`` mixes with (docs/design.md,
"Personalisation strength"). A row equal to e_k ("keep your adapter") leaves client k's arrays
untouched, which is how a client not sampled this round keeps its adapter while its stored copy
still serves as a neighbour for the others. :mod:`mira.core.spaces` applies a mixing matrix to
adapters.

Conventions: an adjacency is a K x K float array, symmetric, non-negative, zero diagonal. All
functions are pure: arrays in, arrays out; nothing here reads files, configs or Flower types.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

__all__ = [
    "BoolVector",
    "FloatVector",
    "check_step",
    "cluster_merge_mixing",
    "cluster_mixing",
    "degrees",
    "fedavg_mixing",
    "laplacian",
    "max_stable_step",
    "mix_weights",
    "mixing_matrix",
    "neighbour_mean_rows",
    "validate_adjacency",
]

FloatVector = Sequence[float] | np.ndarray
"""Per-client numbers (LoRA scales, data weights) as a sequence or a 1-D array."""

BoolVector = Sequence[bool] | np.ndarray
"""Per-client flags (True for the clients sampled this round) as a sequence or a 1-D array."""

_SYMMETRY_RTOL = 1e-9


# --------------------------------------------------------------------------------------------
# Graph -> mixing matrix
# --------------------------------------------------------------------------------------------


def validate_adjacency(adjacency: np.ndarray, num_clients: int | None = None) -> np.ndarray:
    """Check a task-graph adjacency and return it as an exactly symmetric float64 copy.

    A valid adjacency (the a_kl of paper eq. 8) is a finite, square, symmetric, non-negative
    K x K array with a zero diagonal. Symmetry is checked to a relative tolerance of 1e-9 (a
    matrix read from a text file may carry rounding); the copy returned is symmetrised. A
    self-edge a_kk would do nothing in the pull (W_k - W_k = 0) yet inflate delta_k, so it is
    refused rather than ignored. This is the one adjacency check of the project
    (:func:`mira.graph.check_adjacency` is this function).

    Args:
        adjacency: the K x K weights a_kl.
        num_clients: the expected K, or None to accept any size.

    Raises:
        ValueError: naming the problem (not numeric, not square, wrong size, non-finite,
            negative entry a[i,j], not symmetric, non-zero diagonal).
    """
    try:
        a = np.array(adjacency, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"adjacency is not numeric: {err}") from err
    if a.ndim != 2:
        raise ValueError(f"adjacency must be a 2-d K x K matrix, got shape {a.shape}")
    rows, cols = a.shape
    if num_clients is not None and (rows, cols) != (num_clients, num_clients):
        raise ValueError(
            f"expected {num_clients} x {num_clients} for {num_clients} clients, got {rows} x {cols}"
        )
    if rows != cols:
        raise ValueError(f"adjacency must be a square K x K matrix, got {rows} x {cols}")
    if not np.all(np.isfinite(a)):
        i, j = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"adjacency has a non-finite entry a[{i},{j}] = {a[i, j]}")
    if np.any(a < 0):
        i, j = np.argwhere(a < 0)[0]
        raise ValueError(f"adjacency has a negative entry a[{i},{j}] = {a[i, j]}")
    asymmetry = np.abs(a - a.T)
    if a.size and np.any(asymmetry > _SYMMETRY_RTOL * max(1.0, float(np.max(np.abs(a))))):
        i, j = np.unravel_index(int(np.argmax(asymmetry)), a.shape)
        raise ValueError(
            f"adjacency is not symmetric: a[{i},{j}] = {a[i, j]} but a[{j},{i}] = {a[j, i]}"
        )
    diagonal = np.diag(a)
    if np.any(diagonal != 0):
        d = int(np.flatnonzero(diagonal)[0])
        raise ValueError(
            f"adjacency has a non-zero diagonal: a[{d},{d}] = {diagonal[d]} (must be 0)"
        )
    # (a + a.T) / 2 is bit-exact for an already symmetric matrix.
    return (a + a.T) / 2


def degrees(adjacency: np.ndarray) -> np.ndarray:
    """Degrees delta_k = sum_l a_kl of an adjacency (not validated)."""
    return np.asarray(adjacency, dtype=np.float64).sum(axis=1)


def max_stable_step(adjacency: np.ndarray) -> float:
    """The bound a server step must stay below: 1 / max_k delta_k (inf for a graph without
    edges). The self-weight of client k in the pull is 1 - step * delta_k; it stays in (0, 1]
    exactly when step < 1 / max_k delta_k."""
    top = float(degrees(adjacency).max(initial=0.0)) if np.size(adjacency) else 0.0
    return float("inf") if top <= 0.0 else 1.0 / top


def check_step(step: float, adjacency: np.ndarray) -> None:
    """Refuse a MIRA step the graph cannot take: the self-weight 1 - step * delta_k must stay
    in (0, 1], so step must be finite, >= 0 and below 1 / max_k delta_k.

    The one stability check of the project: :func:`mixing_matrix` calls it, and the config is
    checked with it before any training (:func:`mira.graph.build.check_config_step`).

    Raises:
        ValueError: naming the step, the largest degree and the largest allowed step.
    """
    step = float(step)
    if not np.isfinite(step) or step < 0:
        raise ValueError(f"server.step must be a finite number >= 0, got {step!r}")
    bound = max_stable_step(adjacency)
    if step >= bound:
        raise ValueError(
            f"server.step = {step:g} is too large for this graph: server.step * max degree = "
            f"{step / bound:.4g} >= 1 (the self-weight 1 - step * degree would leave (0, 1]); "
            f"lower server.step below {bound:.4g} or normalise the graph"
        )


def laplacian(adjacency: np.ndarray) -> np.ndarray:
    """Graph Laplacian L = D - A of a validated adjacency (D = diag of the degrees delta_k)."""
    a = validate_adjacency(adjacency)
    return np.diag(a.sum(axis=1)) - a


def mixing_matrix(
    adjacency: np.ndarray, step: float, active: BoolVector | None = None
) -> np.ndarray:
    """The MIRA mixing matrix M = I - step * L of paper eq. 8, so that W_new = M @ W.

    Row k is (1 - step * delta_k) e_k + step * a_k: the self-weight must stay in (0, 1], hence
    the requirement step * max_k delta_k < 1. A client that is not active this round gets the
    identity row (it keeps its adapter); its column is untouched, so its stored adapter still
    pulls its active neighbours.

    Args:
        adjacency: the K x K task graph a_kl (see :func:`validate_adjacency`).
        step: the server step gamma = eta * lambda, >= 0.
        active: K booleans, True for the clients sampled this round; None means all.

    Raises:
        ValueError: on a bad adjacency, a negative or non-finite step, or
            step * max degree >= 1.
    """
    a = validate_adjacency(adjacency)
    check_step(step, a)
    step = float(step)
    mixing = step * a
    mixing[np.diag_indices_from(mixing)] = 1.0 - step * degrees(a)
    is_active = _active_mask(active, a.shape[0])
    mixing[~is_active] = 0.0
    inactive = np.flatnonzero(~is_active)
    mixing[inactive, inactive] = 1.0
    return mixing


def neighbour_mean_rows(adjacency: np.ndarray, active: BoolVector | None = None) -> np.ndarray:
    """Rows of the neighbour means M_k = sum_l a_kl W_l / delta_k (docs/design.md,
    "Personalisation strength").

    Row k is a_k / delta_k for an active client with delta_k > 0, and zero otherwise (an
    isolated or inactive client has no mean to mix with). With M_k, MIRA's pull reads
    W_k <- (1 - alpha_k) W_k + alpha_k M_k with alpha_k = step * delta_k.
    """
    a = validate_adjacency(adjacency)
    degree = degrees(a)
    rows = np.zeros_like(a)
    has_mean = (degree > 0) & _active_mask(active, a.shape[0])
    rows[has_mean] = a[has_mean] / degree[has_mean, None]
    return rows


def mix_weights(mixing: np.ndarray) -> np.ndarray:
    """Per client, the share of its new adapter that came from others: 1 - M[k, k].

    This is the ``mix_weight`` a run records: step * delta_k for MIRA's fixed step, 0 for local
    training and for a client that kept its adapter, (n - 1) / n for an equally weighted member
    of a cluster of n under cluster-fedavg.
    """
    return 1.0 - np.diag(np.asarray(mixing, dtype=np.float64))


# --------------------------------------------------------------------------------------------
# Baseline mixing matrices (each row stochastic)
# --------------------------------------------------------------------------------------------


def fedavg_mixing(weights: FloatVector, active: BoolVector | None = None) -> np.ndarray:
    """FedAvg (FedIT): every row is the normalised weights of the active clients.

    Everyone, sampled or not, receives the one global model sum_l w_l W_l / sum_l w_l over the
    active clients l.

    Raises:
        ValueError: on negative or non-finite weights, or no active weight.
    """
    w = _weights(weights)
    is_active = _active_mask(active, len(w))
    row = np.where(is_active, w, 0.0)
    total = row.sum()
    if total <= 0:
        raise ValueError("fedavg needs at least one active client with a positive weight")
    return np.tile(row / total, (len(w), 1))


def cluster_mixing(
    labels: Sequence[Hashable] | np.ndarray, weights: FloatVector, active: BoolVector | None = None
) -> np.ndarray:
    """Cluster-FedAvg baseline: row k averages the active members of k's cluster.

    Every member of a cluster (sampled or not) receives the same cluster model, the
    weight-normalised average over the cluster's active members. A cluster with no active
    member (or only zero weights) keeps its adapters: its rows are identity rows.
    """
    w = _weights(weights)
    is_active = _active_mask(active, len(w))
    mixing = np.eye(len(w))
    for members in _clusters(labels, len(w)):
        row = np.zeros(len(w))
        row[members] = np.where(is_active[members], w[members], 0.0)
        if row.sum() > 0:
            mixing[members] = row / row.sum()
    return mixing


def cluster_merge_mixing(
    labels: Sequence[Hashable] | np.ndarray, weights: FloatVector, active: BoolVector | None = None
) -> np.ndarray:
    """Cluster-merge baseline: cluster averages merged with equal weight into one global model.

    Each cluster with active members is averaged over them (weight-normalised); those cluster
    models are then averaged with equal weight, and everyone receives the result.

    Raises:
        ValueError: when no cluster has an active member with a positive weight.
    """
    w = _weights(weights)
    is_active = _active_mask(active, len(w))
    cluster_rows = []
    for members in _clusters(labels, len(w)):
        row = np.zeros(len(w))
        row[members] = np.where(is_active[members], w[members], 0.0)
        if row.sum() > 0:
            cluster_rows.append(row / row.sum())
    if not cluster_rows:
        raise ValueError("cluster-merge needs at least one active client with a positive weight")
    merged = np.mean(cluster_rows, axis=0)
    return np.tile(merged, (len(w), 1))


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _active_mask(active: BoolVector | None, num_clients: int) -> np.ndarray:
    if active is None:
        return np.ones(num_clients, dtype=bool)
    mask = np.asarray(active)
    if mask.shape != (num_clients,):
        raise ValueError(f"active must hold {num_clients} booleans, got shape {mask.shape}")
    if mask.dtype != np.bool_ and not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"active must hold booleans, got {mask.tolist()}")
    return mask.astype(bool)


def _weights(weights: FloatVector) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    return w


def _clusters(labels: Sequence[Hashable] | np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Client indices per cluster label, in order of first appearance."""
    if len(labels) != num_clients:
        raise ValueError(f"got {len(labels)} cluster labels for {num_clients} clients")
    groups: dict[Hashable, list[int]] = {}
    for k, label in enumerate(labels):
        groups.setdefault(label, []).append(k)
    return [np.asarray(members) for members in groups.values()]
