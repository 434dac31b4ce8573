"""Task graphs: hand-computed matrices, file loading, stability, clustering against known tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mira.core.mixing import max_stable_step
from mira.core.mixing import validate_adjacency as check_adjacency
from mira.graph import sources as graph
from mira.graph.clustering import adjusted_rand_index, cluster_fingerprints
from mira.graph.sources import (
    add_knn_edges,
    cluster_graph,
    full_graph,
    knn_graph,
    load_matrix,
    random_graph,
    rbf_graph,
)
from mira.graph.sources import declared_task_graph as task_graph
from mira.graph.sources import scale_to_unit_max_degree as normalise_rows
from mira.results.plots import plot_adjacency


def grouped_fingerprints(
    groups: int, per_group: int, dim: int = 256, noise: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm fingerprints around `groups` random centres; returns (points, true labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(groups), per_group)
    points = centres[labels] + noise * rng.standard_normal((labels.size, dim)) / np.sqrt(dim)
    return points / np.linalg.norm(points, axis=1, keepdims=True), labels


# --- hand cases


def test_task_graph_hand_case() -> None:
    tasks = ["sentiment", "topic", "sentiment", "sentiment", "qa", "topic"]
    expected = np.array(
        [
            [0, 0, 0.5, 0.5, 0, 0],
            [0, 0, 0, 0, 0, 1],
            [0.5, 0, 0, 0.5, 0, 0],
            [0.5, 0, 0.5, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 1, 0, 0, 0, 0],
        ]
    )
    result = task_graph(tasks)
    assert result.dtype == np.float64
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_array_equal(result.sum(axis=1), [1, 1, 1, 1, 0, 1])


def test_cluster_graph_matches_task_graph() -> None:
    np.testing.assert_array_equal(cluster_graph([2, 0, 2, 0]), task_graph(["b", "a", "b", "a"]))
    np.testing.assert_array_equal(cluster_graph([0, 1, 2]), np.zeros((3, 3)))


def test_full_graph_hand_case() -> None:
    third = 1.0 / 3.0
    expected = np.full((4, 4), third) - third * np.eye(4)
    np.testing.assert_allclose(full_graph(4), expected, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(full_graph(1), np.zeros((1, 1)))
    np.testing.assert_array_equal(full_graph(2), [[0.0, 1.0], [1.0, 0.0]])


def test_max_stable_step_and_normalise() -> None:
    adjacency = np.array([[0, 2, 1], [2, 0, 0], [1, 0, 0]], dtype=float)
    assert max_stable_step(adjacency) == pytest.approx(1.0 / 3.0)
    assert max_stable_step(np.zeros((3, 3))) == float("inf")
    scaled = normalise_rows(adjacency)
    np.testing.assert_allclose(scaled, adjacency / 3.0)
    np.testing.assert_array_equal(scaled, scaled.T)
    assert scaled.sum(axis=1).max() == pytest.approx(1.0)
    np.testing.assert_array_equal(normalise_rows(np.zeros((2, 2))), np.zeros((2, 2)))


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ([[0, 1], [1, 0], [0, 0]], "expected 2 x 2 for 2 clients, got 3 x 2"),
        ([[0, -1], [-1, 0]], "negative entry a[0,1] = -1.0"),
        ([[0, 1], [0.5, 0]], "not symmetric"),
        ([[1, 1], [1, 0]], "non-zero diagonal: a[0,0] = 1.0"),
        ([[0, np.nan], [np.nan, 0]], "non-finite"),
        ([[0, np.inf], [np.inf, 0]], "non-finite"),
    ],
)
def test_check_adjacency_rejects(matrix: list[list[float]], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_adjacency(np.array(matrix, dtype=float), num_clients=2)


# --- loading user matrices

GOOD = [[0.0, 0.5, 0.25], [0.5, 0.0, 0.0], [0.25, 0.0, 0.0]]


def write(path: Path, matrix: np.ndarray | list[list[float]]) -> Path:
    rows = matrix.tolist() if isinstance(matrix, np.ndarray) else matrix
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".npy":
        np.save(path, np.asarray(rows))
    else:
        path.write_text("\n".join(",".join(str(v) for v in row) for row in rows) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".json", ".csv", ".npy"])
def test_load_matrix_formats(tmp_path: Path, suffix: str) -> None:
    loaded = load_matrix(write(tmp_path / f"graph{suffix}", GOOD), num_clients=3)
    assert loaded.dtype == np.float64
    np.testing.assert_array_equal(loaded, np.array(GOOD))


SIX = (np.ones((6, 6)) - np.eye(6)) / 5.0


def six_with(row: int, col: int, value: float, mirror: bool = True) -> list[list[float]]:
    """The uniform 6-client graph with entry (row, col) (and its mirror) set to value."""
    matrix = SIX.copy()
    matrix[row, col] = value
    if mirror:
        matrix[col, row] = value
    return matrix.tolist()


@pytest.mark.parametrize("suffix", [".json", ".csv", ".npy"])
@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (SIX[:5].tolist(), "expected 6 x 6 for 6 clients, got 5 x 6"),
        (six_with(0, 1, -0.2), "negative entry"),
        (six_with(2, 4, 0.9, mirror=False), "not symmetric"),
        (six_with(3, 3, 0.1), "non-zero diagonal"),
        (six_with(1, 5, float("inf")), "non-finite"),
        (six_with(1, 5, float("nan")), "non-finite"),
    ],
)
def test_load_matrix_bad_values(
    tmp_path: Path, suffix: str, matrix: list[list[float]], message: str
) -> None:
    path = write(tmp_path / f"bad{suffix}", matrix)
    with pytest.raises(ValueError, match=message) as info:
        load_matrix(path, num_clients=6)
    assert str(path) in str(info.value)


def test_load_matrix_missing_and_non_numeric(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    with pytest.raises(ValueError, match="does not exist") as info:
        load_matrix(missing, 3)
    assert str(missing) in str(info.value)

    csv = tmp_path / "words.csv"
    csv.write_text("0,0.5,abc\n0.5,0,0\nabc,0,0\n")
    with pytest.raises(ValueError, match="non-numeric entry at row 0, column 2: 'abc'") as info:
        load_matrix(csv, 3)
    assert str(csv) in str(info.value)

    js = tmp_path / "strings.json"
    js.write_text(json.dumps([[0, "0.5"], ["0.5", 0]]))
    with pytest.raises(ValueError, match="non-numeric") as info:
        load_matrix(js, 2)
    assert str(js) in str(info.value)

    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps([[0, 1], [1]]))
    with pytest.raises(ValueError, match="different lengths"):
        load_matrix(ragged, 2)

    npy = tmp_path / "strings.npy"
    np.save(npy, np.array([["0", "1"], ["1", "0"]]))
    with pytest.raises(ValueError, match="non-numeric") as info:
        load_matrix(npy, 2)
    assert str(npy) in str(info.value)

    other = tmp_path / "graph.txt"
    other.write_text("0")
    with pytest.raises(ValueError, match="unknown format"):
        load_matrix(other, 1)


# --- every source obeys the adjacency convention and the stability bound


def every_source(tmp_path: Path) -> dict[str, np.ndarray]:
    points, labels = grouped_fingerprints(3, 3, noise=0.3)
    loaded = load_matrix(write(tmp_path / "g.json", normalise_rows(random_graph(9, 5))), 9)
    alone = cluster_graph([0, 0, 1, 1, 2, 3, 3, 4, 5])
    return {
        "task": task_graph([str(x) for x in labels]),
        "cluster": cluster_graph(labels),
        "full": full_graph(9),
        "knn": knn_graph(points, 2),
        "knn-rbf": knn_graph(points, 3, weights="rbf"),
        "rbf": rbf_graph(points),
        "rbf-clustered": rbf_graph(points, labels=labels),
        "random": random_graph(9, seed=3),
        "random-dense": random_graph(9, seed=3, threshold=0.0),
        "add-knn": add_knn_edges(alone, points, k=1),
        "add-knn-2": add_knn_edges(np.zeros((9, 9)), points, k=2),
        "loaded": loaded,
    }


def test_every_source_is_a_stable_adjacency(tmp_path: Path) -> None:
    for name, adjacency in every_source(tmp_path).items():
        assert adjacency.shape == (9, 9), name
        assert adjacency.dtype == np.float64, name
        np.testing.assert_array_equal(adjacency, adjacency.T, err_msg=name)
        assert adjacency.min() >= 0.0, name
        np.testing.assert_array_equal(np.diag(adjacency), 0.0, err_msg=name)
        top = adjacency.sum(axis=1).max()
        assert 0.0 < top <= 1.0 + 1e-12, name
        assert 0.99 * top < 1.0, name
        assert max_stable_step(adjacency) >= 1.0 - 1e-12, name
        check_adjacency(adjacency, 9)


def test_rbf_graph_values() -> None:
    points = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    raw = np.exp(-np.array([[0, 1, 4], [1, 0, 5], [4, 5, 0]]) / 2.0) - np.eye(3)
    result = rbf_graph(points, bandwidth=1.0)
    np.testing.assert_allclose(result, raw / raw.sum(axis=1).max(), rtol=1e-12)
    # Median heuristic: distances 1, 2, sqrt(5) -> sigma = 2.
    assert graph.median_bandwidth(points) == pytest.approx(2.0)
    clustered = rbf_graph(points, labels=[0, 0, 1], bandwidth=1.0)
    np.testing.assert_allclose(clustered, [[0, 1, 0], [1, 0, 0], [0, 0, 0]], rtol=1e-12)


def test_knn_graph_hand_case() -> None:
    # On a line 0, 1, 3, 7 each point's nearest neighbour: 1, 0, 1, 3.
    points = np.array([[0.0], [1.0], [3.0], [7.0]])
    edges = np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=float)
    np.testing.assert_array_equal(knn_graph(points, 1), edges / 2.0)


def test_add_knn_edges_connects_isolated_clients() -> None:
    points = np.array([[0.0], [1.0], [3.0], [10.0], [11.0]])
    # Clients 0-1 are a pair; 2 and 3, 4 are alone.
    adjacency = cluster_graph([0, 0, 1, 2, 3])
    result = add_knn_edges(adjacency, points, k=1)
    assert np.all(result.sum(axis=1) > 0)
    # 2 -> 1 (weight 1) raises client 1 to degree 2, so everything is halved.
    expected = np.zeros((5, 5))
    expected[0, 1] = expected[1, 0] = 0.5
    expected[1, 2] = expected[2, 1] = 0.5
    expected[3, 4] = expected[4, 3] = 0.5
    np.testing.assert_array_equal(result, expected)
    # A graph without isolated clients is returned unchanged.
    np.testing.assert_array_equal(add_knn_edges(full_graph(5), points), full_graph(5))


def test_random_graph_is_seeded_and_thresholded() -> None:
    first, again, other = random_graph(8, 1), random_graph(8, 1), random_graph(8, 2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.sum(axis=1).max() == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    upper = np.triu(rng.uniform(size=(8, 8)), 1)
    kept = upper >= 0.5
    np.testing.assert_array_equal(np.triu(first, 1) > 0, kept)
    ratio = np.triu(first, 1)[kept] / upper[kept]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)


# --- clustering fingerprints against known tasks


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_clustering_recovers_known_groups(method: str) -> None:
    points, truth = grouped_fingerprints(4, 3)
    result = cluster_fingerprints(points, method=method)
    assert result.k == 4
    assert adjusted_rand_index(truth, result.labels) == 1.0
    assert result.score > 0.9
    assert set(result.scores) == set(range(2, 7))  # k > 12 / 2 leaves a lone client
    assert result.scores[4] == max(result.scores.values())
    np.testing.assert_array_equal(result.labels, truth)  # numbered by first appearance
    np.testing.assert_array_equal(cluster_graph(result.labels), cluster_graph(truth))


@pytest.mark.parametrize(("groups", "per_group"), [(2, 4), (3, 3), (5, 2)])
@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_auto_k_picks_true_k(groups: int, per_group: int, method: str) -> None:
    points, truth = grouped_fingerprints(groups, per_group, noise=0.2, seed=groups)
    order = np.random.default_rng(7).permutation(truth.size)
    result = cluster_fingerprints(points[order], method=method)
    assert result.k == groups
    assert adjusted_rand_index(truth[order], result.labels) == 1.0


def test_given_k_and_k_range() -> None:
    points, truth = grouped_fingerprints(4, 3)
    fixed = cluster_fingerprints(points, k=4)
    assert fixed.k == 4 and fixed.scores == {}
    assert adjusted_rand_index(truth, fixed.labels) == 1.0
    narrow = cluster_fingerprints(points, k_range=(2, 3))
    assert narrow.k in (2, 3) and set(narrow.scores) == {2, 3}
    with pytest.raises(ValueError, match="k must be in"):
        cluster_fingerprints(points, k=13)
    with pytest.raises(ValueError, match="unknown clustering method"):
        cluster_fingerprints(points, method="dbscan")


def test_singletons_are_avoided() -> None:
    # Two groups of 4; one member of the first sits 9 away. Silhouette alone prefers k = 3 with
    # that member alone (0.846 > 0.806), which would leave it without neighbours.
    core = np.array([[0.0, 0.0], [0.0, 0.3], [0.3, 0.0]])
    points = np.vstack([core, [[-9.0, 0.0]], core + np.array([10.0, 0.0]), [[10.0, 0.3]]])
    result = cluster_fingerprints(points)
    assert result.scores[3] > result.scores[2]
    assert result.k == 2
    np.testing.assert_array_equal(result.labels, [0, 0, 0, 0, 1, 1, 1, 1])


def test_degenerate_inputs_give_one_cluster() -> None:
    same = np.tile(np.array([[0.6, 0.8]]), (5, 1))
    for method in ("kmeans", "agglomerative"):
        result = cluster_fingerprints(same, method=method)
        assert result.k == 1 and result.score == 0.0
        np.testing.assert_array_equal(result.labels, np.zeros(5))
    two = cluster_fingerprints(np.array([[0.0, 1.0], [1.0, 0.0]]))
    assert two.k == 1
    np.testing.assert_array_equal(two.labels, [0, 0])
    one = cluster_fingerprints(np.array([[1.0, 0.0]]))
    assert one.k == 1
    with pytest.raises(ValueError, match="distinct"):
        cluster_fingerprints(same, k=2)
    with pytest.raises(ValueError, match="non-finite"):
        cluster_fingerprints(np.array([[0.0, np.nan], [1.0, 0.0]]))


def test_adjusted_rand_index_values() -> None:
    assert adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)


# --- plot


def test_plot_adjacency_writes_png(tmp_path: Path) -> None:
    import matplotlib.image

    labels = [1, 0, 1, 0, 2, 2]
    ids = [f"client-{i}" for i in range(6)]
    path = plot_adjacency(cluster_graph(labels), ids, labels, tmp_path / "plots" / "graph.png")
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert 300 <= height <= 2000 and 300 <= width <= 2500
    assert width > height  # room for the colorbar
    assert pixels[..., :3].std() > 0.05  # not a blank image
    with pytest.raises(ValueError, match="client ids"):
        plot_adjacency(cluster_graph(labels), ids[:3], labels, tmp_path / "x.png")


def test_clustering_tries_the_larger_k_only_when_every_smaller_one_leaves_a_lone_client() -> None:
    points = np.array([[0.0, 0.0], [0.01, 0.0], [0.0, 0.01], [10.0, 10.0]])
    result = cluster_fingerprints(points)  # k = 2 leaves the far client alone: k = 3 is tried
    assert set(result.scores) == {2, 3}
    assert result.k == 2 and result.scores[2] == max(result.scores.values())
