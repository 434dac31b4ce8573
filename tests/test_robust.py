"""The robust pull (mira.core.robust) against direct recomputation with full matrices."""

from __future__ import annotations

import numpy as np
import pytest

from mira.core.adapters import from_modules
from mira.core.mixing import cluster_mixing, mixing_matrix
from mira.core.robust import bounded_mixing, edge_reference, pairwise_distances
from mira.core.rules import apply_mixing

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
