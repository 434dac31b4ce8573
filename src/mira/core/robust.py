"""The robust pull: a bound on how far any one neighbour can move a client (docs/design.md,
"Faults and trust").

Every server rule is a mixing matrix M applied to the clients' adapters (:mod:`mira.core.rules`),
and every row of M sums to one, so client k's new adapter reads

    new_k = W_k + sum_{l != k} M[k, l] (W_l - W_k).

Norm screening refuses only an update far beyond the round's median; an update inside that bound
but pointing the wrong way (a sign-flipped update at -9x) still enters every neighbour's pull at
full weight. The robust pull clips each neighbour's difference to a multiple c of the median
difference over all the graph's edges this round,

    D_kl = W_l - W_k  ->  D_kl * min(1, tau / ||D_kl||),    tau = c * median ||D_kl||,

which is the same as shrinking the edge weight M[k, l] by that factor and giving what it lost to
the client's own weight M[k, k]: the row still sums to one and stays convex, so the result is
again a mixing matrix that :func:`mira.core.rules.apply_mixing` applies in either space. A
poisoned client touches the few edges it sits on; the median of all edges stays an honest one
while fewer than half of them are poisoned. Distances are measured in the space the pull acts
in (:func:`pairwise_distances`): the stored tensors in factor space, the effective updates
s_k B_k A_k in product space (without forming an out x in matrix).

All functions are pure: arrays in, arrays out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mira.core.adapters import Adapter, to_modules

__all__ = ["bounded_mixing", "edge_reference", "pairwise_distances"]


def pairwise_distances(
    adapters: Sequence[Adapter],
    space: str,
    scales: Sequence[float],
    pairs: np.ndarray | None = None,
) -> np.ndarray:
    """K x K Euclidean distances ||W_k - W_l|| between the clients' adapters, in float64.

    ``space`` 'factor': of all stored tensors together (equal shapes needed). 'product': of the
    effective updates s_k B_k A_k summed over modules, from the Gram matrix
    <s_k B_k A_k, s_l B_l A_l> = s_k s_l tr((B_k^T B_l)(A_l A_k^T)), which only needs r x r
    products, so the clients may have different ranks. ``pairs`` (K x K, true where a distance
    is needed, e.g. the graph's edges) limits the product space's pair products to those:
    the other entries are then 0, not distances.
    """
    k = len(adapters)
    if k == 0:
        return np.zeros((0, 0))
    wanted = np.ones((k, k), dtype=bool) if pairs is None else np.asarray(pairs, dtype=bool)
    wanted = wanted | wanted.T
    if space == "factor":
        # Tensor by tensor: a K x (one tensor) block at a time, never a float64 copy of every
        # client's whole adapter (K x d, e.g. 100 clients of a 7B model's rank-16 adapter).
        gram = np.zeros((k, k))
        for key in sorted(adapters[0]):
            block = np.stack([np.ravel(np.asarray(a[key], dtype=np.float64)) for a in adapters])
            gram += block @ block.T
    elif space == "product":
        modules = [to_modules(a) for a in adapters]
        gram = np.zeros((k, k))
        for name in modules[0]:
            factors = [
                (
                    np.asarray(m[name][0], dtype=np.float64),
                    float(s) * np.asarray(m[name][1], dtype=np.float64),
                )
                for m, s in zip(modules, scales, strict=True)
            ]
            for i in range(k):
                a_i, b_i = factors[i]
                for j in range(i, k):
                    if j != i and not wanted[i, j]:
                        continue
                    a_j, b_j = factors[j]
                    inner = float(np.sum((b_i.T @ b_j) * (a_i @ a_j.T)))
                    gram[i, j] += inner
                    if j != i:
                        gram[j, i] += inner
    else:
        raise ValueError(f"unknown pull space {space!r}; expected 'factor' or 'product'")
    norms = np.diag(gram)
    squared = norms[:, None] + norms[None, :] - 2.0 * gram
    distances = np.sqrt(np.clip(squared, 0.0, None))
    distances[~wanted] = 0.0
    np.fill_diagonal(distances, 0.0)
    return distances


def edge_reference(mixing: np.ndarray, distances: np.ndarray) -> float:
    """The median ||W_l - W_k|| over the edges of ``mixing`` (off-diagonal entries > 0), or 0
    when it has none."""
    m = np.asarray(mixing, dtype=np.float64)
    edges = (m > 0) & ~np.eye(m.shape[0], dtype=bool)
    return float(np.median(distances[edges])) if np.any(edges) else 0.0


def bounded_mixing(mixing: np.ndarray, distances: np.ndarray, multiple: float) -> np.ndarray:
    """``mixing`` with every neighbour's difference clipped to ``multiple`` x the edge median.

    Off-diagonal M[k, l] becomes M[k, l] * min(1, tau / d_kl) with tau = multiple *
    :func:`edge_reference`; the diagonal takes what the row lost, so every row still sums to
    what it summed to before (one, for the rules' matrices). Rows with no edge, edges of length
    0 and a reference of 0 are left as they are.

    Raises:
        ValueError: ``multiple`` not a positive finite number, or shapes that disagree.
    """
    if not np.isfinite(multiple) or multiple <= 0:
        raise ValueError(f"the robust pull's multiple must be a positive number, got {multiple!r}")
    m = np.array(mixing, dtype=np.float64, copy=True)
    d = np.asarray(distances, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or d.shape != m.shape:
        raise ValueError(f"mixing {m.shape} and distances {d.shape} must be the same K x K")
    tau = multiple * edge_reference(m, d)
    if tau <= 0:
        return m
    off = ~np.eye(m.shape[0], dtype=bool)
    shrink = np.ones_like(m)
    far = off & (d > tau)
    shrink[far] = tau / d[far]
    clipped = np.where(off, m * shrink, 0.0)
    lost = np.where(off, m, 0.0).sum(axis=1) - clipped.sum(axis=1)
    clipped[np.diag_indices_from(clipped)] = np.diag(m) + lost
    return clipped
