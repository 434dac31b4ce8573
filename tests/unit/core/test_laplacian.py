"""The MIRA pull and the baseline mixings against hand-computed and dense references."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import mira.core.spaces as laplacian_module
from mira.core.mixing import (
    cluster_merge_mixing,
    cluster_mixing,
    fedavg_mixing,
    laplacian,
    mixing_matrix,
    validate_adjacency,
)
from mira.core.spaces import (
    factor_mix,
    factor_step,
    product_mix,
    product_mix_module,
    product_step,
)

SHAPES = {"q.lora_A": (3, 5), "q.lora_B": (4, 3), "bias": (7,), "cube": (2, 2, 2)}


def random_graph(rng: np.random.Generator, k: int, density: float = 0.4) -> np.ndarray:
    """Sparse random symmetric adjacency with zero diagonal and every client linked."""
    upper = np.triu((rng.random((k, k)) < density) * rng.uniform(0.2, 1.0, (k, k)), 1)
    for client in range(k - 1):  # a path keeps every degree positive
        upper[client, client + 1] = max(upper[client, client + 1], 0.3)
    return upper + upper.T


def random_factor_adapters(rng: np.random.Generator, k: int) -> list[dict[str, np.ndarray]]:
    return [{key: rng.standard_normal(shape) for key, shape in SHAPES.items()} for _ in range(k)]


def random_product_adapters(
    rng: np.random.Generator, ranks: list[int], modules: dict[str, tuple[int, int]]
) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    return [
        {
            name: (rng.standard_normal((r, fan_in)), rng.standard_normal((fan_out, r)))
            for name, (fan_in, fan_out) in modules.items()
        }
        for r in ranks
    ]


def dense_truncation(adapters, mixing, scales) -> list[dict[str, np.ndarray]]:
    """Reference: form every out x in target, full SVD, keep the top r_k (Eckart-Young)."""
    result = []
    for k, adapter in enumerate(adapters):
        products = {}
        for name, (a_k, _) in adapter.items():
            target = sum(
                mixing[k, j] * scales[j] * (other[name][1] @ other[name][0])
                for j, other in enumerate(adapters)
            )
            u, s, vt = np.linalg.svd(target)
            r = min(a_k.shape[0], s.size)
            products[name] = (u[:, :r] * s[:r]) @ vt[:r]
        result.append(products)
    return result


def assert_products_close(mixed, reference, scales, rtol) -> None:
    for k, (ours, theirs) in enumerate(zip(mixed, reference, strict=True)):
        for name, (a, b) in ours.items():
            error = np.linalg.norm(scales[k] * b @ a - theirs[name])
            assert error <= rtol * np.linalg.norm(theirs[name]), (k, name, error)


# ---------------------------------------------------------------------------- factor space


def test_factor_step_hand_case():
    adapters = [{"w": np.array(1.0)}, {"w": np.array(0.0)}]
    mixed = factor_step(adapters, np.array([[0.0, 1.0], [1.0, 0.0]]), 0.1)
    assert mixed[0]["w"] == pytest.approx(0.9, abs=1e-15)
    assert mixed[1]["w"] == pytest.approx(0.1, abs=1e-15)


def test_factor_step_equals_kronecker_laplacian_form():
    rng = np.random.default_rng(0)
    k = 6
    adjacency = random_graph(rng, k)
    step = 0.8 / adjacency.sum(axis=1).max()
    adapters = random_factor_adapters(rng, k)
    mixed = factor_step(adapters, adjacency, step)

    def vec(clients):  # client-major: [W_1; W_2; ...], each W_k all keys flattened
        return np.concatenate([np.concatenate([c[key].ravel() for key in SHAPES]) for c in clients])

    d = sum(int(np.prod(shape)) for shape in SHAPES.values())
    operator = np.eye(k * d) - step * np.kron(laplacian(adjacency), np.eye(d))
    np.testing.assert_allclose(vec(mixed), operator @ vec(adapters), rtol=0, atol=1e-12)
    for key, shape in SHAPES.items():
        assert mixed[0][key].shape == shape


def test_factor_step_is_simultaneous_and_order_free():
    rng = np.random.default_rng(1)
    k = 5
    adjacency = random_graph(rng, k, density=0.8)
    adapters = random_factor_adapters(rng, k)
    mixed = factor_step(adapters, adjacency, 0.1)
    order = rng.permutation(k)
    permuted = factor_step([adapters[i] for i in order], adjacency[np.ix_(order, order)], 0.1)
    for position, client in enumerate(order):
        for key in SHAPES:
            np.testing.assert_allclose(permuted[position][key], mixed[client][key], atol=1e-14)
    # A sequential (in-place) sweep would let client 1 see client 0's new value; ours does not.
    expected = adapters[1]["bias"] - 0.1 * sum(
        adjacency[1, j] * (adapters[1]["bias"] - adapters[j]["bias"]) for j in range(k)
    )
    np.testing.assert_allclose(mixed[1]["bias"], expected, atol=1e-14)


def test_inactive_clients_keep_exact_copy_and_still_pull_their_neighbours():
    adapters = [
        {"w": np.array([1.0, 2.0], dtype=np.float32)},
        {"w": np.array([0.1, 0.3], dtype=np.float32)},
        {"w": np.array([5.0, -1.0], dtype=np.float32)},
    ]
    adjacency = np.array([[0, 1, 0], [1, 0, 2], [0, 2, 0]], dtype=float)
    mixed = factor_step(adapters, adjacency, 0.2, active=[True, False, True])
    # Client 1 was not sampled: its array is returned bit for bit, as a copy.
    assert mixed[1]["w"].dtype == np.float32
    assert mixed[1]["w"].tobytes() == adapters[1]["w"].tobytes()
    assert mixed[1]["w"] is not adapters[1]["w"]
    # Clients 0 and 2 are pulled toward client 1's stored copy.
    w = [a["w"].astype(np.float64) for a in adapters]
    np.testing.assert_allclose(mixed[0]["w"], w[0] - 0.2 * (w[0] - w[1]), rtol=1e-7)
    np.testing.assert_allclose(mixed[2]["w"], w[2] - 0.2 * 2 * (w[2] - w[1]), rtol=1e-7)
    assert mixed[0]["w"].dtype == np.float32


def test_mixing_matrix_rows_and_identity_rows():
    adjacency = np.array([[0, 1, 2], [1, 0, 0], [2, 0, 0]], dtype=float)
    mixing = mixing_matrix(adjacency, 0.25, active=[True, True, False])
    expected = np.array([[0.25, 0.25, 0.5], [0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(mixing, expected)


def test_factor_mix_identity_rows_are_bit_exact():
    rng = np.random.default_rng(2)
    adapters = [
        {k: v.astype(np.float32) for k, v in a.items()} for a in random_factor_adapters(rng, 3)
    ]
    mixed = factor_mix(adapters, np.eye(3))
    for ours, theirs in zip(mixed, adapters, strict=True):
        for key in SHAPES:
            assert ours[key].dtype == theirs[key].dtype
            assert ours[key].tobytes() == theirs[key].tobytes()


@pytest.mark.parametrize(
    ("adapters", "adjacency", "step", "message"),
    [
        ([{"a": np.zeros(2)}, {"b": np.zeros(2)}], [[0, 1], [1, 0]], 0.1, "missing"),
        ([{"a": np.zeros(2)}, {"a": np.zeros(3)}], [[0, 1], [1, 0]], 0.1, "shape"),
        ([{"a": np.zeros(2)}, {"a": np.zeros(2)}], [[0, -1], [-1, 0]], 0.1, "negative"),
        ([{"a": np.zeros(2)}, {"a": np.zeros(2)}], [[0, 1], [0.5, 0]], 0.1, "not symmetric"),
        ([{"a": np.zeros(2)}, {"a": np.zeros(2)}], [[1, 1], [1, 0]], 0.1, "diagonal"),
        ([{"a": np.zeros(2)}, {"a": np.array([np.nan, 0])}], [[0, 1], [1, 0]], 0.1, "client 1"),
        ([{"a": np.zeros(2)}, {"a": np.array([np.inf, 0])}], [[0, 1], [1, 0]], 0.1, "non-finite"),
        ([{"a": np.zeros(2)}, {"a": np.zeros(2)}], [[0, 2], [2, 0]], 0.5, "max degree = 1 >= 1"),
        ([{"a": np.zeros(2)}, {"a": np.zeros(2)}], [[0, 1], [1, 0]], -0.1, ">= 0"),
        ([{"a": np.zeros(2)}, {"a": np.zeros(2)}], [[0, 1, 0], [1, 0, 0], [0, 0, 0]], 0.1, "3 x 3"),
        ([{"a": np.zeros(2)}, {"a": np.zeros(2)}], [[0, np.nan], [np.nan, 0]], 0.1, "non-finite"),
        ([], np.zeros((0, 0)), 0.1, "at least one"),
    ],
)
def test_factor_step_rejects_bad_input(adapters, adjacency, step, message):
    with pytest.raises(ValueError, match=message):
        factor_step(adapters, np.asarray(adjacency, dtype=float), step)


def test_stability_error_names_the_bound():
    with pytest.raises(ValueError, match=r"lower server.step below 0\.3333"):
        mixing_matrix(np.array([[0, 1.5, 1.5], [1.5, 0, 0], [1.5, 0, 0]]), 0.4)


def test_validate_adjacency_returns_float64_copy():
    original = np.array([[0, 1], [1, 0]], dtype=np.int64)
    checked = validate_adjacency(original, num_clients=2)
    assert checked.dtype == np.float64
    checked[0, 1] = 5
    assert original[0, 1] == 1
    with pytest.raises(ValueError, match="square"):
        validate_adjacency(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="3 clients"):
        validate_adjacency(np.zeros((2, 2)), num_clients=3)


def test_factor_mix_rejects_bad_mixing():
    adapters = [{"a": np.zeros(2)}, {"a": np.ones(2)}]
    with pytest.raises(ValueError, match="2 x 2"):
        factor_mix(adapters, np.eye(3))
    with pytest.raises(ValueError, match="non-finite"):
        factor_mix(adapters, np.array([[np.nan, 0], [0, 1]]))


# --------------------------------------------------------------------------- product space

MODULES = {"q": (40, 96), "k": (40, 12), "square12": (12, 12)}


def test_product_step_matches_dense_truncation_with_mixed_ranks():
    rng = np.random.default_rng(3)
    ranks = [2, 4, 8, 16, 8, 16, 4]
    adjacency = random_graph(rng, len(ranks), density=0.6)
    step = 0.9 / adjacency.sum(axis=1).max()
    scales = [16.0 / r for r in ranks]
    adapters = random_product_adapters(rng, ranks, MODULES)
    mixed = product_step(adapters, adjacency, step, scales)
    reference = dense_truncation(adapters, mixing_matrix(adjacency, step), scales)
    assert_products_close(mixed, reference, scales, rtol=1e-8)
    for k, r in enumerate(ranks):  # ranks preserved, even r = 16 > width 12
        for name, (fan_in, fan_out) in MODULES.items():
            a, b = mixed[k][name]
            assert a.shape == (r, fan_in) and b.shape == (fan_out, r)


def test_product_step_pads_missing_components_with_zero_singular_values():
    rng = np.random.default_rng(4)
    ranks = [16, 8, 16]  # targets of width 12 have rank <= 12 < 16
    adapters = random_product_adapters(rng, ranks, {"square12": (12, 12)})
    adjacency = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=float)
    scales = [2.0, 4.0, 2.0]
    mixed = product_step(adapters, adjacency, 0.3, scales)
    reference = dense_truncation(adapters, mixing_matrix(adjacency, 0.3), scales)
    assert_products_close(mixed, reference, scales, rtol=1e-10)
    a, b = mixed[0]["square12"]
    # Components 12..15 carry nothing: zero B columns, and A rows kept from the client so
    # that local training can still move them.
    np.testing.assert_array_equal(b[:, 12:], 0.0)
    np.testing.assert_array_equal(a[12:], adapters[0]["square12"][0][12:])


def test_product_step_with_zero_step_returns_own_product():
    rng = np.random.default_rng(5)
    ranks = [8, 8, 8, 8]
    adapters = random_product_adapters(rng, ranks, MODULES)
    scales = [2.0] * 4
    mixed = product_step(adapters, random_graph(rng, 4), 0.0, scales)
    # Not through the identity-row shortcut: a self-weight of 0.5 goes through the SVD path.
    halved = product_mix(adapters, 0.5 * np.eye(4), scales)
    for ours, half, theirs in zip(mixed, halved, adapters, strict=True):
        for name, (a, b) in ours.items():
            own = 2.0 * theirs[name][1] @ theirs[name][0]
            np.testing.assert_allclose(2.0 * b @ a, own, rtol=0, atol=1e-10 * np.abs(own).max())
            a, b = half[name]
            np.testing.assert_allclose(2.0 * b @ a, own / 2, rtol=0, atol=1e-10 * np.abs(own).max())


def test_product_step_inactive_clients_unchanged_float32():
    rng = np.random.default_rng(6)
    ranks = [4, 8, 16]
    adapters = [
        {name: (a.astype(np.float32), b.astype(np.float32)) for name, (a, b) in c.items()}
        for c in random_product_adapters(rng, ranks, MODULES)
    ]
    adjacency = np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=float)
    scales = [4.0, 2.0, 1.0]
    active = [True, False, True]
    mixed = product_step(adapters, adjacency, 0.2, scales, active=active)
    for name in MODULES:
        for ours, theirs in zip(mixed[1][name], adapters[1][name], strict=True):
            assert ours.tobytes() == theirs.tobytes() and ours.dtype == np.float32
        assert mixed[0][name][0].dtype == np.float32 and mixed[0][name][1].dtype == np.float32
    wide = [
        {n: (a.astype(np.float64), b.astype(np.float64)) for n, (a, b) in c.items()}
        for c in adapters
    ]
    reference = dense_truncation(wide, mixing_matrix(adjacency, 0.2, active), scales)
    assert_products_close(mixed, reference, scales, rtol=1e-6)  # float32 outputs


def test_product_mix_on_fedavg_is_flexlora():
    rng = np.random.default_rng(7)
    ranks = [2, 4, 8, 16, 4]
    weights = [10.0, 20.0, 5.0, 40.0, 25.0]
    adapters = random_product_adapters(rng, ranks, MODULES)
    scales = [8.0 / np.sqrt(r) for r in ranks]  # rsLoRA scaling
    mixing = fedavg_mixing(weights)
    mixed = product_mix(adapters, mixing, scales)
    # FlexLoRA: average the full products with the data weights, then truncate per client.
    total = sum(weights)
    for k, r in enumerate(ranks):
        for name in MODULES:
            average = sum(
                w / total * scales[j] * adapters[j][name][1] @ adapters[j][name][0]
                for j, w in enumerate(weights)
            )
            u, s, vt = np.linalg.svd(average)
            keep = min(r, s.size)
            expected = (u[:, :keep] * s[:keep]) @ vt[:keep]
            a, b = mixed[k][name]
            assert np.linalg.norm(scales[k] * b @ a - expected) <= 1e-8 * np.linalg.norm(expected)
    # Identical rows are computed once: clients 1 and 4 (same rank and scale) get the same factors.
    for name in MODULES:
        np.testing.assert_array_equal(mixed[1][name][0], mixed[4][name][0])
        np.testing.assert_array_equal(mixed[1][name][1], mixed[4][name][1])


def test_product_mix_handles_dependent_factors():
    # Identical B factors make the stacked Gram matrix singular: the QR path must take over.
    rng = np.random.default_rng(8)
    shared_b = rng.standard_normal((30, 8))
    adapters = [{"m": (rng.standard_normal((8, 25)), shared_b.copy())} for _ in range(3)]
    adapters.append({"m": (adapters[0]["m"][0] + 1e-9, shared_b + 1e-9)})
    mixing = mixing_matrix(np.ones((4, 4)) - np.eye(4), 0.2)
    scales = [1.0, 1.0, 2.0, 0.5]
    mixed = product_mix(adapters, mixing, scales)
    assert_products_close(mixed, dense_truncation(adapters, mixing, scales), scales, rtol=1e-8)


def test_product_mix_zero_target_keeps_a_and_zero_b():
    # LoRA initialisation: B = 0 everywhere, so the target is 0; A stays trainable.
    rng = np.random.default_rng(9)
    adapters = [{"m": (rng.standard_normal((4, 6)), np.zeros((5, 4)))} for _ in range(2)]
    mixed = product_mix(adapters, fedavg_mixing([1, 1]), [1.0, 1.0])
    zero_rows = product_mix(adapters, np.zeros((2, 2)), [1.0, 1.0])
    for ours, zeroed, theirs in zip(mixed, zero_rows, adapters, strict=True):
        for a, b in (ours["m"], zeroed["m"]):
            np.testing.assert_array_equal(b, 0.0)
            np.testing.assert_array_equal(a, theirs["m"][0])


def test_product_mix_module_is_the_per_module_step():
    rng = np.random.default_rng(10)
    ranks = [4, 8, 2]
    adapters = random_product_adapters(rng, ranks, MODULES)
    mixing = mixing_matrix(random_graph(rng, 3), 0.2)
    scales = [1.0, 2.0, 3.0]
    whole = product_mix(adapters, mixing, scales)
    new_a, new_b = product_mix_module(
        [c["k"][0] for c in adapters], [c["k"][1] for c in adapters], mixing, scales
    )
    for k in range(3):
        np.testing.assert_array_equal(whole[k]["k"][0], new_a[k])
        np.testing.assert_array_equal(whole[k]["k"][1], new_b[k])


WIDE_MODULES = {
    "q": (40, 96),
    "k": (40, 12),
    "square12": (12, 12),
    "o": (96, 40),
    "up": (40, 64),
    "tiny": (3, 5),
}


def test_product_mix_workers_are_bit_identical_and_match_dense():
    rng = np.random.default_rng(13)
    ranks = [2, 4, 8, 16, 4, 8, 16, 2]
    adjacency = random_graph(rng, len(ranks), density=0.5)
    step = 0.8 / adjacency.sum(axis=1).max()
    scales = [16.0 / r for r in ranks]
    adapters = random_product_adapters(rng, ranks, WIDE_MODULES)
    mixing = mixing_matrix(adjacency, step, active=[True] * 7 + [False])
    sequential = product_mix(adapters, mixing, scales, workers=1)
    assert_products_close(sequential, dense_truncation(adapters, mixing, scales), scales, 1e-8)
    for workers in (2, 3, 16, None):
        pooled = product_mix(adapters, mixing, scales, workers=workers)
        for ours, theirs in zip(pooled, sequential, strict=True):
            assert list(ours) == list(WIDE_MODULES)  # module order kept
            for name in WIDE_MODULES:
                for x, y in zip(ours[name], theirs[name], strict=True):
                    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (workers, name)


def test_product_step_forwards_workers():
    rng = np.random.default_rng(14)
    ranks = [4, 8, 16, 8, 4]
    adjacency = random_graph(rng, len(ranks), density=0.6)
    step = 0.5 / adjacency.sum(axis=1).max()
    scales = [8.0 / np.sqrt(r) for r in ranks]
    adapters = random_product_adapters(rng, ranks, WIDE_MODULES)
    pooled = product_step(adapters, adjacency, step, scales, workers=4)
    sequential = product_mix(adapters, mixing_matrix(adjacency, step), scales, workers=1)
    for ours, theirs in zip(pooled, sequential, strict=True):
        for name in WIDE_MODULES:
            np.testing.assert_array_equal(ours[name][0], theirs[name][0])
            np.testing.assert_array_equal(ours[name][1], theirs[name][1])
    reference = dense_truncation(adapters, mixing_matrix(adjacency, step), scales)
    assert_products_close(pooled, reference, scales, rtol=1e-8)


def _blas_threads() -> list[int]:
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


@pytest.mark.parametrize("workers", [1, 3])
def test_product_mix_limits_blas_to_one_thread_during_the_step(monkeypatch, workers):
    seen: list[list[int]] = []
    original = laplacian_module._mix_module

    def spy(*args, **kwargs):
        seen.append(_blas_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(laplacian_module, "_mix_module", spy)
    rng = np.random.default_rng(15)
    adapters = random_product_adapters(rng, [4, 8, 2], WIDE_MODULES)
    before = _blas_threads()
    product_mix(
        adapters, mixing_matrix(random_graph(rng, 3), 0.2), [1.0, 2.0, 3.0], workers=workers
    )
    assert len(seen) == len(WIDE_MODULES)
    assert all(counts == [1] * len(before) for counts in seen)
    assert _blas_threads() == before  # restored afterwards


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_product_mix_reports_the_first_bad_module_for_any_workers(workers):
    rng = np.random.default_rng(16)
    adapters = random_product_adapters(rng, [4, 4, 8], WIDE_MODULES)
    # Module order q, k, square12, o, up, tiny; the pool starts the widest (q, o) first, so "o"
    # fails before "k" is looked at. The error is still the sequential one: "k" comes first.
    adapters[1]["k"][0][0, 0] = np.nan
    adapters[2]["o"][1][0, 0] = np.inf
    mixing = mixing_matrix(np.ones((3, 3)) - np.eye(3), 0.1)
    with pytest.raises(ValueError, match="client 1 module 'k' A"):
        product_mix(adapters, mixing, [1.0, 1.0, 1.0], workers=workers)


@pytest.mark.parametrize("workers", [0, -2, 1.5, True, "2"])
def test_product_mix_rejects_bad_workers(workers):
    adapters = random_product_adapters(np.random.default_rng(17), [4, 8], MODULES)
    with pytest.raises(ValueError, match="workers must be a positive integer or None"):
        product_mix(adapters, np.eye(2), [1.0, 1.0], workers=workers)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c[1].pop("k"), "missing"),
        (lambda c: c[1].update(k=(np.zeros((4, 40)), np.zeros((12, 3)))), r"A \(4, 40\)"),
        (lambda c: c[1].update(k=(np.zeros((4, 39)), np.zeros((12, 4)))), "client 0 maps 40"),
        (lambda c: c[1].update(k=(np.zeros((2, 40)), np.zeros((12, 2)))), "different LoRA ranks"),
        (lambda c: c[2]["q"][1].__setitem__((0, 0), np.nan), "client 2 module 'q' B"),
        (lambda c: c[0]["q"][0].__setitem__((0, 0), np.inf), "non-finite"),
    ],
)
def test_product_step_rejects_bad_input(change, message):
    rng = np.random.default_rng(11)
    adapters = random_product_adapters(rng, [4, 4, 8], MODULES)
    change(adapters)
    with pytest.raises(ValueError, match=message):
        product_step(adapters, np.ones((3, 3)) - np.eye(3), 0.1, [1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    ("adjacency", "step", "scales", "message"),
    [
        (np.ones((3, 3)) - np.eye(3), 0.5, [1.0, 1.0, 1.0], ">= 1"),
        (np.ones((3, 3)) - np.eye(3), 0.1, [1.0, 0.0, 1.0], "positive"),
        (np.ones((3, 3)) - np.eye(3), 0.1, [1.0, 1.0], "one value per client"),
        (-(np.ones((3, 3)) - np.eye(3)), 0.1, [1.0, 1.0, 1.0], "negative"),
    ],
)
def test_product_step_rejects_bad_graph_or_scales(adjacency, step, scales, message):
    adapters = random_product_adapters(np.random.default_rng(12), [4, 4, 8], MODULES)
    with pytest.raises(ValueError, match=message):
        product_step(adapters, adjacency, step, scales)


# ---------------------------------------------------------------------- baseline mixings


def test_fedavg_mixing_hand_case():
    mixing = fedavg_mixing([1.0, 3.0, 4.0], active=[True, True, False])
    np.testing.assert_array_equal(mixing, np.tile([0.25, 0.75, 0.0], (3, 1)))
    with pytest.raises(ValueError, match="at least one active"):
        fedavg_mixing([1.0, 2.0], active=[False, False])


def test_cluster_mixing_hand_case():
    labels = ["a", "a", "b", "b", "c"]
    mixing = cluster_mixing(
        labels, [1.0, 3.0, 2.0, 2.0, 5.0], active=[True, True, False, True, False]
    )
    expected = np.array(
        [
            [0.25, 0.75, 0, 0, 0],
            [0.25, 0.75, 0, 0, 0],
            [0, 0, 0, 1.0, 0],  # client 2 not sampled: it gets its cluster's model
            [0, 0, 0, 1.0, 0],
            [0, 0, 0, 0, 1.0],  # no member of cluster c active: identity row
        ]
    )
    np.testing.assert_array_equal(mixing, expected)


def test_cluster_merge_mixing_hand_case():
    labels = [0, 0, 1, 1]
    mixing = cluster_merge_mixing(labels, [1.0, 3.0, 2.0, 2.0])
    # Cluster averages [0.25, 0.75, 0, 0] and [0, 0, 0.5, 0.5], merged with equal weight.
    np.testing.assert_array_equal(mixing, np.tile([0.125, 0.375, 0.25, 0.25], (4, 1)))
    merged = cluster_merge_mixing(labels, [1.0, 3.0, 2.0, 2.0], active=[True, True, False, False])
    np.testing.assert_array_equal(merged, np.tile([0.25, 0.75, 0.0, 0.0], (4, 1)))
    with pytest.raises(ValueError, match="labels"):
        cluster_merge_mixing([0, 1], [1.0, 1.0, 1.0])
