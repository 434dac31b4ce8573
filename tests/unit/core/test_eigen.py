"""Top eigenpairs through LAPACK's C entry points against numpy's full eigh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mira.core import eigen

pytestmark = pytest.mark.skipif(
    not eigen.lapack_available(), reason="scipy's cython_lapack could not be loaded"
)


def gram(rng: np.random.Generator, size: int, rank: int) -> np.ndarray:
    """A size x size positive semi-definite matrix of the given rank, like the pull's core."""
    factor = rng.standard_normal((size, rank)) * np.logspace(0, -3, rank)
    return factor @ factor.T


def check_pairs(matrix: np.ndarray, values: np.ndarray, vectors: np.ndarray) -> None:
    """Eigenpairs of `matrix` to about eps * ||matrix||, orthonormal vectors."""
    full = np.linalg.eigvalsh(matrix)
    scale = float(np.abs(full).max())
    np.testing.assert_allclose(values, full[::-1][: values.size], rtol=0, atol=1e-13 * scale)
    residual = matrix @ vectors - vectors * values
    assert np.abs(residual).max() < 1e-12 * scale
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(values.size), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("size", "count"), [(2, 1), (5, 5), (30, 8), (86, 4), (86, 16), (120, 16), (40, 40)]
)
def test_top_eigenpairs_match_numpy(size: int, count: int) -> None:
    rng = np.random.default_rng([size, count])
    matrix = gram(rng, size, size)
    values, vectors = eigen.top_eigenpairs(matrix, count, 1e-14)
    reference, reference_vectors = eigen.top_eigenpairs_numpy(matrix, count, 1e-14)
    assert values.shape == (count,) and vectors.shape == (size, count)
    assert np.all(np.diff(values) <= 0)
    check_pairs(matrix, values, vectors)
    np.testing.assert_allclose(values, reference, rtol=0, atol=1e-13 * reference[0])
    # Distinct eigenvalues: the same vectors up to sign, to eps * ||matrix|| / gap.
    cosines = np.abs(np.sum(vectors * reference_vectors, axis=0))
    np.testing.assert_allclose(cosines, 1.0, atol=1e-8)


def test_eigenvalues_below_the_floor_are_dropped() -> None:
    rng = np.random.default_rng(0)
    matrix = gram(rng, 40, 6)  # rank 6: 34 eigenvalues are zero up to rounding
    values, vectors = eigen.top_eigenpairs(matrix, 16, 40 * np.finfo(float).eps)
    reference, _ = eigen.top_eigenpairs_numpy(matrix, 16, 40 * np.finfo(float).eps)
    assert values.size == reference.size == 6
    check_pairs(matrix, values, vectors)


def test_zero_and_negative_matrices_keep_nothing() -> None:
    for matrix in (np.zeros((10, 10)), -np.eye(10)):
        values, vectors = eigen.top_eigenpairs(matrix, 4, 1e-14)
        assert values.shape == (0,) and vectors.shape == (10, 0)


def test_reads_the_lower_triangle_like_eigh() -> None:
    rng = np.random.default_rng(1)
    symmetric = gram(rng, 20, 20)
    skewed = symmetric + np.triu(rng.standard_normal((20, 20)), 1)  # upper triangle ignored
    values, vectors = eigen.top_eigenpairs(skewed, 5, 1e-14)
    check_pairs(symmetric, values, vectors)


def test_repeated_eigenvalues_give_an_orthonormal_basis_of_the_eigenspace() -> None:
    rng = np.random.default_rng(2)
    basis, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    spectrum = np.concatenate([[5.0, 3.0, 3.0, 3.0], np.linspace(1.0, 0.1, 26)])
    matrix = (basis * spectrum) @ basis.T
    values, vectors = eigen.top_eigenpairs(matrix, 4, 1e-14)
    np.testing.assert_allclose(values, [5.0, 3.0, 3.0, 3.0], rtol=1e-13)
    check_pairs(matrix, values, vectors)
    # The projector onto the top-4 eigenspace is unique even though the vectors are not.
    projector = vectors @ vectors.T
    np.testing.assert_allclose(projector, basis[:, :4] @ basis[:, :4].T, atol=1e-12)


def test_a_lapack_failure_falls_back_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    routines = dict(eigen._routines() or {})
    stein = routines["dstein"]

    def failing_stein(*args: int) -> None:
        stein(*args)
        np.ctypeslib.as_array((np.ctypeslib.ctypes.c_int32 * 1).from_address(args[-1]))[0] = 1

    routines["dstein"] = failing_stein
    monkeypatch.setattr(eigen, "_routines", lambda: routines)
    calls: list[int] = []
    original = eigen.top_eigenpairs_numpy

    def counted(matrix: np.ndarray, count: int, floor_ratio: float) -> tuple[np.ndarray, ...]:
        calls.append(count)
        return original(matrix, count, floor_ratio)

    monkeypatch.setattr(eigen, "top_eigenpairs_numpy", counted)
    matrix = gram(np.random.default_rng(3), 12, 12)
    values, vectors = eigen.top_eigenpairs(matrix, 3, 1e-14)
    assert calls == [3]
    check_pairs(matrix, values, vectors)


def test_threads_get_the_same_bits_as_one_thread() -> None:
    rng = np.random.default_rng(4)
    matrices = [gram(rng, size, size) for size in (86, 70, 86, 50) * 8]
    expected = [eigen.top_eigenpairs(m, 8, 1e-14) for m in matrices]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda m: eigen.top_eigenpairs(m, 8, 1e-14), matrices))
    for (values, vectors), (ref_values, ref_vectors) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(values, ref_values)
        np.testing.assert_array_equal(vectors, ref_vectors)


def test_large_matrices_use_a_fresh_workspace() -> None:
    matrix = gram(np.random.default_rng(5), 600, 600)
    values, vectors = eigen.top_eigenpairs(matrix, 4, 1e-14)
    check_pairs(matrix, values, vectors)


def test_the_step_limits_the_blas_that_the_eigensolver_uses() -> None:
    # scipy's LAPACK brings its own OpenBLAS; the step's one-thread limit must reach it too, or
    # its small BLAS calls run threaded and several times slower. A fresh interpreter, so that
    # nothing here has loaded scipy's LAPACK before the step's BLAS controller is made.
    script = """
import json
from threadpoolctl import threadpool_info
from mira.core import spaces as laplacian
with laplacian._one_blas_thread():
    from mira.core import eigen
    assert eigen.lapack_available()
    print(json.dumps({i["filepath"]: i["num_threads"] for i in threadpool_info()
                      if i["user_api"] == "blas"}))
"""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    limits = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(limits) >= 1 and all(threads == 1 for threads in limits.values()), limits


def test_only_the_expected_c_signatures_are_called() -> None:
    double = b"__pyx_t_5scipy_6linalg_13cython_lapack_d *"
    good = b"void (char *, int *, " + double + b", int *)"
    assert eigen._pointer_arguments(good, 4)
    assert not eigen._pointer_arguments(good, 5)  # another arity
    assert not eigen._pointer_arguments(b"void (char *, long *, " + double + b", int *)", 4)
    assert not eigen._pointer_arguments(b"int (char *, int *, " + double + b", int *)", 4)
