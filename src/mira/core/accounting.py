"""The privacy a client spends in a run with client-side DP (:mod:`mira.client.privacy`).

Each round a client trains, it releases one Gaussian mechanism: its update clipped to L2 norm C
plus N(0, (z C)^2 I). Over a client's whole data set (client-level DP, add-or-remove: its
clipped update against none) the sensitivity is C, so one release is the Gaussian mechanism
with noise multiplier z, which is (1/z)-GDP (Gaussian differential privacy, Dong, Roth & Su,
2022, "Gaussian Differential Privacy", JRSS-B, Thm 2.7). T such releases compose exactly to
(sqrt(T)/z)-GDP (ibid., Cor. 3.3), the Gaussian mechanism with multiplier z / sqrt(T), whose
(epsilon, delta) curve is the analytic Gaussian mechanism (Balle & Wang, 2018, "Improving the
Gaussian Mechanism for Differential Privacy", ICML, Thm 8). The conversion is Google's
dp-accounting library (``dp_accounting.get_epsilon_gaussian``, the backend Flower's own
``RdpAccountant`` wraps); tests/unit/client/test_privacy.py checks the composition against its
PLD accountant and its RDP accountant (an upper bound).

There is no amplification by sampling: mira samples clients with a seed the server knows, so a
client's epsilon counts the rounds it trained, not the rounds of the run. Other neighbour
relations: telling apart two full data sets of one client (replace-one) doubles the sensitivity,
i.e. use z / 2. Only the uploaded adapter is covered; fingerprints, losses and metrics a client
reports are not (docs/privacy.md).

Pure: numbers in, numbers out; no torch or Flower.
"""

from __future__ import annotations

import math

from mira.errors import MiraError

INSTALL = "pip install --no-deps dp-accounting==0.6.0 (or flwr[dp], which brings its dependencies)"


class AccountingError(MiraError, ImportError):
    """The accountant library is not installed."""


def _gaussian():
    try:
        from dp_accounting import gaussian_mechanism
    except ImportError as err:
        raise AccountingError(
            f"privacy accounting needs Google's dp-accounting library: {INSTALL}"
        ) from err
    return gaussian_mechanism


def _check(noise_multiplier: float, rounds: int, delta: float) -> None:
    if not noise_multiplier >= 0.0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def client_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``rounds`` releases with noise multiplier z (std z C, L2
    sensitivity C), composed: that of one Gaussian mechanism with multiplier z / sqrt(rounds).

    0 for no release; infinite for z = 0 (clipping alone is not private).
    """
    _check(noise_multiplier, rounds, delta)
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    sigma = noise_multiplier / math.sqrt(rounds)
    return float(_gaussian().get_epsilon_gaussian(sigma, delta))


def noise_for_epsilon(epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier z for which ``rounds`` releases stay within
    (``epsilon``, ``delta``): the inverse of :func:`client_epsilon`, to choose
    ``privacy.noise_multiplier`` for a budget."""
    if not epsilon > 0.0:
        raise ValueError(f"epsilon must be positive, got {epsilon!r}")
    _check(0.0, rounds, delta)
    if rounds == 0:
        return 0.0
    return float(_gaussian().get_sigma_gaussian(epsilon, delta)) * math.sqrt(rounds)
