"""Client-side DP: the clip and the noise of mira.client.privacy against hand computations, and
mira.core.accounting's epsilon against the analytic Gaussian mechanism and two accountants."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import optimize, stats

from mira.client.privacy import privatise_update
from mira.core import rules
from mira.core.accounting import client_epsilon, noise_for_epsilon
from mira.results.schema import RunLayout

dp_accounting = pytest.importorskip("dp_accounting")


def hand_adapter() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A start adapter and a trained one whose update is (3, 0, 0, 0 | 0, 4, 0): norm 5."""
    start = {
        "m.lora_A.weight": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32),
        "m.lora_B.weight": np.array([[0.5], [-0.5], [0.25]], dtype=np.float32),
    }
    trained = {
        "m.lora_A.weight": start["m.lora_A.weight"] + np.array([[3.0, 0.0], [0.0, 0.0]]),
        "m.lora_B.weight": start["m.lora_B.weight"] + np.array([[0.0], [4.0], [0.0]]),
    }
    return start, {k: v.astype(np.float32) for k, v in trained.items()}


def test_clip_scales_the_whole_update_to_the_clip_norm():
    start, trained = hand_adapter()
    released, norm = privatise_update(start, trained, 2.5, 0.0, np.random.default_rng(0))
    assert norm == pytest.approx(5.0)
    # One factor C / ||update|| = 0.5 for all tensors together, not per tensor.
    np.testing.assert_allclose(
        released["m.lora_A.weight"], [[1.0 + 1.5, 2.0], [3.0, 4.0]], rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        released["m.lora_B.weight"], [[0.5], [-0.5 + 2.0], [0.25]], rtol=0, atol=1e-6
    )
    assert all(v.dtype == np.float32 for v in released.values())


def test_update_within_the_clip_norm_and_no_noise_is_the_identity():
    rng = np.random.default_rng(3)
    start = {
        f"layer{i}.lora_A.weight": rng.normal(size=(4, 16)).astype(np.float32) for i in range(3)
    }
    trained = {k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in start.items()}
    released, norm = privatise_update(start, trained, 1e6, 0.0, np.random.default_rng(0))
    assert 0 < norm < 1e6
    for key, value in trained.items():
        np.testing.assert_array_equal(released[key], value)
    # A zero update (a client that did not move) is left alone too.
    same, zero = privatise_update(start, start, 1.0, 0.0, np.random.default_rng(0))
    assert zero == 0.0
    for key, value in start.items():
        np.testing.assert_array_equal(same[key], value)


def test_noise_has_std_noise_multiplier_times_clip_norm_and_is_seeded():
    start = {
        "a.lora_A.weight": np.zeros((8, 12_500), dtype=np.float32),
        "a.lora_B.weight": np.zeros((50_000, 2), dtype=np.float32),
    }
    clip, z = 0.5, 1.3
    before = np.random.get_state()
    released, norm = privatise_update(start, start, clip, z, np.random.default_rng(11))
    after = np.random.get_state()
    assert norm == 0.0
    noise = np.concatenate([v.ravel().astype(np.float64) for v in released.values()])
    n = noise.size  # 200,000 draws: the std's standard error is sigma / sqrt(2n), 0.16 %
    assert noise.std() == pytest.approx(z * clip, rel=0.01)
    assert abs(noise.mean()) < 5 * z * clip / math.sqrt(n)
    # Both tensors get noise of the same scale (one mechanism over the whole adapter).
    for value in released.values():
        assert value.astype(np.float64).std() == pytest.approx(z * clip, rel=0.02)
    # The caller's generator decides the noise; NumPy's global generator is left as it was.
    again, _ = privatise_update(start, start, clip, z, np.random.default_rng(11))
    other, _ = privatise_update(start, start, clip, z, np.random.default_rng(12))
    for key in start:
        np.testing.assert_array_equal(again[key], released[key])
        assert not np.array_equal(other[key], released[key])
    assert before[0] == after[0] and np.array_equal(before[1], after[1])
    assert before[2:] == after[2:]


def test_clip_then_noise_on_a_large_update():
    start, trained = hand_adapter()
    released, norm = privatise_update(start, trained, 1.0, 0.1, np.random.default_rng(5))
    assert norm == pytest.approx(5.0)
    update = np.concatenate(
        [(released[k].astype(np.float64) - start[k]).ravel() for k in sorted(start)]
    )
    clipped = np.array([0.6, 0.0, 0.0, 0.0, 0.0, 0.8, 0.0])  # (3, 0, 0, 0, 0, 4, 0) / 5
    # The noise on 7 coordinates of std 0.1 is within 5 sigma of the clipped update.
    assert np.max(np.abs(update - clipped)) < 0.5


def test_bad_arguments_are_refused():
    start, trained = hand_adapter()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="clip_norm"):
        privatise_update(start, trained, 0.0, 1.0, rng)
    with pytest.raises(ValueError, match="noise_multiplier"):
        privatise_update(start, trained, 1.0, -1.0, rng)
    with pytest.raises(ValueError, match="different tensors"):
        privatise_update(start, {"x": trained["m.lora_A.weight"]}, 1.0, 1.0, rng)


def analytic_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Balle & Wang (2018), Thm 8, written out here with scipy: the Gaussian mechanism with
    sensitivity 1 and std z is (eps, delta)-DP iff
    Phi(1/(2z) - eps z) - e^eps Phi(-1/(2z) - eps z) <= delta."""
    z = noise_multiplier

    def excess(eps: float) -> float:
        return (
            stats.norm.cdf(1 / (2 * z) - eps * z)
            - math.exp(eps) * stats.norm.cdf(-1 / (2 * z) - eps * z)
            - delta
        )

    return optimize.brentq(excess, 0.0, 200.0, xtol=1e-12)


@pytest.mark.parametrize("z", [0.7, 1.0, 2.0, 5.0])
def test_one_round_is_the_analytic_gaussian_mechanism(z):
    assert client_epsilon(z, 1, 1e-5) == pytest.approx(analytic_gaussian_epsilon(z, 1e-5), rel=1e-6)


def test_a_known_value():
    # z = 1, delta = 1e-5: eps = 4.3772 (analytic Gaussian; the classic bound
    # sqrt(2 ln(1.25/delta)) / z = 4.84 only holds for eps < 1 and is looser).
    assert client_epsilon(1.0, 1, 1e-5) == pytest.approx(4.3772, abs=1e-4)


def test_composition_matches_the_pld_accountant_and_stays_below_rdp():
    z, rounds, delta = 1.0, 10, 1e-5
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(z), rounds)
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(dp_accounting.GaussianDpEvent(z), rounds)
    eps = client_epsilon(z, rounds, delta)
    assert eps == pytest.approx(pld.get_epsilon(delta), rel=1e-3)
    assert eps <= rdp.get_epsilon(delta)
    # Ten rounds cost far less than ten times one round (sqrt(T) composition).
    assert eps < 10 * client_epsilon(z, 1, delta) / 2


def test_epsilon_falls_with_noise_and_grows_with_rounds():
    delta = 1e-5
    by_noise = [client_epsilon(z, 5, delta) for z in (0.5, 1.0, 2.0, 4.0, 8.0)]
    assert all(a > b for a, b in itertools.pairwise(by_noise))
    by_rounds = [client_epsilon(1.0, t, delta) for t in (1, 2, 5, 20, 100)]
    assert all(a < b for a, b in itertools.pairwise(by_rounds))
    assert client_epsilon(1.0, 0, delta) == 0.0
    assert client_epsilon(0.0, 3, delta) == math.inf


def test_noise_for_epsilon_inverts_client_epsilon():
    z = noise_for_epsilon(8.0, 20, 1e-5)
    assert client_epsilon(z, 20, 1e-5) == pytest.approx(8.0, rel=1e-6)
    assert noise_for_epsilon(8.0, 80, 1e-5) == pytest.approx(2 * z, rel=1e-9)


# ---------------------------------------------------------------------------- the benchmark


def random_adapters(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "m.lora_A.weight": rng.normal(size=(4, 16)).astype(np.float32),
            "m.lora_B.weight": rng.normal(size=(16, 4)).astype(np.float32),
        }
        for _ in range(count)
    ]


@pytest.mark.parametrize("method", ["mira", "fedit"])
def test_a_client_recovers_what_the_others_uploaded_from_its_pulled_adapter(privacy_bench, method):
    # Two tasks of two clients: under mira each client's one neighbour, under fedit the mean
    # of the other three, mixed by the server's own code.
    adjacency = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=float)
    uploads = random_adapters(4, 1)
    mixing = rules.mixing_for(
        method,
        adjacency=adjacency,
        step=0.3,
        clusters=[0, 0, 1, 1],
        weights=[8, 8, 8, 8],
        active=[True] * 4,
    )
    received = rules.apply_mixing(uploads, mixing, "factor", [2.0] * 4)
    for k in range(4):
        estimate = privacy_bench.reconstruct_others(received[k], uploads[k], float(mixing[k, k]))
        if method == "mira":
            partner = k ^ 1
            expected = {key: v.astype(np.float64) for key, v in uploads[partner].items()}
        else:
            others = [uploads[j] for j in range(4) if j != k]
            expected = {key: np.mean([a[key] for a in others], axis=0) for key in uploads[k]}
        for key, value in expected.items():
            np.testing.assert_allclose(estimate[key], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize("noise", [0.0, 2.0])
def test_run_json_holds_strict_json_even_without_noise(tmp_path, capsys, noise):
    """Clipping without noise has no DP guarantee: epsilon is infinite, which JSON cannot
    hold. run.json says null and why, never a bare Infinity."""
    import json

    from mira.config import apply_overrides, config_from_dict
    from mira.federation.progress import Progress
    from mira.federation.server import record_privacy
    from mira.federation.state import ClientState, ServerState
    from mira.graph.build import TaskGraph
    from mira.graph.sources import declared_task_graph

    raw = {
        "privacy": {"clip_norm": 0.05, "noise_multiplier": noise},
        "server": {"method": "mira", "step": 0.5, "graph": "tasks"},
        "tasks": [{"name": "a", "clients": 2}, {"name": "b", "clients": 1}],
    }
    cfg = config_from_dict(apply_overrides(raw, []))
    clients = [
        ClientState(c, t, 8, node_id=i, num_train=6, adapter={})
        for i, (c, t) in enumerate(zip(cfg.client_ids, cfg.client_tasks, strict=True))
    ]
    graph = TaskGraph(declared_task_graph(cfg.client_tasks), [0, 0, 1], "tasks")
    state = ServerState(cfg, clients, graph)
    state.releases = [3, 3, 0]  # b-0 never trained: it released nothing
    record_privacy(state, tmp_path, Progress())

    def refuse(token: str) -> None:
        raise AssertionError(f"run.json holds a bare {token}")

    privacy = json.loads(RunLayout(tmp_path).run_info.read_text(), parse_constant=refuse)["privacy"]
    printed = capsys.readouterr().out
    if noise == 0.0:
        assert privacy["epsilon_max"] is None
        assert privacy["epsilon"] == {"a-0": None, "a-1": None, "b-0": 0.0}
        assert privacy["note"] == (
            "no guarantee: epsilon is infinite (null in run.json) for a-0, a-1 (clip 0.05, noise "
            "multiplier 0; updates were clipped but not noised)"
        )
        assert "differential privacy: no guarantee: epsilon is infinite" in printed
    else:
        assert privacy["epsilon_max"] == pytest.approx(client_epsilon(noise, 3, 1e-5))
        assert privacy["epsilon"]["b-0"] == 0.0 and "note" not in privacy
        assert f"epsilon <= {privacy['epsilon_max']:.3g} for delta = 1e-05" in printed
