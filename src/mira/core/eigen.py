"""The top eigenpairs of a small symmetric matrix, computed by LAPACK without holding the GIL.

The product-space pull (:mod:`mira.core.spaces`) spends about half of each row in one
eigendecomposition of an R x R positive semi-definite core (R about 86 for ranks 4 to 16 and 8
neighbours) of which it keeps only the top r_k <= 16 eigenpairs. numpy's ``eigh`` (LAPACK's
divide and conquer, ``dsyevd``) computes all R eigenvectors. This module computes only the kept
ones, with the four LAPACK steps that ``dsyevx`` uses but with all eigenvalues found by the
root-free QL/QR iteration instead of bisection (which is slower for a few eigenvalues of a
matrix this small):

1. ``dsytrd``: Householder reduction to a tridiagonal T = Q^T C Q;
2. ``dsterf``: every eigenvalue of T (no vectors), which decides how many are kept;
3. ``dstein``: inverse iteration for the eigenvectors of T of the kept eigenvalues;
4. ``dormtr``: back-transformation of those vectors by Q.

The routines are reached through the C entry points of :mod:`scipy.linalg.cython_lapack`,
called with :mod:`ctypes`, which releases the GIL for the duration of each call, so the threads
of :func:`mira.core.spaces.product_mix` run them in parallel (scipy's own Python wrappers hold the
GIL). Workspaces are kept per thread and matrix size, so a call allocates only its results.

Eigenvalues are accurate to about eps * ||C|| and eigenvectors have residuals of the same order,
as with ``eigh``; ``tests/unit/core/test_eigen.py`` compares the two. When scipy's LAPACK cannot
be loaded or any routine reports a failure, :func:`top_eigenpairs` falls back to
``numpy.linalg.eigh``.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["lapack_available", "top_eigenpairs", "top_eigenpairs_numpy"]

_Routine = Callable[..., None]
# Workspaces per thread, one per matrix size; sizes repeat from row to row, so few are kept.
# Larger matrices get a fresh workspace per call: their eigenproblem dwarfs the allocation.
_MAX_WORKSPACES = 64
_MAX_CACHED_SIZE = 512
_local = threading.local()


def top_eigenpairs(
    matrix: np.ndarray, count: int, floor_ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """The largest eigenvalues of a symmetric matrix and their eigenvectors.

    Keeps at most `count` eigenvalues, and only those above ``floor_ratio * largest`` (which
    count as numerically zero otherwise); nothing is kept when the largest is not positive.
    Reads the lower triangle of `matrix` (n x n, float64), as ``numpy.linalg.eigh`` does.

    Returns:
        (values [q] in descending order, vectors [n, q]) with q <= count, eigenvectors as
        orthonormal columns. q follows the same rule as in :func:`top_eigenpairs_numpy` (the
        eigenvalues of the two agree to about eps * ||C||); the vectors of a repeated
        eigenvalue may differ by a rotation within its eigenspace, as between any two solvers.
    """
    routines = _routines()
    size = matrix.shape[0]
    if routines is None or size < 2:
        return top_eigenpairs_numpy(matrix, count, floor_ratio)
    result = _top_eigenpairs_lapack(routines, matrix, count, floor_ratio)
    if result is None:  # a LAPACK routine reported a failure: use the full solver
        return top_eigenpairs_numpy(matrix, count, floor_ratio)
    return result


def top_eigenpairs_numpy(
    matrix: np.ndarray, count: int, floor_ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_eigenpairs` through ``numpy.linalg.eigh`` (all eigenpairs, then a slice)."""
    values, vectors = np.linalg.eigh(matrix)  # ascending
    kept = _kept(values, count, floor_ratio)
    return values[::-1][:kept].copy(), vectors[:, ::-1][:, :kept].copy()


def lapack_available() -> bool:
    """Whether the LAPACK path is in use (scipy's cython_lapack could be loaded)."""
    return _routines() is not None


def _kept(ascending: np.ndarray, count: int, floor_ratio: float) -> int:
    top = float(ascending[-1]) if ascending.size else 0.0
    if top <= 0:
        return 0
    return min(count, int(np.count_nonzero(ascending > top * floor_ratio)))


def _top_eigenpairs_lapack(
    routines: dict[str, _Routine], matrix: np.ndarray, count: int, floor_ratio: float
) -> tuple[np.ndarray, np.ndarray] | None:
    size = matrix.shape[0]
    ws = _workspace(size)
    # ws.a is C-ordered; LAPACK reads it column-major, i.e. as matrix^T, so its upper triangle
    # ("U") is the lower triangle of `matrix`: the triangle numpy's eigh reads.
    np.copyto(ws.a, matrix)
    sytrd, sterf, stein, ormtr = (routines[n] for n in ("dsytrd", "dsterf", "dstein", "dormtr"))
    sytrd(ws.upper, ws.n, ws.a_ptr, ws.n, ws.d_ptr, ws.e_ptr, ws.tau_ptr, ws.work_ptr, ws.lwork,
          ws.info_ptr)  # fmt: skip
    if ws.info[0] != 0:
        return None
    ws.values[:] = ws.d
    ws.values_e[:] = ws.e
    sterf(ws.n, ws.values_ptr, ws.values_e_ptr, ws.info_ptr)
    if ws.info[0] != 0:
        return None
    kept = _kept(ws.values, count, floor_ratio)
    if kept == 0:
        return np.zeros(0), np.zeros((size, 0))
    ws.ints[1] = kept
    first = size - kept  # the kept eigenvalues, ascending, start here
    stein(ws.n, ws.d_ptr, ws.e_ptr, ws.m, ws.values_ptr + 8 * first, ws.iblock_ptr,
          ws.isplit_ptr, ws.z_ptr, ws.n, ws.stein_work_ptr, ws.iwork_ptr, ws.ifail_ptr,
          ws.info_ptr)  # fmt: skip
    if ws.info[0] != 0:  # > 0: some eigenvectors did not converge
        return None
    ormtr(ws.left, ws.upper, ws.no_trans, ws.n, ws.m, ws.a_ptr, ws.n, ws.tau_ptr, ws.z_ptr,
          ws.n, ws.work_ptr, ws.lwork, ws.info_ptr)  # fmt: skip
    if ws.info[0] != 0:
        return None
    values = ws.values[first:][::-1].copy()
    # ws.z is column-major n x size: its first `kept` columns are rows of the C-ordered view.
    vectors = ws.z[:kept][::-1].T.copy()
    return values, vectors


class _Workspace:
    """Arrays for one matrix size, and the addresses LAPACK is called with (all by reference)."""

    def __init__(self, size: int) -> None:
        self.a = np.zeros((size, size))
        self.d = np.zeros(size)
        self.e = np.zeros(size)
        self.tau = np.zeros(size)
        self.lwork_size = 64 * size
        self.work = np.zeros(self.lwork_size)
        self.values = np.zeros(size)
        self.values_e = np.zeros(size)
        self.z = np.zeros((size, size))  # column-major n x n: row j of this view is column j
        self.stein_work = np.zeros(5 * size)
        self.iwork = np.zeros(size, dtype=np.int32)
        self.ifail = np.zeros(size, dtype=np.int32)
        self.iblock = np.ones(size, dtype=np.int32)  # one unreduced block ...
        self.isplit = np.zeros(size, dtype=np.int32)
        self.isplit[0] = size  # ... that ends at row n
        # ints: n, m (eigenvectors wanted), lwork; info; chars: U, L, N
        self.ints = np.array([size, 0, self.lwork_size], dtype=np.int32)
        self.info = np.zeros(1, dtype=np.int32)
        self.chars = np.frombuffer(b"ULN", dtype=np.uint8).copy()
        base = self.ints.ctypes.data
        self.n, self.m, self.lwork = base, base + 4, base + 8
        chars = self.chars.ctypes.data
        self.upper, self.left, self.no_trans = chars, chars + 1, chars + 2
        self.a_ptr, self.z_ptr = self.a.ctypes.data, self.z.ctypes.data
        self.d_ptr, self.e_ptr = self.d.ctypes.data, self.e.ctypes.data
        self.tau_ptr, self.work_ptr = self.tau.ctypes.data, self.work.ctypes.data
        self.values_ptr, self.values_e_ptr = self.values.ctypes.data, self.values_e.ctypes.data
        self.stein_work_ptr, self.iwork_ptr = self.stein_work.ctypes.data, self.iwork.ctypes.data
        self.ifail_ptr, self.info_ptr = self.ifail.ctypes.data, self.info.ctypes.data
        self.iblock_ptr, self.isplit_ptr = self.iblock.ctypes.data, self.isplit.ctypes.data


def _workspace(size: int) -> _Workspace:
    if size > _MAX_CACHED_SIZE:
        return _Workspace(size)
    spaces: dict[int, _Workspace] | None = getattr(_local, "spaces", None)
    if spaces is None:
        spaces = _local.spaces = {}
    space = spaces.get(size)
    if space is None:
        if len(spaces) >= _MAX_WORKSPACES:
            spaces.clear()
        space = spaces[size] = _Workspace(size)
    return space


# Number of pointer arguments of each routine (every LAPACK argument is passed by reference).
_ARITY = {"dsytrd": 10, "dsterf": 4, "dstein": 13, "dormtr": 13}


@functools.cache
def _routines() -> dict[str, _Routine] | None:
    """ctypes prototypes of the LAPACK routines in scipy's cython_lapack, or None if unavailable.

    scipy exports each routine as a PyCapsule holding its C function pointer; the capsule's
    name is the C signature, which is checked to take only ``char *``, 32-bit ``int *`` and
    ``double *`` arguments, as many as the prototypes below assume.
    """
    try:
        from scipy.linalg import cython_lapack
    except ImportError:
        return None
    capi: dict[str, Any] = getattr(cython_lapack, "__pyx_capi__", {})
    # Own prototypes of the two CPython calls, rather than setting restype on the process-wide
    # ctypes.pythonapi attributes that other code may use.
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
        ("PyCapsule_GetName", ctypes.pythonapi)
    )
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi)
    )
    routines: dict[str, _Routine] = {}
    for name, arity in _ARITY.items():
        capsule = capi.get(name)
        if capsule is None:
            return None
        signature = get_name(capsule)
        if signature is None or not _pointer_arguments(signature, arity):
            return None
        address = get_pointer(capsule, signature)
        if not address:
            return None
        prototype = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * arity))
        routines[name] = prototype(address)
    return routines


def _pointer_arguments(signature: bytes, arity: int) -> bool:
    """Whether a signature like b"void (char *, int *, __pyx_t_..._d *)" has `arity` arguments,
    each a char, 32-bit int or double pointer (scipy's typedef of double ends in ``_d``)."""
    text = signature.decode("ascii", "replace")
    if not text.startswith("void (") or not text.endswith(")"):
        return False
    arguments = [part.strip() for part in text[len("void (") : -1].split(",")]
    allowed = ("char *", "int *")
    return len(arguments) == arity and all(
        argument in allowed or argument.endswith("_d *") for argument in arguments
    )
