"""The server rules and the auto mix (mira.core.rules) against dense references, no Flower."""

from __future__ import annotations

import numpy as np
import pytest

from mira.config import METHODS, RULES
from mira.core import rules
from mira.core.adapters import from_modules, lora_scale, to_modules
from mira.core.mixing import mix_weights, mixing_matrix, neighbour_mean_rows


def factor_adapters(rng: np.random.Generator, k: int, rank: int = 3) -> list[dict]:
    return [
        {
            "m.lora_A.weight": rng.standard_normal((rank, 5)).astype(np.float32),
            "m.lora_B.weight": rng.standard_normal((4, rank)).astype(np.float32),
        }
        for _ in range(k)
    ]


GRAPH = np.array([[0, 1, 0.5, 0], [1, 0, 0, 0], [0.5, 0, 0, 0], [0, 0, 0, 0]], dtype=float)


def test_auto_candidates_add_the_equal_share_and_sort() -> None:
    assert rules.auto_candidates([0.0, 0.9, 0.5], 2, True) == pytest.approx([0, 0.5, 2 / 3, 0.9])
    assert rules.auto_candidates([0.0, 0.5], 1, True) == [0.0, 0.5]  # 1/2 already there
    assert rules.auto_candidates([0.25], 3, False) == [0.25]
    assert rules.auto_candidates([0.25, 0.5], 0, True) == [0.0]  # nobody to mix with


def test_choose_mix_is_the_argmin_with_ties_to_the_first_and_smoothing() -> None:
    assert rules.choose_mix([3.0, 1.0, 2.0]) == 1
    assert rules.choose_mix([1.0, 1.0, 2.0]) == 0
    assert rules.choose_mix([np.nan, 2.0, np.inf]) == 1
    with pytest.raises(ValueError, match="no candidate has a finite"):
        rules.choose_mix([np.nan, np.nan])
    # alpha_t = s * alpha_(t-1) + (1 - s) * choice_t
    assert rules.smoothed_mix(1.0, None, 0.5) == 1.0  # the first choice is applied as it is
    assert rules.smoothed_mix(1.0, 0.0, 0.5) == 0.5
    assert rules.smoothed_mix(0.0, 0.5, 0.75) == pytest.approx(0.375)
    assert rules.smoothed_mix(0.25, 0.9, 0.0) == 0.25  # no smoothing


def test_paired_standard_errors_are_those_of_the_per_example_differences() -> None:
    rng = np.random.default_rng(3)
    nll = rng.uniform(0.5, 4.0, size=(4, 7))
    tokens = rng.integers(1, 5, size=7).astype(float)
    nll[2] = nll[1] - 0.3  # candidate 2 is best, by the same amount on every example
    errors = rules.paired_standard_errors(nll, tokens)
    losses = nll.sum(axis=1) / tokens.sum()
    best = int(np.argmin(losses))
    assert best == 2 and errors[2] == 0.0
    assert errors[1] == pytest.approx(0.0, abs=1e-12)  # a constant difference has no spread
    for j in (0, 3):  # by hand: the sum of 7 paired differences, over all target tokens
        d = nll[j] - nll[best]
        by_hand = np.sqrt(sum((x - d.mean()) ** 2 for x in d) / 6 * 7) / tokens.sum()
        assert errors[j] == pytest.approx(by_hand, rel=1e-12)
    assert rules.paired_standard_errors(nll[:, :1], tokens[:1]).tolist() == [0.0] * 4
    broken = nll.copy()
    broken[0, 3] = np.nan  # a candidate whose loss is not finite: no error, and never chosen
    spread = rules.paired_standard_errors(broken, tokens)
    assert spread[0] == 0.0 and np.all(np.isfinite(spread))
    losses_broken = broken.sum(axis=1) / tokens.sum()
    assert rules.choose_within(losses_broken, spread, [0.0, 0.5, 2 / 3, 1.0], 9.0, 0.0) != 0
    with pytest.raises(ValueError, match="do not match"):
        rules.paired_standard_errors(nll, tokens[:3])
    with pytest.raises(ValueError, match="no target token"):
        rules.paired_standard_errors(nll, np.zeros(7))


def test_choose_within_takes_the_candidate_nearest_the_anchor_the_split_cannot_reject() -> None:
    alphas = [0.0, 0.25, 0.5, 2 / 3, 0.75, 1.0]
    losses = [1.00, 0.95, 0.90, 0.93, 0.96, 1.20]
    errors = [0.20, 0.10, 0.0, 0.02, 0.05, 0.10]
    assert rules.sharing_anchor(2) == pytest.approx(2 / 3) and rules.sharing_anchor(0) == 0.0
    # tau = 0: the argmin
    assert rules.choose_within(losses, None, alphas, 0.0, 2 / 3) == 2
    # tau = 1: 0 (0.10 <= 0.20), 0.25 and 0.5 are within, 2/3 (0.03 > 0.02) and 0.75 are not
    assert rules.choose_within(losses, errors, alphas, 1.0, 2 / 3) == 2
    # tau = 2: 2/3 is within (0.03 <= 0.04), and it is the anchor
    assert rules.choose_within(losses, errors, alphas, 2.0, 2 / 3) == 3
    # alpha 1 is never eligible (0.30 > 3 * 0.10): a large tau with anchor 1 stops at 0.75
    assert rules.choose_within(losses, errors, alphas, 2.9, 1.0) == 4
    # equally near the anchor: the smaller alpha
    assert rules.choose_within([1.0, 1.0], [0.0, 0.0], [0.25, 0.75], 1.0, 0.5) == 0
    with pytest.raises(ValueError, match="one standard error and one candidate per loss"):
        rules.choose_within(losses, errors[:2], alphas, 1.0, 2 / 3)
    with pytest.raises(ValueError, match="finite and >= 0"):
        rules.choose_within(losses, [-1.0, *errors[1:]], alphas, 1.0, 2 / 3)


def _decide_by_hand(nll, tokens, alphas, tolerance, anchor, prior, smoothing):
    """The auto decision written out in numpy: the one-standard-error rule toward ``anchor``
    on the paired per-example differences to the argmin, then the moving average."""
    losses = nll.sum(axis=1) / tokens.sum()
    best = int(np.argmin(losses))
    d = nll - nll[best]
    se = np.sqrt(nll.shape[1]) * d.std(axis=1, ddof=1) / tokens.sum()
    near = [j for j in range(len(alphas)) if losses[j] - losses[best] <= tolerance * se[j]]
    index = min(near, key=lambda j: (abs(alphas[j] - anchor), alphas[j]))
    applied = (
        alphas[index] if prior is None else smoothing * prior + (1 - smoothing) * alphas[index]
    )
    return applied, index


@pytest.mark.parametrize("seed", range(40))
def test_decide_mix_is_an_independent_recomputation(seed: int) -> None:
    """The one decision (client and server) against numpy written out, on random losses."""
    rng = np.random.default_rng(seed)
    alphas = [0.0, 0.25, 0.5, 2 / 3, 0.75, 1.0]
    examples = int(rng.integers(2, 9))
    curve = rng.normal(0, 0.3, size=3)  # loss along alpha: a random bend, example by example
    a = np.array(alphas)[:, None]
    nll = 3.0 + curve[0] * a + curve[1] * a**2 + rng.normal(0, 0.2, size=(6, examples))
    tokens = rng.integers(1, 6, size=examples).astype(float)
    tolerance, smoothing = float(rng.choice([0.0, 0.5, 1.0, 2.0])), float(rng.choice([0, 0.5]))
    anchor = float(rng.choice(alphas))
    prior = None if seed % 3 == 0 else float(rng.uniform())
    losses = (nll.sum(axis=1) / tokens.sum()).tolist()
    errors = rules.paired_standard_errors(nll, tokens).tolist()
    decision = rules.decide_mix(
        losses, errors, alphas, anchor, prior, tolerance=tolerance, smoothing=smoothing
    )
    alpha, index = _decide_by_hand(nll, tokens, alphas, tolerance, anchor, prior, smoothing)
    assert decision.index == index
    assert decision.alpha == pytest.approx(alpha, abs=1e-15)


def test_search_points_are_the_ends_the_anchor_and_then_the_farthest() -> None:
    alphas = [0.0, 0.25, 0.5, 2 / 3, 0.75, 1.0]
    assert rules.search_points(alphas, 2 / 3, 3) == [0, 3, 5]
    assert rules.search_points(alphas, 2 / 3, 4) == [0, 1, 3, 5]  # 1/4 is farthest from those
    assert rules.search_points(alphas, 0.5, 4) == [0, 1, 2, 5]  # 1/4 and 3/4 tie: the smaller
    assert rules.search_points(alphas, 0.0, 3) == [0, 1, 5]  # the nearest inside
    assert rules.search_points(alphas, 2 / 3, 0) == rules.search_points(alphas, 2 / 3, 9)
    assert rules.search_points(alphas, 2 / 3, 0) == list(range(6))
    assert rules.search_points([0.0], 0.0, 4) == [0]
    for wrong in (-1, 1, 2):
        with pytest.raises(ValueError, match="0 \\(every candidate\\) or >= 3"):
            rules.search_points(alphas, 0.5, wrong)


def test_interpolate_losses_keeps_the_measured_rows_and_follows_log_polynomials() -> None:
    rng = np.random.default_rng(5)
    alphas = [0.0, 0.25, 0.5, 2 / 3, 0.75, 1.0]
    for evaluations in (3, 4):
        points = rules.search_points(alphas, 2 / 3, evaluations)
        # per example: log loss(a) a polynomial of degree evaluations - 1 in a
        coefficients = rng.normal(size=(evaluations, 7))
        exact = np.exp([sum(c * a**i for i, c in enumerate(coefficients)) for a in alphas])
        filled = rules.interpolate_losses(exact[points], alphas, points)
        np.testing.assert_allclose(filled, exact, rtol=1e-12, atol=0)
        assert all(np.array_equal(filled[j], exact[j]) for j in points)  # bit for bit
    # A loss rising from near 0 by orders of magnitude (a client whose neighbours hold other
    # labels) stays positive and ordered between the measured points.
    steep = np.array([0.001, 0.16, 1.156, 4.251])  # at 0, 1/2, 2/3 and 1
    filled = rules.interpolate_losses(steep, [0.0, 0.25, 0.5, 2 / 3, 1.0], [0, 2, 3, 4])
    assert 0.001 < filled[1] < 0.16
    # An example whose float32 loss rounded to 0 is taken as 1e-6, not as log 0.
    confident = np.array([[0.0, 1.0], [0.0, 2.0], [1e-3, 3.0]])
    filled = rules.interpolate_losses(confident, [0.0, 0.5, 0.75, 1.0], [0, 1, 3])
    assert 0 < filled[2, 0] < 1e-3 and 2.0 < filled[2, 1] < 3.0
    everything = list(range(6))
    assert np.array_equal(rules.interpolate_losses(exact, alphas, everything), exact)
    with pytest.raises(ValueError, match="one row per distinct measured candidate"):
        rules.interpolate_losses(exact[:2], alphas, rules.search_points(alphas, 0.5, 3))


def test_pooled_losses_are_those_of_the_clients_examples_put_together() -> None:
    """server.auto.pool = 'cluster': what the server adds up gives the losses and paired
    standard errors of all the clients' examples at once, recomputed here in numpy."""
    rng = np.random.default_rng(8)
    clients = [(rng.uniform(1, 4, size=(5, m)), rng.integers(1, 6, size=m)) for m in (8, 3, 5)]
    together = np.concatenate([nll for nll, _ in clients], axis=1)
    tokens = np.concatenate([t for _, t in clients]).astype(float)
    losses, errors = rules.pooled_losses([rules.validation_sums(n, t) for n, t in clients])
    expected = together.sum(axis=1) / tokens.sum()
    np.testing.assert_allclose(losses, expected, rtol=1e-12)
    d = together - together[int(np.argmin(expected))]
    by_hand = np.sqrt(together.shape[1]) * d.std(axis=1, ddof=1) / tokens.sum()
    np.testing.assert_allclose(errors, by_hand, rtol=1e-9, atol=1e-15)
    alone = rules.pooled_losses([rules.validation_sums(*clients[0])])  # one client: its own
    np.testing.assert_allclose(alone[1], rules.paired_standard_errors(*clients[0]), atol=1e-15)
    with pytest.raises(ValueError, match="at least one client"):
        rules.pooled_losses([])


def test_neighbour_means_in_factor_space_are_the_weighted_means() -> None:
    rng = np.random.default_rng(0)
    adapters = factor_adapters(rng, 4)
    means = rules.neighbour_means(adapters, GRAPH, [True, True, False, True], "factor", [1.0] * 4)
    expected = (
        1 * adapters[1]["m.lora_A.weight"].astype(float)
        + 0.5 * adapters[2]["m.lora_A.weight"].astype(float)
    ) / 1.5
    assert means[0] is not None
    np.testing.assert_allclose(means[0]["m.lora_A.weight"], expected, rtol=1e-6)
    assert means[2] is None  # not active
    assert means[3] is None  # no neighbour
    np.testing.assert_array_equal(means[1]["m.lora_B.weight"], adapters[0]["m.lora_B.weight"])


def test_neighbour_mean_in_product_space_is_the_exact_stacked_product() -> None:
    rng = np.random.default_rng(1)
    ranks = [2, 3, 4, 2]
    adapters = [factor_adapters(rng, 1, r)[0] for r in ranks]
    scales = [lora_scale(8.0, r) for r in ranks]
    means = rules.neighbour_means(adapters, GRAPH, [True] * 4, "product", scales)
    module = to_modules(means[0])["m"]  # type: ignore[arg-type]
    assert module[0].shape == (3 + 4, 5)  # stacked rank: neighbours' ranks
    dense = sum(
        (GRAPH[0, j] / 1.5)
        * scales[j]
        * to_modules(adapters[j])["m"][1].astype(float)
        @ to_modules(adapters[j])["m"][0].astype(float)
        for j in (1, 2)
    )
    np.testing.assert_allclose(module[1] @ module[0], dense, rtol=1e-5, atol=1e-5)


def test_mix_toward_in_factor_space_and_zero_keeps_the_adapter() -> None:
    rng = np.random.default_rng(2)
    own, mean = factor_adapters(rng, 2)
    mixed = rules.mix_toward(own, mean, 0.3, "factor", 1.0)
    for key in own:
        expected = 0.7 * own[key].astype(float) + 0.3 * mean[key].astype(float)
        np.testing.assert_allclose(mixed[key], expected, rtol=1e-6)
        assert mixed[key].dtype == np.float32
    kept = rules.mix_toward(own, mean, 0.0, "factor", 1.0)
    assert all(np.array_equal(kept[k], own[k]) for k in own)


def test_mix_toward_in_product_space_is_the_best_rank_r_approximation() -> None:
    rng = np.random.default_rng(3)
    own = factor_adapters(rng, 1, 2)[0]
    neighbours = [factor_adapters(rng, 1, r)[0] for r in (3, 4)]
    scales = [lora_scale(8.0, r) for r in (2, 3, 4)]
    graph = np.array([[0, 1, 1], [1, 0, 0], [1, 0, 0]], dtype=float)
    mean = rules.neighbour_means([own, *neighbours], graph, [True] * 3, "product", scales)[0]
    assert mean is not None
    mixed = rules.mix_toward(own, mean, 0.4, "product", scales[0])
    a, b = to_modules(mixed)["m"]
    assert a.shape == (2, 5) and b.shape == (4, 2)
    own_a, own_b = to_modules(own)["m"]
    mean_a, mean_b = to_modules(mean)["m"]
    target = 0.6 * scales[0] * own_b.astype(float) @ own_a + 0.4 * mean_b.astype(float) @ mean_a
    u, s, vt = np.linalg.svd(target)
    best = (u[:, :2] * s[:2]) @ vt[:2]
    np.testing.assert_allclose(scales[0] * b.astype(float) @ a, best, atol=1e-5)


def test_fixed_step_mix_weight_is_step_times_degree_and_mean_rows_sum_to_one() -> None:
    mixing = mixing_matrix(GRAPH, 0.4, [True, True, True, False])
    np.testing.assert_allclose(mix_weights(mixing), [0.6, 0.4, 0.2, 0.0])
    rows = neighbour_mean_rows(GRAPH)
    np.testing.assert_allclose(rows.sum(axis=1), [1, 1, 1, 0])
    # The pull is the mix with the mean: I - step L = (1 - alpha) I + alpha * mean rows.
    alpha = 0.4 * GRAPH.sum(axis=1)
    np.testing.assert_allclose(
        mixing_matrix(GRAPH, 0.4), np.diag(1 - alpha) + alpha[:, None] * rows, atol=1e-15
    )


def test_apply_rule_local_returns_copies_and_modules_round_trip() -> None:
    rng = np.random.default_rng(4)
    adapters = factor_adapters(rng, 3)
    kept = rules.apply_rule(
        "local",
        adapters,
        adjacency=np.zeros((3, 3)),
        step=0.1,
        clusters=[0, 1, 2],
        weights=[1, 1, 1],
        active=[True] * 3,
        ranks=[3, 3, 3],
        scales=[1.0] * 3,
    )
    assert all(np.array_equal(kept[i][k], adapters[i][k]) for i in range(3) for k in adapters[0])
    assert from_modules(to_modules(adapters[0])).keys() == adapters[0].keys()


def _round_matrix(method: str, *, step: float = 0.2, split: int = 2) -> np.ndarray:
    """``method``'s mixing matrix on 4 sampled clients of unequal weights in two clusters:
    clients [0, split) and [split, 4), each cluster fully connected."""
    clusters = [0 if i < split else 1 for i in range(4)]
    adjacency = np.array(
        [[float(i != j and clusters[i] == clusters[j]) for j in range(4)] for i in range(4)]
    )
    return rules.mixing_for(
        method,
        adjacency=adjacency,
        step=step,
        clusters=clusters,
        weights=[1.0, 2.0, 3.0, 4.0],
        active=[True] * 4,
    )


def test_every_rule_has_one_mixing_matrix_and_its_record_says_what_that_matrix_does() -> None:
    assert tuple(rules.MIXING) == tuple(RULES) == METHODS
    for name, rule in RULES.items():
        mixing = _round_matrix(name)
        np.testing.assert_allclose(mixing.sum(axis=1), 1.0)
        # One model for every client: every row the same.
        assert rule.global_model == bool(np.allclose(mixing, mixing[0])), name
        # The step (server.step) changes the matrix of exactly the rules that read it.
        assert rule.uses_step == (not np.allclose(_round_matrix(name, step=0.1), mixing)), name
        # The graph (edges and clusters) changes the matrix of exactly the rules that read it.
        assert rule.uses_graph == (not np.allclose(_round_matrix(name, split=1), mixing)), name
        # A rule that exchanges nothing leaves every client its own adapter.
        assert rule.exchanges == (not np.allclose(mixing, np.eye(4))), name
    weights = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(_round_matrix("fedit")[0], weights / weights.sum())
    np.testing.assert_allclose(_round_matrix("cluster-merge")[0], [1 / 6, 2 / 6, 3 / 14, 4 / 14])
    np.testing.assert_allclose(_round_matrix("local"), np.eye(4))


def test_an_unknown_rule_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown server method 'fedavg'; choose one of: mira, "):
        _round_matrix("fedavg")
