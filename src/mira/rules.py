"""The five server rules of DESIGN.md, as pure functions of the clients' adapters.

Every rule is a K x K mixing matrix M applied to a snapshot of all stored adapters,
new_k = sum_l M[k, l] W_l, in factor space (A and B mixed separately) or product space
(s_l B_l A_l mixed, then each client's best rank-r_k approximation):

- ``local``: M = I (no communication).
- ``mira``: M = I - step * L on the sampled rows (Elbakary et al. 2025, eq. 8); every client
  keeps its OWN adapter, pulled toward its neighbours'.
- ``fedit``: every row is the example-weighted average of the sampled clients (FedIT; with
  mixed ranks the products are averaged and truncated per client, FlexLoRA).
- ``cluster-fedavg``: FedAvg inside each cluster; every member gets its cluster's model.
- ``cluster-merge``: cluster averages merged with equal weight into one global model.

Clusters are the connected components of the task graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mira import laplacian

Adapter = dict[str, np.ndarray]
LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"


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


def resolve_pull_space(pull_space: str, ranks: Sequence[int]) -> str:
    """'factor' or 'product': auto picks factor when every rank is equal."""
    equal = len(set(ranks)) == 1
    if pull_space == "auto":
        return "factor" if equal else "product"
    if pull_space == "factor" and not equal:
        raise ValueError(
            "server.pull_space = 'factor' needs equal LoRA ranks, got ranks "
            f"{sorted(set(ranks))}; use 'product' or 'auto'"
        )
    return pull_space


def mixing_for(
    method: str,
    *,
    adjacency: np.ndarray,
    step: float,
    clusters: Sequence[int],
    weights: Sequence[float],
    active: Sequence[bool],
) -> np.ndarray:
    """The mixing matrix of ``method`` for this round's sampled (``active``) clients."""
    k = adjacency.shape[0]
    if method == "local":
        return np.eye(k)
    if method == "mira":
        return laplacian.mixing_matrix(adjacency, step, active)
    if method == "fedit":
        return laplacian.fedavg_mixing(weights, active)
    if method == "cluster-fedavg":
        return laplacian.cluster_mixing(clusters, weights, active)
    if method == "cluster-merge":
        return laplacian.cluster_merge_mixing(clusters, weights, active)
    raise ValueError(f"unknown server method {method!r}")


def to_modules(adapter: Adapter) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """peft state-dict keys -> {module: (A [r, in], B [out, r])}."""
    modules = {}
    for key in adapter:
        if key.endswith(LORA_A):
            module = key[: -len(LORA_A)]
            b_key = module + LORA_B
            if b_key not in adapter:
                raise ValueError(f"adapter has {key} but no {b_key}")
            modules[module] = (adapter[key], adapter[b_key])
    if 2 * len(modules) != len(adapter):
        raise ValueError("adapter keys are not pairs of lora_A / lora_B weights")
    return modules


def from_modules(modules: dict[str, tuple[np.ndarray, np.ndarray]]) -> Adapter:
    adapter: Adapter = {}
    for module, (a, b) in modules.items():
        adapter[module + LORA_A] = a
        adapter[module + LORA_B] = b
    return adapter


def apply_rule(
    method: str,
    adapters: Sequence[Adapter],
    *,
    adjacency: np.ndarray,
    step: float,
    clusters: Sequence[int],
    weights: Sequence[float],
    active: Sequence[bool],
    ranks: Sequence[int],
    scales: Sequence[float],
    pull_space: str = "auto",
) -> list[Adapter]:
    """New stored adapter of every client after one server step (simultaneous update)."""
    mixing = mixing_for(
        method, adjacency=adjacency, step=step, clusters=clusters, weights=weights, active=active
    )
    k = len(adapters)
    unchanged = [bool(np.array_equal(mixing[i], np.eye(k)[i])) for i in range(k)]
    if all(unchanged):
        return [dict(a) for a in adapters]
    if resolve_pull_space(pull_space, ranks) == "factor":
        mixed = laplacian.factor_mix(list(adapters), mixing)
    else:
        modules = laplacian.product_mix([to_modules(a) for a in adapters], mixing, list(scales))
        mixed = [from_modules(m) for m in modules]
    # A client whose row is the identity keeps its own factors untouched (in product space a
    # refactorisation would change nothing in B @ A but would change local training).
    return [dict(adapters[i]) if unchanged[i] else mixed[i] for i in range(k)]
