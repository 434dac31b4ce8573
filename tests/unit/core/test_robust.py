"""The robust pull (mira.core.robust) against direct recomputation with full matrices."""

from __future__ import annotations

import numpy as np
import pytest

from mira.core.adapters import from_modules
from mira.core.mixing import cluster_mixing, mixing_matrix, neighbour_mean_rows
from mira.core.robust import bounded_mixing, edge_reference, pairwise_distances
from mira.core.rules import apply_mixing, bound_pull, neighbour_means

RNG = np.random.default_rng(7)


def adapter(rank: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    return from_modules(
        {
            f"m{i}": (RNG.normal(size=(rank, 6)), scale * RNG.normal(size=(5, rank)))
            for i in range(2)
        }
    )


def product(a: dict[str, np.ndarray], s: float) -> np.ndarray:
    names = sorted({key.split(".lora_")[0] for key in a})
    return np.concatenate(
        [(s * a[f"{n}.lora_B.weight"] @ a[f"{n}.lora_A.weight"]).ravel() for n in names]
    )


def test_factor_distances_are_those_of_the_flattened_tensors() -> None:
    adapters = [adapter(3) for _ in range(4)]
    flat = [np.concatenate([a[k].ravel() for k in sorted(a)]) for a in adapters]
    expected = np.array([[np.linalg.norm(x - y) for y in flat] for x in flat])
    np.testing.assert_allclose(pairwise_distances(adapters, "factor", [1.0] * 4), expected)


def test_product_distances_are_those_of_the_full_products_with_mixed_ranks() -> None:
    adapters = [adapter(2), adapter(4), adapter(3)]
    scales = [2.0, 0.5, 1.0]
    full = [product(a, s) for a, s in zip(adapters, scales, strict=True)]
    expected = np.array([[np.linalg.norm(x - y) for y in full] for x in full])
    got = pairwise_distances(adapters, "product", scales)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert np.all(np.diag(got) == 0)


def test_distances_of_the_edges_only_are_those_of_every_pair_there() -> None:
    """The pull asks for the edges' distances only (in product space, K^2 pair products would
    dominate a round with many clients); on those pairs they are the full computation's."""
    adapters = [adapter(r) for r in (2, 4, 3, 2, 4)]
    scales = [2.0, 0.5, 1.0, 1.5, 0.25]
    mixing = np.eye(5) * 0.5
    mixing[0, 1] = mixing[1, 0] = mixing[2, 4] = mixing[4, 2] = 0.5
    edges = mixing > 0
    for space, group in (("product", adapters), ("factor", [adapter(2) for _ in range(5)])):
        full = pairwise_distances(group, space, scales)
        some = pairwise_distances(group, space, scales, pairs=edges)
        off = edges & ~np.eye(5, dtype=bool)
        np.testing.assert_allclose(some[off], full[off], rtol=1e-12)
        assert np.all(some[~edges] == 0)
        np.testing.assert_array_equal(
            bounded_mixing(mixing, some, 1.0), bounded_mixing(mixing, full, 1.0)
        )


def test_bounded_mixing_keeps_rows_and_clips_only_far_edges() -> None:
    # Six clients on a complete graph, five of them 1 apart, the last 9 from everyone: 5 of the
    # 15 edges are long, so the median edge is an honest one.
    adjacency = np.ones((6, 6)) - np.eye(6)
    mixing = mixing_matrix(adjacency, 0.1)
    distances = np.where(np.eye(6, dtype=bool), 0.0, 1.0)
    distances[5, :5] = distances[:5, 5] = 9.0
    assert edge_reference(mixing, distances) == 1.0
    bounded = bounded_mixing(mixing, distances, 2.0)
    np.testing.assert_allclose(bounded.sum(axis=1), 1.0)
    # Edges of length 1 are within 2 x the median: untouched.
    assert bounded[0, 1] == mixing[0, 1] and bounded[1, 2] == mixing[1, 2]
    # An edge of length 9 is cut to length 2: weight x 2/9, the rest back to the client itself.
    assert bounded[0, 5] == pytest.approx(mixing[0, 5] * 2 / 9)
    assert bounded[0, 0] == pytest.approx(mixing[0, 0] + mixing[0, 5] * 7 / 9)
    # The far client itself is pulled by clipped differences too.
    np.testing.assert_allclose(bounded[5, :5], mixing[5, :5] * 2 / 9)


def test_a_large_multiple_changes_nothing() -> None:
    mixing = cluster_mixing([0, 0, 0, 1, 1], [1.0] * 5)
    distances = pairwise_distances([adapter(2) for _ in range(5)], "factor", [1.0] * 5)
    np.testing.assert_array_equal(bounded_mixing(mixing, distances, 1e9), mixing)


def test_a_sign_flipped_neighbour_moves_an_honest_client_at_most_the_bound() -> None:
    # Two clusters of four, client 3 of the first sends its adapter sign-flipped at x9: it sits
    # on 3 of the 12 edges, so the median edge is an honest one.
    honest = [adapter(2, 0.1) for _ in range(8)]
    adapters = [*honest]
    adapters[3] = {key: -9.0 * value for key, value in honest[3].items()}
    mixing = cluster_mixing([0, 0, 0, 0, 1, 1, 1, 1], [1.0] * 8)
    distances = pairwise_distances(adapters, "factor", [1.0] * 8)
    bounded = bounded_mixing(mixing, distances, 1.0)
    tau = edge_reference(mixing, distances)
    plain = apply_mixing(adapters, mixing, "factor", [1.0] * 8)[0]
    robust = apply_mixing(adapters, bounded, "factor", [1.0] * 8)[0]
    # Client 0's adapter had the flipped neighbour sent nothing (its honest edges as bounded).
    honest_only = {
        key: adapters[0][key]
        + sum(bounded[0, j] * (adapters[j][key] - adapters[0][key]) for j in (1, 2))
        for key in adapters[0]
    }

    def gap(a: dict[str, np.ndarray]) -> float:
        return float(np.sqrt(sum(np.sum((a[k] - honest_only[k]) ** 2) for k in a)))

    # The flipped client moves client 0 by its edge weight times the bound, at most ...
    assert gap(robust) <= mixing[0, 3] * tau + 1e-9
    # ... where without the bound it moved it by its whole (x10) difference.
    assert gap(robust) < gap(plain) / 2


@pytest.mark.parametrize("multiple", [0.0, -1.0, float("nan"), float("inf")])
def test_a_multiple_that_is_not_positive_and_finite_is_refused(multiple: float) -> None:
    with pytest.raises(ValueError, match="positive number"):
        bounded_mixing(np.eye(2), np.zeros((2, 2)), multiple)


def test_bound_pull_off_is_the_rule_itself_and_on_is_bounded_mixing() -> None:
    adapters = [adapter(2) for _ in range(6)]
    mixing = cluster_mixing([0, 0, 0, 1, 1, 1], [1.0] * 6)
    assert bound_pull(mixing, adapters, "factor", [1.0] * 6, 0.0) is mixing
    distances = pairwise_distances(adapters, "product", [2.0] * 6)
    np.testing.assert_array_equal(
        bound_pull(mixing, adapters, "product", [2.0] * 6, 1.5),
        bounded_mixing(mixing, distances, 1.5),
    )


def test_the_auto_neighbour_mean_under_the_bound_keeps_some_of_the_clients_own_weight() -> None:
    honest = [adapter(2, 0.1) for _ in range(8)]
    adapters = [*honest]
    adapters[3] = {key: -9.0 * value for key, value in honest[3].items()}
    adjacency = np.zeros((8, 8))
    for members in ([0, 1, 2, 3], [4, 5, 6, 7]):
        for i in members:
            for j in members:
                adjacency[i, j] = float(i != j)
    active = [True] * 8
    plain = neighbour_means(adapters, adjacency, active, "factor", [1.0] * 8)[0]
    robust = neighbour_means(adapters, adjacency, active, "factor", [1.0] * 8, robust=1.0)[0]
    rows = bounded_mixing(
        neighbour_mean_rows(adjacency, active),
        pairwise_distances(adapters, "factor", [1.0] * 8),
        1.0,
    )
    assert plain is not None and robust is not None
    assert rows[0, 0] > 0 and rows[0].sum() == pytest.approx(1.0)
    for key in robust:
        expected = sum(rows[0, j] * adapters[j][key] for j in range(8))
        np.testing.assert_allclose(robust[key], expected, rtol=1e-6, atol=1e-9)
    # The flipped client's share of client 0's mean is cut.
    assert rows[0, 3] < 1 / 3


def test_rules_that_send_one_global_model_ignore_server_robust() -> None:
    """fedit and cluster-merge have no pull toward neighbours to bound: they accept the key
    and apply 0, so one config with server.robust serves every method of `mira compare`."""
    from mira.config import load_config

    for method in ("fedit", "cluster-merge"):
        cfg = load_config(None, [f"server.method={method}", "server.robust=2"])
        assert cfg.server.robust == 2 and cfg.server.pull_bound == 0
    for method in ("mira", "cluster-fedavg", "local"):
        cfg = load_config(None, [f"server.method={method}", "server.robust=2"])
        assert cfg.server.pull_bound == 2
