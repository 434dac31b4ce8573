"""The two spaces in which a mixing matrix acts on LoRA adapters (docs/design.md, "Two spaces").

Every server rule is a K x K mixing matrix M (:mod:`mira.core.mixing`) applied to a snapshot of
all stored adapters, new_k = sum_l M[k, l] W_l, in one of two spaces:

- factor space (:func:`factor_mix`, :func:`factor_step`): the MIRA paper's eq. 8 applied to
  each stored tensor (lora_A and lora_B separately); needs equal ranks.
- product space (:func:`product_mix`, :func:`product_step`): mixes the effective updates
  s_l B_l A_l and gives each client the best rank-r_k approximation of its target
  (Eckart-Young), computed from stacked factors without forming an out x in matrix.

An identity row returns client k's arrays untouched. All functions are pure: arrays in, arrays
out; nothing here reads files, configs or Flower types. The product-space functions limit BLAS
to one thread (process-wide) while they run, and :func:`product_mix` spreads modules over a
thread pool; the BLAS setting is restored afterwards.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any, TypeVar, cast

import numpy as np
from threadpoolctl import ThreadpoolController

from mira.core.eigen import lapack_available, top_eigenpairs
from mira.core.mixing import BoolVector, FloatVector, mixing_matrix, validate_adjacency

__all__ = [
    "FactorAdapter",
    "ProductAdapter",
    "factor_mix",
    "factor_step",
    "product_mix",
    "product_mix_module",
    "product_step",
]

FactorAdapter = dict[str, np.ndarray]
"""Tensor name -> array, e.g. the lora_A / lora_B weights of every target module."""

ProductAdapter = dict[str, tuple[np.ndarray, np.ndarray]]
"""Module name -> (A [r_k, in], B [out, r_k]) in peft's layout; dW = s_k * B @ A."""

_T = TypeVar("_T")
_R = TypeVar("_R")

RowGroups = list[tuple[np.ndarray, np.ndarray]]
"""Distinct rows of a mixing matrix: [(support of the row, clients that have that row)]."""

_EPS = float(np.finfo(np.float64).eps)
# A Cholesky pivot ratio below this means the stacked B factors are nearly dependent (the Gram
# matrix has squared away their small singular values); Householder QR takes over.
_CHOLESKY_MIN_PIVOT_RATIO = 1e-4


# --------------------------------------------------------------------------------------------
# Factor space: mix every stored tensor
# --------------------------------------------------------------------------------------------


def factor_mix(
    adapters: Sequence[Mapping[str, np.ndarray]], mixing: np.ndarray
) -> list[FactorAdapter]:
    """Row-wise mixing of every tensor: new_k[key] = sum_l M[k, l] adapters[l][key].

    All rows are computed from the same snapshot (the simultaneous update of paper eq. 8), in
    float64, and returned in each client's input dtype. Only the nonzero entries of a row are
    visited; an identity row returns an exact copy of the client's arrays.

    Raises:
        ValueError: on an empty list, different key sets or shapes across clients, non-finite
            values, or a mixing matrix that is not a finite K x K array.
    """
    keys = _check_factor_adapters(adapters)
    mixing = _check_mixing(mixing, len(adapters))
    rows = [(np.flatnonzero(mixing[k]), _is_identity_row(mixing, k)) for k in range(len(adapters))]
    mixed: list[FactorAdapter] = [{} for _ in adapters]
    for key in keys:
        stacked: np.ndarray | None = None  # float64 [K, ...], built only if some row needs it
        for k, (support, identity) in enumerate(rows):
            original = adapters[k][key]
            if identity:
                mixed[k][key] = original.copy()
                continue
            if stacked is None:
                stacked = np.stack([np.asarray(a[key], dtype=np.float64) for a in adapters])
            value = np.tensordot(mixing[k, support], stacked[support], axes=1)
            mixed[k][key] = value.astype(original.dtype, copy=False)
    return mixed


def factor_step(
    adapters: Sequence[Mapping[str, np.ndarray]],
    adjacency: np.ndarray,
    step: float,
    active: BoolVector | None = None,
) -> list[FactorAdapter]:
    """MIRA's server update (paper eq. 8) in factor space.

    W_k <- W_k - step * sum_l a_kl (W_k - W_l) for every tensor, simultaneously; clients that
    are not active keep their tensors. Equal to ``factor_mix(adapters, mixing_matrix(...))``.

    Raises:
        ValueError: on mismatched keys or shapes, a negative, asymmetric or non-zero-diagonal
            adjacency, non-finite values, a negative step, or step * max degree >= 1.
    """
    _check_factor_adapters(adapters)
    validate_adjacency(adjacency, num_clients=len(adapters))
    return factor_mix(adapters, mixing_matrix(adjacency, step, active))


# --------------------------------------------------------------------------------------------
# Product space: mix the effective updates, project back to each client's rank
# --------------------------------------------------------------------------------------------


def product_mix(
    adapters: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]],
    mixing: np.ndarray,
    scales: FloatVector,
    *,
    workers: int | None = None,
) -> list[ProductAdapter]:
    """Mix the effective updates s_l B_l A_l and truncate each target to the client's rank.

    For client k and every module the target is T_k = sum_l M[k, l] s_l B_l A_l; the client
    receives (A_k', B_k') of its own rank r_k with s_k B_k' A_k' the best rank-r_k
    approximation of T_k (Eckart-Young), singular values split evenly between the factors.
    With M from :func:`mixing_matrix` this is the product-space MIRA pull; with
    :func:`fedavg_mixing` it is FlexLoRA's average-then-truncate. See
    :func:`product_mix_module` for the computation, which never forms an out x in matrix.

    Modules are independent, so they are spread over a pool of `workers` threads (numpy and
    LAPACK release the GIL), largest modules first. A row is some 40 small numpy calls whose
    Python glue holds the GIL, so threads scale below the core count: 1.7x on 2 cores in
    docs/aggregation.md. For the duration of the step BLAS is limited to one thread per call:
    the products are small (the stacked rank R is about 86 for ranks 4 to 16 and 8
    neighbours) and BLAS threading makes them several times slower. The limit is process-wide,
    so it also holds for other threads of the process while the step runs, and is restored
    afterwards. Each module's computation is deterministic and the same on every worker, so
    the result is bit for bit the same for any `workers`.

    Args:
        adapters: per client, module name -> (A [r_k, in], B [out, r_k]).
        mixing: K x K mixing matrix.
        scales: per client LoRA scale s_k (lora_alpha / r_k, or lora_alpha / sqrt(r_k)).
        workers: threads that process modules in parallel; None (default) uses
            ``os.cpu_count()``, 1 runs sequentially in the calling thread.

    Raises:
        ValueError: on an empty list, different module sets, inconsistent A/B shapes, a rank
            that differs across one client's modules, non-finite values, scales that are not
            positive and finite, a mixing matrix that is not a finite K x K array, or a
            `workers` that is not a positive integer or None.
    """
    modules = _check_product_adapters(adapters)
    mixing = _check_mixing(mixing, len(adapters))
    scale = _check_scales(scales, len(adapters))
    threads = _check_workers(workers)
    rows = _distinct_rows(mixing)  # shared by every module

    def mix(name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        a_factors = [adapter[name][0] for adapter in adapters]
        b_factors = [adapter[name][1] for adapter in adapters]
        ranks = _check_module_factors(a_factors, b_factors, name)
        return _mix_module(a_factors, b_factors, ranks, mixing, scale, rows)

    # A row costs O((in + out) R^2 + R^3) with the same R in every module: start with the
    # widest modules so that the last ones to finish are short.
    def width(name: str) -> int:
        a_0, b_0 = adapters[0][name]
        return int(np.size(a_0) + np.size(b_0))

    with _one_blas_thread():
        results = _map_in_threads(mix, modules, threads, priority=width)
    mixed: list[ProductAdapter] = [{} for _ in adapters]
    for name, (new_a, new_b) in zip(modules, results, strict=True):
        for k in range(len(adapters)):
            mixed[k][name] = (new_a[k], new_b[k])
    return mixed


def product_step(
    adapters: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]],
    adjacency: np.ndarray,
    step: float,
    scales: FloatVector,
    active: BoolVector | None = None,
    *,
    workers: int | None = None,
) -> list[ProductAdapter]:
    """MIRA's server update (paper eq. 8) in product space, for any mix of LoRA ranks.

    T_k = (1 - step * delta_k) s_k B_k A_k + step * sum_l a_kl s_l B_l A_l, truncated back to
    rank r_k. Equal to ``product_mix(adapters, mixing_matrix(adjacency, step, active), scales,
    workers=workers)``; `workers` threads process the modules (None: ``os.cpu_count()``).

    Raises:
        ValueError: as :func:`product_mix` and :func:`mixing_matrix`.
    """
    return product_mix(adapters, mixing_matrix(adjacency, step, active), scales, workers=workers)


def product_mix_module(
    a_factors: Sequence[np.ndarray],
    b_factors: Sequence[np.ndarray],
    mixing: np.ndarray,
    scales: FloatVector,
    *,
    name: str = "module",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """:func:`product_mix` for one module: the per-module, streaming entry point.

    Modules are independent, so a server holding many clients can pass one module's factors at
    a time (or a few modules at a time to :func:`product_mix`, which spreads them over
    threads; this function runs in the calling thread). For row k with support
    S = {l : M[k, l] != 0} the target is T_k = Bs @ As with Bs = [M[k, l] s_l B_l]_{l in S}
    (out x R) and As = [A_l]_{l in S} (R x in), R = sum of the ranks in S. With the reduced QR
    Bs = Qb Rb, T_k = Qb (Rb As): its left singular vectors are Qb z for the top eigenvectors z
    of the R x R core Rb (As As^T) Rb^T, and its right singular vectors follow as
    z^T Rb As / sigma. Rb comes from the Cholesky factor of the Gram matrix Bs^T Bs (Qb is
    never formed), or from Householder QR when Bs is nearly rank deficient (more stacked
    columns than rows, or nearly equal factors). Only one side is factorised, so no QR of As is
    needed. Only the top r_k eigenpairs of the core are computed
    (:func:`mira.core.eigen.top_eigenpairs`, LAPACK without the GIL). Cost O((out + in) R^2 + R^3)
    per distinct row; no out x in matrix is formed. Identical rows (FedAvg, cluster rules) are
    computed once. An identity row returns the client's own arrays, copied exactly. BLAS is
    limited to one thread per call while it runs, as in :func:`product_mix`.

    A client whose rank exceeds the rank of its target (for instance r_k > min(in, out)) gets
    zero singular values for the missing components: zero columns of B_k' and, so that those
    components still receive gradient in later local training, its own rows of A_k (the
    product s_k B_k' A_k' is unaffected; a zero row paired with a zero column never trains
    again). Singular values below sqrt(R * eps) times the largest (2e-7 relative at R = 200,
    beneath float32 resolution) count as zero.

    Args:
        a_factors: per client, A_k [r_k, in].
        b_factors: per client, B_k [out, r_k].
        mixing: K x K mixing matrix.
        scales: per client LoRA scale s_k > 0.
        name: the module name, used in error messages.

    Returns:
        (new A factors, new B factors), per client, shapes and dtypes as given.
    """
    ranks = _check_module_factors(a_factors, b_factors, name)
    mixing = _check_mixing(mixing, len(ranks))
    scale = _check_scales(scales, len(ranks))
    with _one_blas_thread():
        return _mix_module(a_factors, b_factors, ranks, mixing, scale, _distinct_rows(mixing))


def _mix_module(
    a_factors: Sequence[np.ndarray],
    b_factors: Sequence[np.ndarray],
    ranks: np.ndarray,
    mixing: np.ndarray,
    scale: np.ndarray,
    rows: RowGroups,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """:func:`product_mix_module` on checked inputs, with the distinct rows of `mixing` given."""
    new_a: list[np.ndarray] = list(a_factors)
    new_b: list[np.ndarray] = list(b_factors)
    # A and B^T as row-contiguous arrays (so both stacks are row blocks), B^T copied once per
    # client; kept in the input dtype: a float32 row stack reads half the bytes of a float64 one.
    a_rows: dict[int, np.ndarray] = {}
    bt_rows: dict[int, np.ndarray] = {}
    for support, members in rows:
        todo = []
        for k in members:
            if support.size == 1 and support[0] == k and mixing[k, k] == 1.0:
                new_a[k], new_b[k] = a_factors[k].copy(), b_factors[k].copy()
            else:
                todo.append(k)
        if not todo:
            continue
        clients = support.tolist()
        for j in clients:
            if j not in a_rows:
                a_rows[j] = np.ascontiguousarray(a_factors[j])
                bt_rows[j] = np.ascontiguousarray(b_factors[j].T)
        if support.size == 0:  # a zero row: the target is 0
            height, width = b_factors[todo[0]].shape[0], a_factors[todo[0]].shape[1]
            left_t, sigma, right = np.zeros((0, height)), np.zeros(0), np.zeros((0, width))
        else:
            left_t, sigma, right = _stacked_truncated_svd(
                [a_rows[j] for j in clients],
                [bt_rows[j] for j in clients],
                mixing[todo[0], support] * scale[support],
                int(ranks[todo].max()),
            )
        for k in todo:
            new_a[k], new_b[k] = _split_factors(
                left_t, sigma, right, a_factors[k], b_factors[k], scale[k]
            )
    return new_a, new_b


def _stacked_truncated_svd(
    a_blocks: Sequence[np.ndarray],
    bt_blocks: Sequence[np.ndarray],
    coefs: np.ndarray,
    rank: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-`rank` singular triplets of T = sum_j coefs[j] * B_j @ A_j from the stacked factors.

    Takes the A_j [r_j, in] and the transposed B_j^T [r_j, out]. Returns (U^T [q, out],
    sigma [q], V^T [q, in]) with q <= rank, sigma > 0 descending, and U diag(sigma) V^T the best
    rank-q approximation of T; components with (numerically) zero singular value are dropped.
    """
    bt_stack = np.concatenate(bt_blocks, dtype=np.float64)  # R x out: Bs^T, unscaled
    a_stack = np.concatenate(a_blocks, dtype=np.float64)  # R x in: As
    row_coefs = np.repeat(coefs, [block.shape[0] for block in bt_blocks])
    r_total = row_coefs.size
    r_factor = _triangular_factor(bt_stack, row_coefs)  # Bs = Qb @ Rb
    # T = Qb (Rb As): the left singular vectors of T are Qb z for the eigenvectors z of
    # (Rb As)(Rb As)^T = Rb (As As^T) Rb^T, a p x p matrix (p <= R) of which only the top
    # `rank` eigenpairs are computed (mira.core.eigen; it reads one triangle).
    gram_a = a_stack @ a_stack.T
    core = r_factor @ gram_a @ r_factor.T
    # Eigenvalues below R * eps of the largest count as zero (the squaring noise floor).
    eigenvalues, eigenvectors = top_eigenpairs(core, rank, r_total * _EPS)  # sigma_i^2, desc.
    if eigenvalues.size == 0:
        return np.zeros((0, bt_stack.shape[1])), np.zeros(0), np.zeros((0, a_stack.shape[1]))
    sigma = np.sqrt(eigenvalues)
    # v_i^T = z_i^T Rb As / sigma_i, then u_i = T v_i / sigma_i = Bs (As v_i) / sigma_i, where
    # As v_i = (As As^T) Rb^T z_i / sigma_i reuses the Gram matrix: q R^2 work instead of q R in.
    # The scalings are applied to the q x R coefficients, not to the q x in and q x out results.
    z_rb = eigenvectors.T @ r_factor
    right = (z_rb / sigma[:, None]) @ a_stack
    left_t = ((z_rb @ gram_a) * row_coefs / eigenvalues[:, None]) @ bt_stack
    return left_t, sigma, right


def _triangular_factor(bt_stack: np.ndarray, row_coefs: np.ndarray) -> np.ndarray:
    """Rb of the reduced QR Bs = Qb Rb, for Bs = (bt_stack * row_coefs[:, None])^T.

    Fast path: Rb = L^T with L the Cholesky factor of the Gram matrix Bs^T Bs, formed without
    scaling the stack. When the pivots show the columns are nearly dependent (the Gram matrix
    has squared away their small singular values), or there are more columns than rows,
    Householder QR of the stack, which stays backward stable.
    """
    gram = (bt_stack @ bt_stack.T) * np.outer(row_coefs, row_coefs)
    try:
        lower = np.linalg.cholesky(gram)
        pivots = np.diag(lower)
        if pivots.min() > _CHOLESKY_MIN_PIVOT_RATIO * pivots.max():
            return lower.T
    except np.linalg.LinAlgError:
        pass
    # mode="r" returns the triangular factor alone (numpy's stubs type every mode as QRResult).
    return cast(np.ndarray, np.linalg.qr(bt_stack.T * row_coefs, mode="r"))


def _split_factors(
    left_t: np.ndarray,
    sigma: np.ndarray,
    right: np.ndarray,
    own_a: np.ndarray,
    own_b: np.ndarray,
    scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Client factors of rank r_k with scale * B' @ A' = truncation to r_k of U diag(sigma) V^T.

    The singular values are split evenly (sqrt on each side); missing components (rank of the
    target below r_k) get a zero B column and keep the client's own A row.
    """
    rank = own_a.shape[0]
    kept = min(rank, sigma.size)
    root = np.sqrt(sigma[:kept] / scale)[:, None]
    new_bt = np.zeros((rank, own_b.shape[0]), dtype=own_b.dtype)
    new_bt[:kept] = root * left_t[:kept]
    new_a = own_a.copy()
    new_a[:kept] = root * right[:kept]
    return new_a, new_bt.T.copy()


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------


@functools.cache
def _blas_controller() -> Any:
    # Finding the loaded BLAS libraries takes about a millisecond; limiting them through a
    # kept controller about 15 microseconds, which matters for many small per-module calls.
    # The controller only knows the libraries loaded when it is made, so scipy's LAPACK (and
    # the BLAS it brings, used by mira.core.eigen) is loaded first.
    lapack_available()
    return ThreadpoolController()


def _one_blas_thread() -> AbstractContextManager[Any]:
    """Limit every loaded BLAS library to one thread (process-wide) inside the with-block."""
    return cast(AbstractContextManager[Any], _blas_controller().limit(limits=1, user_api="blas"))


def _map_in_threads(
    function: Callable[[_T], _R],
    items: Sequence[_T],
    workers: int,
    priority: Callable[[_T], int],
) -> list[_R]:
    """[function(item) for item in items], on up to `workers` threads.

    Items are started in decreasing `priority` (longest first balances the threads), results
    come back in the order of `items`, and the first failing item in that order raises, as in
    a sequential loop; the items not yet started are then cancelled.
    """
    if workers == 1 or len(items) <= 1:
        return [function(item) for item in items]
    started = sorted(range(len(items)), key=lambda i: -priority(items[i]))  # stable on ties
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = {i: pool.submit(function, items[i]) for i in started}
        try:
            return [futures[i].result() for i in range(len(items))]
        except BaseException:
            for future in futures.values():
                future.cancel()
            raise


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_workers(workers: int | None) -> int:
    if workers is None:
        return os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    return int(workers)


def _check_mixing(mixing: np.ndarray, num_clients: int) -> np.ndarray:
    m = np.asarray(mixing, dtype=np.float64)
    if m.shape != (num_clients, num_clients):
        raise ValueError(
            f"mixing matrix must be {num_clients} x {num_clients} (one row per client), "
            f"got shape {m.shape}"
        )
    if not np.all(np.isfinite(m)):
        raise ValueError("mixing matrix has non-finite entries")
    return m


def _check_scales(scales: FloatVector, num_clients: int) -> np.ndarray:
    s = np.asarray(scales, dtype=np.float64)
    if s.shape != (num_clients,):
        raise ValueError(f"scales must hold one value per client ({num_clients}), got {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"LoRA scales must be positive and finite, got {s.tolist()}")
    return s


def _is_identity_row(mixing: np.ndarray, k: int) -> bool:
    row = mixing[k]
    return bool(row[k] == 1.0 and np.count_nonzero(row) == 1)


def _distinct_rows(mixing: np.ndarray) -> RowGroups:
    """Group identical rows: [(support of the row, clients having that row)].

    Rows are keyed by their nonzero pattern and values: about 7 ms for K = 1000 sparse rows,
    where np.unique over the rows took about 30 ms.
    """
    groups: dict[bytes, tuple[np.ndarray, list[int]]] = {}
    for k, row in enumerate(mixing):
        support = np.flatnonzero(row)
        key = support.tobytes() + row[support].tobytes()
        groups.setdefault(key, (support, []))[1].append(k)
    return [(support, np.asarray(members)) for support, members in groups.values()]


def _check_array(value: object, where: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
        kind = getattr(value, "dtype", type(value).__name__)
        raise ValueError(f"{where} must be a floating-point numpy array, got {kind}")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{where} has non-finite values (NaN or inf)")
    return value


def _check_key_sets(adapters: Sequence[Mapping[str, object]], what: str) -> list[str]:
    if len(adapters) == 0:
        raise ValueError("need at least one client adapter")
    keys = list(adapters[0])
    reference = set(keys)
    for k, adapter in enumerate(adapters[1:], start=1):
        if set(adapter) != reference:
            missing = sorted(reference - set(adapter))
            extra = sorted(set(adapter) - reference)
            raise ValueError(
                f"client {k} {what} differ from client 0's: missing {missing}, extra {extra}"
            )
    return keys


def _check_factor_adapters(adapters: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    keys = _check_key_sets(adapters, "keys")
    for key in keys:
        shape = _check_array(adapters[0][key], f"client 0 key {key!r}").shape
        for k, adapter in enumerate(adapters[1:], start=1):
            value = _check_array(adapter[key], f"client {k} key {key!r}")
            if value.shape != shape:
                raise ValueError(
                    f"key {key!r}: client {k} has shape {value.shape}, client 0 has {shape}"
                )
    return keys


def _check_module_factors(
    a_factors: Sequence[np.ndarray], b_factors: Sequence[np.ndarray], name: str
) -> np.ndarray:
    """Check one module's factors across clients; return the ranks r_k."""
    if len(a_factors) == 0 or len(a_factors) != len(b_factors):
        raise ValueError(
            f"module {name!r}: need one A and one B per client, got {len(a_factors)} A and "
            f"{len(b_factors)} B"
        )
    ranks = np.zeros(len(a_factors), dtype=int)
    width = height = -1
    for k, (a, b) in enumerate(zip(a_factors, b_factors, strict=True)):
        a = _check_array(a, f"client {k} module {name!r} A")
        b = _check_array(b, f"client {k} module {name!r} B")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"client {k} module {name!r}: A {a.shape} and B {b.shape} are not "
                "A [r, in], B [out, r]"
            )
        if k == 0:
            height, width = b.shape[0], a.shape[1]
        elif (b.shape[0], a.shape[1]) != (height, width):
            raise ValueError(
                f"module {name!r}: client {k} maps {a.shape[1]} -> {b.shape[0]}, "
                f"client 0 maps {width} -> {height}"
            )
        ranks[k] = a.shape[0]
    return ranks


def _check_product_adapters(
    adapters: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]],
) -> list[str]:
    modules = _check_key_sets(adapters, "modules")
    for k, adapter in enumerate(adapters):
        ranks = set()
        for name in modules:
            pair = adapter[name]
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ValueError(f"client {k} module {name!r} must be a pair (A, B)")
            ranks.add(np.shape(pair[0])[0] if np.ndim(pair[0]) else -1)
        if len(ranks) > 1:
            raise ValueError(f"client {k} has different LoRA ranks across modules: {sorted(ranks)}")
    return modules
