"""The server rules of mira, as pure functions of the clients' adapters (docs/design.md,
"Server rules").

Every fixed rule is a K x K mixing matrix M (:mod:`mira.core.mixing`) applied to a snapshot of
all stored adapters, new_k = sum_l M[k, l] W_l, in factor or product space
(:mod:`mira.core.spaces`):

- ``local``: M = I (no communication).
- ``mira``: M = I - step * L on the sampled rows (Elbakary et al. 2025, eq. 8); every client
  keeps its OWN adapter, pulled toward its neighbours'.
- ``fedit``: every row is the example-weighted average of the sampled clients (FedIT; with
  mixed ranks the products are averaged and truncated per client, FlexLoRA).
- ``cluster-fedavg``: FedAvg inside each cluster; every member gets its cluster's model.
- ``cluster-merge``: cluster averages merged with equal weight into one global model.

``mira`` with ``server.step = "auto"`` reads the pull as a mix, W_k <- (1 - alpha_k) W_k +
alpha_k M_k with M_k the neighbours' weighted mean (:func:`neighbour_means`), and lets each
client choose its own alpha_k from :func:`auto_candidates` by its loss on a validation split
it holds, measured at a few of them (:func:`search_points`) and read off the curve through
those for the rest (:func:`interpolate_losses`). :func:`decide_mix` is the one decision, on
the client and on the server alike (:func:`choose_within`: the argmin, or with a tolerance the
candidate nearest the equal-share point among those the split cannot tell from the best;
smoothed across rounds by :func:`smoothed_mix`); pooled by cluster the server makes it from
the clients' :func:`validation_sums` put together (:func:`pooled_losses`). :func:`mix_toward`
forms the chosen adapter, on the client and on the server alike, so both hold the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mira.core.adapters import Adapter, from_modules, to_modules
from mira.core.mixing import (
    cluster_merge_mixing,
    cluster_mixing,
    fedavg_mixing,
    mixing_matrix,
    neighbour_mean_rows,
)
from mira.core.robust import bounded_mixing, pairwise_distances
from mira.core.spaces import factor_mix, product_mix

PULL_SPACES = ("factor", "product")


def resolve_pull_space(pull_space: str, ranks: Sequence[int]) -> str:
    """'factor' or 'product': auto picks factor when every rank is equal."""
    equal = len(set(ranks)) == 1
    if pull_space == "auto":
        return "factor" if equal else "product"
    if pull_space == "factor" and not equal:
        raise ValueError(
            "server.pull_space = 'factor' needs equal LoRA ranks, got ranks "
            f"{sorted(set(ranks))}; use 'product' or 'auto'"
        )
    return pull_space


@dataclass(frozen=True)
class RoundGraph:
    """What a fixed rule's mixing matrix is made of in one round: the graph's ``adjacency``,
    the pull's ``step``, every client's cluster, its weight (its examples) and whether it was
    sampled (``active``)."""

    adjacency: np.ndarray
    step: float
    clusters: Sequence[int]
    weights: Sequence[float]
    active: Sequence[bool]


MIXING: dict[str, Callable[[RoundGraph], np.ndarray]] = {
    "mira": lambda r: mixing_matrix(r.adjacency, r.step, r.active),
    "fedit": lambda r: fedavg_mixing(r.weights, r.active),
    "cluster-fedavg": lambda r: cluster_mixing(r.clusters, r.weights, r.active),
    "cluster-merge": lambda r: cluster_merge_mixing(r.clusters, r.weights, r.active),
    "local": lambda r: np.eye(r.adjacency.shape[0]),
}
"""The mixing matrix of every server rule (:data:`mira.config.RULES`, the same names), the one
place a rule's math is chosen."""


def mixing_for(
    method: str,
    *,
    adjacency: np.ndarray,
    step: float,
    clusters: Sequence[int],
    weights: Sequence[float],
    active: Sequence[bool],
) -> np.ndarray:
    """The mixing matrix of a fixed ``method`` for this round's sampled (``active``) clients."""
    if method not in MIXING:
        raise ValueError(f"unknown server method {method!r}; choose one of: {', '.join(MIXING)}")
    return MIXING[method](RoundGraph(adjacency, step, clusters, weights, active))


def apply_mixing(
    adapters: Sequence[Adapter], mixing: np.ndarray, space: str, scales: Sequence[float]
) -> list[Adapter]:
    """New stored adapter of every client: ``mixing`` applied to one snapshot (simultaneous).

    A client whose row is the identity keeps its own arrays untouched (in product space a
    refactorisation would change nothing in B @ A but would change later local training).
    """
    k = len(adapters)
    unchanged = [bool(mixing[i, i] == 1.0 and np.count_nonzero(mixing[i]) == 1) for i in range(k)]
    if all(unchanged):
        return [dict(a) for a in adapters]
    if space == "factor":
        mixed = factor_mix(list(adapters), mixing)
    else:
        modules = product_mix([to_modules(a) for a in adapters], mixing, list(scales))
        mixed = [from_modules(m) for m in modules]
    return [dict(adapters[i]) if unchanged[i] else mixed[i] for i in range(k)]


def bound_pull(
    mixing: np.ndarray,
    adapters: Sequence[Adapter],
    space: str,
    scales: Sequence[float],
    robust: float,
) -> np.ndarray:
    """``mixing`` under the robust pull (``server.robust`` = the multiple; 0 = unchanged):
    every neighbour's difference clipped to that multiple of the round's median edge, measured
    in the pull's ``space`` (:mod:`mira.core.robust`)."""
    if robust <= 0:
        return mixing
    edges = np.asarray(mixing) > 0  # bounded_mixing reads the edges' distances only
    distances = pairwise_distances(adapters, space, scales, pairs=edges)
    return bounded_mixing(mixing, distances, robust)


def apply_rule(
    method: str,
    adapters: Sequence[Adapter],
    *,
    adjacency: np.ndarray,
    step: float,
    clusters: Sequence[int],
    weights: Sequence[float],
    active: Sequence[bool],
    ranks: Sequence[int],
    scales: Sequence[float],
    pull_space: str = "auto",
) -> list[Adapter]:
    """New stored adapter of every client after one server step of a fixed rule."""
    mixing = mixing_for(
        method, adjacency=adjacency, step=step, clusters=clusters, weights=weights, active=active
    )
    return apply_mixing(adapters, mixing, resolve_pull_space(pull_space, ranks), scales)


# --------------------------------------------------------------------------------------------
# server.step = "auto": each client chooses how much of its neighbours' mean it takes
# --------------------------------------------------------------------------------------------


def auto_candidates(grid: Sequence[float], neighbours: int, equal_share: bool) -> list[float]:
    """The mix weights alpha a client tries, ascending.

    ``grid`` (``server.auto.grid``) plus, with ``equal_share``, the client's equal-share point
    n / (n + 1) for its ``neighbours`` count n: its own adapter and each neighbour's then weigh
    the same, which on a uniform cluster of n + 1 is exactly cluster-fedavg. A client without
    neighbours has nothing to mix with: its only candidate is 0.
    """
    if neighbours <= 0:
        return [0.0]
    values = {float(a) for a in grid}
    if equal_share:
        values.add(neighbours / (neighbours + 1))
    return sorted(values)


def choose_mix(losses: Sequence[float]) -> int:
    """Index of the candidate with the lowest validation loss: argmin_alpha L_val(alpha).

    Ties go to the first (smallest) candidate; a non-finite loss never wins.

    Raises:
        ValueError: no candidate has a finite loss.
    """
    current = np.asarray(losses, dtype=np.float64)
    if current.ndim != 1 or current.size == 0:
        raise ValueError("need one validation loss per candidate")
    finite = np.where(np.isfinite(current), current, np.inf)
    if not np.isfinite(finite).any():
        raise ValueError(f"no candidate has a finite validation loss: {current.tolist()}")
    return int(np.argmin(finite))


def sharing_anchor(neighbours: int) -> float:
    """The mix weight a tolerant choice leans toward: the equal-share point n / (n + 1) for n
    neighbours, where the client's own adapter weighs as much as each neighbour's (on a uniform
    cluster, exactly cluster-fedavg); 0 for a client without neighbours."""
    return neighbours / (neighbours + 1) if neighbours > 0 else 0.0


def paired_standard_errors(nll: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Standard error of each candidate's validation loss minus the best candidate's.

    ``nll[j, i]`` is the summed target NLL of validation example i under candidate j and
    ``tokens[i]`` its number of target tokens, so candidate j's loss is
    L_j = sum_i nll[j, i] / T with T = sum_i tokens[i]. Every candidate is scored on the same
    examples, so the difference to the best candidate b is a sum of paired per-example terms,
    L_j - L_b = sum_i d_i / T with d_i = nll[j, i] - nll[b, i], and its standard error is
    sqrt(n) * sd(d) / T over the n examples (0 for b itself, and 0 for every candidate when
    there is a single example: no spread to estimate; 0 too for a candidate whose loss is not
    finite, which is never chosen).

    Raises:
        ValueError: shapes that do not match, or no target token at all.
    """
    nll = np.asarray(nll, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    if nll.ndim != 2 or tokens.shape != (nll.shape[1],):
        raise ValueError(f"per-example losses {nll.shape} do not match token counts {tokens.shape}")
    total = float(tokens.sum())
    if total <= 0:
        raise ValueError("the validation split has no target token")
    examples = nll.shape[1]
    if examples < 2:
        return np.zeros(nll.shape[0])
    best = choose_mix(nll.sum(axis=1) / total)
    with np.errstate(invalid="ignore"):
        errors = np.sqrt(examples) * (nll - nll[best]).std(axis=1, ddof=1) / total
    # A candidate with a non-finite loss is never chosen (choose_within); 0 keeps it so.
    return np.where(np.isfinite(errors), errors, 0.0)


def choose_within(
    losses: Sequence[float],
    standard_errors: Sequence[float] | None,
    candidates: Sequence[float],
    tolerance: float,
    anchor: float,
) -> int:
    """Index of the candidate a client chooses (``server.auto.tolerance`` = tolerance tau).

    tau = 0 is the argmin (:func:`choose_mix`). With tau > 0 every candidate whose loss is
    within tau standard errors of the best one's (L_j - L_best <= tau * SE_j,
    :func:`paired_standard_errors`) is as good as the best on this validation split, and the
    client takes, among them, the one nearest ``anchor`` (:func:`sharing_anchor`; ties to the
    smaller alpha). It is the one-standard-error rule of model selection (Breiman et al. 1984;
    Hastie, Tibshirani and Friedman, sect. 7.10) with "share as the cluster does" as the
    preferred model: when a few validation examples cannot tell the candidates apart, the
    client shares like cluster-fedavg instead of following the noise to an end of the grid;
    when they can, it takes the best one.

    Raises:
        ValueError: no finite loss, or standard errors missing, of the wrong length, negative
            or not finite while tau > 0.
    """
    best = choose_mix(losses)
    if tolerance <= 0:
        return best
    current = np.asarray(losses, dtype=np.float64)
    spread = np.asarray(standard_errors if standard_errors is not None else [], dtype=np.float64)
    if spread.shape != current.shape or len(candidates) != current.size:
        raise ValueError(
            f"need one standard error and one candidate per loss: {current.size} losses, "
            f"{spread.size} standard errors, {len(candidates)} candidates"
        )
    if not np.all(np.isfinite(spread)) or np.any(spread < 0):
        raise ValueError(f"standard errors must be finite and >= 0, got {spread.tolist()}")
    margin = current - current[best]
    eligible = [
        j
        for j in range(current.size)
        if np.isfinite(current[j]) and margin[j] <= tolerance * spread[j]
    ]
    return min(eligible, key=lambda j: (abs(candidates[j] - anchor), candidates[j]))


def smoothed_mix(choice: float, prior: float | None, smoothing: float) -> float:
    """The mix weight a client applies: alpha_t = s * alpha_{t-1} + (1 - s) * choice_t.

    ``choice`` is this round's argmin over the grid, ``prior`` the weight the client applied
    the last time it chose (None: never), ``smoothing`` s = ``server.auto.smoothing``. With
    s = 0 the client applies its choice as it is. The validation loss of a mix is nearly linear
    in alpha over the grid, so a noisy estimate from a few examples lands on an end of the grid
    (0 or 1) and flips between them from round to round; the moving average keeps the weight
    near the share the client's rounds prefer on average.
    """
    if prior is None or smoothing <= 0:
        return float(choice)
    return float(smoothing * prior + (1 - smoothing) * choice)


@dataclass(frozen=True)
class MixDecision:
    """What a client applies: ``alpha``, the smoothed mix weight, from the candidate at
    ``index`` (its choice this round)."""

    alpha: float
    index: int


def decide_mix(
    losses: Sequence[float],
    standard_errors: Sequence[float] | None,
    candidates: Sequence[float],
    anchor: float,
    prior: float | None,
    *,
    tolerance: float,
    smoothing: float,
) -> MixDecision:
    """The one decision of ``server.step = "auto"``, made by the client and checked by the
    server with the same numbers (docs/design.md, "Personalisation strength"): the candidate
    :func:`choose_within` picks (the argmin, or with ``tolerance`` the one nearest ``anchor``
    among those within ``tolerance`` standard errors of the best), then the weight
    :func:`smoothed_mix` applies after ``prior`` (None: the first choice) with ``smoothing``.
    """
    index = choose_within(losses, standard_errors, candidates, tolerance, anchor)
    return MixDecision(smoothed_mix(candidates[index], prior, smoothing), index)


SURE_LOSS = 1e-6
"""The smallest summed NLL whose logarithm :func:`interpolate_losses` takes: a confident
example's float32 loss rounds to exactly 0, and log 0 would bend the curve without bound."""


def search_points(candidates: Sequence[float], anchor: float, evaluations: int) -> list[int]:
    """Indices of the candidates a client evaluates on its validation split, ascending
    (``server.auto.evaluations``; 0 = every candidate).

    The smallest and the largest candidate, the one nearest ``anchor`` (the equal-share point,
    where a tolerant choice leans) between them, then, one at a time, the candidate farthest
    from those taken (ties to the smaller), until ``evaluations`` are taken: on the default grid
    with the equal share 2/3, 0, 2/3, 1 and then 1/4. :func:`interpolate_losses` reads the
    others off the curve through them.

    Raises:
        ValueError: ``evaluations`` of 1 or 2 (too few to bend), or negative.
    """
    if evaluations < 0 or evaluations in (1, 2):
        raise ValueError(f"evaluations must be 0 (every candidate) or >= 3, got {evaluations}")
    count = len(candidates)
    if evaluations == 0 or evaluations >= count:
        return list(range(count))
    taken = [0, count - 1]
    inner = range(1, count - 1)
    taken.append(min(inner, key=lambda j: (abs(candidates[j] - anchor), candidates[j])))
    while len(taken) < evaluations:
        rest = [j for j in inner if j not in taken]
        taken.append(
            max(rest, key=lambda j: (min(abs(candidates[j] - candidates[i]) for i in taken), -j))
        )
    return sorted(taken)


def interpolate_losses(
    measured: np.ndarray, candidates: Sequence[float], points: Sequence[int]
) -> np.ndarray:
    """Losses at every candidate from those ``measured`` at ``points`` (rows in that order):
    the measured rows as they are, every other candidate's row from the polynomial through the
    points in log space (Lagrange; a cubic for four points), column by column.

    Per example: row j of ``measured`` holds the summed NLL of every validation example under
    candidate ``points[j]``, so each example's loss is interpolated along alpha on its own and
    the paired standard errors (:func:`paired_standard_errors`) apply to the result as to
    measured rows; a 1-d ``measured`` (mean losses) works the same. Why in log space: a loss is
    positive, and where a client's neighbours hold other labels its loss rises from near 0 at
    alpha = 0 by orders of magnitude toward 1, a curve no polynomial in the loss itself follows
    (it dips below 0) but one in its logarithm does (docs/design.md, "Personalisation strength",
    measures how often the choice comes out as with every candidate evaluated).

    Raises:
        ValueError: not one row per measured point, or two points at the same alpha.
    """
    measured = np.asarray(measured, dtype=np.float64)
    nodes = [float(candidates[j]) for j in points]
    if measured.shape[0] != len(points) or len(set(nodes)) != len(points):
        raise ValueError(
            f"need one row per distinct measured candidate: {measured.shape[0]} rows for "
            f"points {list(points)}"
        )
    with np.errstate(invalid="ignore"):  # a loss rounded to 0 in float32: "certain"
        logs = np.log(np.maximum(measured, SURE_LOSS))
    filled = np.empty((len(candidates), *measured.shape[1:]))
    for j, alpha in enumerate(candidates):
        if j in points:
            filled[j] = measured[list(points).index(j)]
            continue
        weights = [
            math.prod((alpha - other) / (node - other) for other in nodes if other != node)
            for node in nodes
        ]
        filled[j] = np.exp(np.tensordot(np.asarray(weights), logs, axes=1))
    return filled


@dataclass(frozen=True)
class ValidationSums:
    """One client's validation losses of every candidate as sums a server can add up over the
    clients of a cluster (``server.auto.pool = 'cluster'``): per candidate j the summed target
    NLL over its examples, the paired moments sum_i d_ij d_ik of the per-example differences
    d_ij = nll_ij - nll_i0 to the first candidate, its number of examples and of target tokens.
    The per-example losses stay with the client."""

    nll: tuple[float, ...]
    moments: tuple[tuple[float, ...], ...]
    examples: int
    tokens: float


def validation_sums(nll: np.ndarray, tokens: np.ndarray) -> ValidationSums:
    """:class:`ValidationSums` of per-example losses ``nll[j, i]`` with ``tokens[i]`` target
    tokens each (the arrays :func:`paired_standard_errors` takes)."""
    nll = np.asarray(nll, dtype=np.float64)
    differences = nll - nll[0]
    return ValidationSums(
        nll=tuple(float(v) for v in nll.sum(axis=1)),
        moments=tuple(tuple(float(v) for v in row) for row in differences @ differences.T),
        examples=int(nll.shape[1]),
        tokens=float(np.sum(tokens)),
    )


def pooled_losses(parts: Sequence[ValidationSums]) -> tuple[list[float], list[float]]:
    """The validation loss of every candidate over all the examples of ``parts`` and the
    standard error of its difference to the best one, as :func:`paired_standard_errors` gives
    them for those examples put together: L_j = sum of the NLL / sum of the tokens, and
    SE_j = sqrt(n) sd(d) / T over the n pooled examples' d_i = nll_ij - nll_ib, from
    sum d = N_j - N_b and sum d^2 = Q_jj - 2 Q_jb + Q_bb (the differences to candidate 0
    cancel).

    Raises:
        ValueError: no parts, parts of different lengths, or no target token at all.
    """
    if not parts or len({len(p.nll) for p in parts}) != 1:
        raise ValueError("need the sums of at least one client, all of the same candidates")
    nll = np.sum([p.nll for p in parts], axis=0)
    moments = np.sum([p.moments for p in parts], axis=0)
    examples = sum(p.examples for p in parts)
    tokens = sum(p.tokens for p in parts)
    if tokens <= 0:
        raise ValueError("the validation splits have no target token")
    losses = nll / tokens
    if examples < 2:
        return losses.tolist(), [0.0] * len(losses)
    best = choose_mix(losses)
    summed = nll - nll[best]
    squares = np.diag(moments) - 2 * moments[:, best] + moments[best, best]
    with np.errstate(invalid="ignore"):
        variance = np.maximum(squares - summed**2 / examples, 0.0) / (examples - 1)
        errors = np.sqrt(examples * variance) / tokens
    return losses.tolist(), np.where(np.isfinite(errors), errors, 0.0).tolist()


def neighbour_means(
    adapters: Sequence[Adapter],
    adjacency: np.ndarray,
    active: Sequence[bool],
    space: str,
    scales: Sequence[float],
    robust: float = 0.0,
) -> list[Adapter | None]:
    """Each active client's neighbour mean M_k = sum_l a_kl W_l / delta_k (None when it has no
    neighbour or is not active), in the form :func:`mix_toward` takes. With ``robust`` > 0
    (``server.robust``) each neighbour's difference from W_k is clipped first
    (:func:`bound_pull`), so M_k keeps some of W_k's own weight.

    Factor space: the weighted mean of the tensors, shaped like the client's adapter. Product
    space: the exact product sum_l (a_kl / delta_k) s_l B_l A_l as stacked factors of rank
    R = sum of the neighbours' ranks (A = [A_l; ...], B = [c_l s_l B_l, ...], scale 1), so no
    information is lost before the client's own projection.
    """
    rows = bound_pull(neighbour_mean_rows(adjacency, active), adapters, space, scales, robust)
    has_mean = [bool(np.any(rows[k])) for k in range(len(adapters))]
    if not any(has_mean):
        return [None] * len(adapters)
    if space == "factor":
        mixed = factor_mix(list(adapters), rows)
        return [mixed[k] if has_mean[k] else None for k in range(len(adapters))]
    modules = [to_modules(a) for a in adapters]
    means: list[Adapter | None] = []
    for k in range(len(adapters)):
        if not has_mean[k]:
            means.append(None)
            continue
        support = [int(j) for j in np.flatnonzero(rows[k])]
        stacked = {}
        for name in modules[k]:
            a_blocks = [modules[j][name][0] for j in support]
            b_blocks = [(rows[k, j] * scales[j]) * modules[j][name][1] for j in support]
            dtype = modules[k][name][0].dtype
            stacked[name] = (
                np.concatenate(a_blocks, axis=0).astype(dtype),
                np.concatenate(b_blocks, axis=1).astype(dtype),
            )
        means.append(from_modules(stacked))
    return means


def mix_toward(own: Adapter, mean: Adapter, alpha: float, space: str, scale: float) -> Adapter:
    """(1 - alpha) * own + alpha * mean: client k's adapter after its chosen mix.

    Factor space: of every tensor. Product space: of the products s_k B A and the mean's
    stacked product, projected to the client's own rank (best rank-r_k approximation, as every
    product-space rule). alpha = 0 returns ``own`` unchanged. ``scale`` is the client's LoRA
    scale s_k. The same function runs on the client (to evaluate candidates) and on the server
    (to store the chosen one), so both hold the same numbers.
    """
    mixing = np.array([[1.0 - alpha, alpha], [0.0, 1.0]])
    if alpha == 0.0:
        return dict(own)
    if space == "factor":
        return factor_mix([own, mean], mixing)[0]
    mixed = product_mix([to_modules(own), to_modules(mean)], mixing, [scale, 1.0])
    return from_modules(mixed[0])
