"""Fingerprint projection: seeded, normalised, chunk-independent, inner products preserved."""

from __future__ import annotations

import numpy as np
import pytest

from mira.graph.fingerprint import CHUNK_ROWS, project, projection_matrix


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    vector = np.random.default_rng(0).standard_normal(5000)
    first, again = project(vector, dim=64, seed=3), project(vector, dim=64, seed=3)
    np.testing.assert_array_equal(first, again)
    other = project(vector, dim=64, seed=4)
    # Independent projections of the same vector are nearly orthogonal in 64-d.
    assert abs(float(first @ other)) < 0.5
    assert first.shape == (64,) and first.dtype == np.float64
    assert np.linalg.norm(first) == pytest.approx(1.0, abs=1e-12)
    assert np.linalg.norm(project(vector * 1e6, dim=64, seed=3)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_chunked_equals_dense_reference(distribution: str) -> None:
    rng = np.random.default_rng(1)
    # Parts that straddle block boundaries (CHUNK_ROWS = 8192) in sorted-key order.
    parts: dict[str, np.ndarray] = {
        "b.lora_B": rng.standard_normal((70, 130)),  # 9100 values, crosses the first boundary
        "a.lora_A": rng.standard_normal(3000).astype(np.float32),
        "c.lora_A": rng.standard_normal((5, 1000)),
    }
    flat = np.concatenate([parts[k].ravel() for k in sorted(parts)]).astype(np.float64)
    assert flat.size > 2 * CHUNK_ROWS
    dense = projection_matrix(flat.size, dim=32, seed=9, distribution=distribution)
    assert dense.shape == (flat.size, 32)
    if distribution == "rademacher":
        assert set(np.unique(dense)) == {-1.0, 1.0}
    reference = flat @ dense.astype(np.float64)
    reference /= np.linalg.norm(reference)
    result = project(parts, dim=32, seed=9, distribution=distribution)
    np.testing.assert_allclose(result, reference, rtol=0, atol=1e-6)
    # Key order of the mapping does not matter; only the sorted layout does.
    reordered = {k: parts[k] for k in reversed(list(parts))}
    np.testing.assert_array_equal(
        project(reordered, dim=32, seed=9, distribution=distribution), result
    )
    # Same layout split differently: one flat array gives the same fingerprint.
    np.testing.assert_allclose(
        project(flat, dim=32, seed=9, distribution=distribution), result, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_inner_products_are_approximately_preserved(distribution: str) -> None:
    # Johnson–Lindenstrauss: a projected cosine errs by about (1 - cos^2) / sqrt(dim) = 1/16.
    rng = np.random.default_rng(2)
    d = 20_000
    base = rng.standard_normal(d)
    base /= np.linalg.norm(base)
    errors = []
    for target in (0.0, 0.3, 0.6, 0.9):
        noise = rng.standard_normal(d)
        noise -= (noise @ base) * base
        other = target * base + np.sqrt(1 - target**2) * noise / np.linalg.norm(noise)
        assert float(base @ other) == pytest.approx(target, abs=1e-9)
        projected = project(base, seed=5, distribution=distribution) @ project(
            other, seed=5, distribution=distribution
        )
        errors.append(abs(float(projected) - target))
    assert max(errors) < 0.25  # 4 standard deviations
    assert np.mean(errors) < 0.1


def test_identical_layouts_give_identical_fingerprints_and_close_updates_close() -> None:
    rng = np.random.default_rng(3)
    update = {"layer.0": rng.standard_normal((8, 40)), "layer.1": rng.standard_normal((40, 8))}
    nudged = {k: v + 0.01 * rng.standard_normal(v.shape) for k, v in update.items()}
    unrelated = {k: rng.standard_normal(v.shape) for k, v in update.items()}
    fp, fp_nudged, fp_far = (project(u, dim=128) for u in (update, nudged, unrelated))
    assert float(fp @ fp_nudged) > 0.99
    assert abs(float(fp @ fp_far)) < 0.4
    # Scale does not matter: fingerprints compare directions.
    np.testing.assert_allclose(
        project({k: 7 * v for k, v in update.items()}, dim=128), fp, atol=1e-6
    )


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"'w' has 1 non-finite values"):
        project({"v": np.ones(4), "w": np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match="non-finite"):
        project(np.array([np.inf, 1.0]))
    with pytest.raises(ValueError, match="zero vector: all 6 values are 0"):
        project({"a": np.zeros(2), "b": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="empty"):
        project({})
    with pytest.raises(ValueError, match="empty"):
        project(np.zeros(0))
    with pytest.raises(ValueError, match="not real-valued"):
        project(np.array([1 + 2j]))
    with pytest.raises(ValueError, match="dim must be >= 1"):
        project(np.ones(3), dim=0)
    with pytest.raises(ValueError, match="unknown distribution"):
        project(np.ones(3), distribution="cauchy")
