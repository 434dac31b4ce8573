"""Client-side differential privacy of one trained adapter: clip its update, add Gaussian noise.

The client releases W_start + clip_C(W_trained - W_start) + N(0, (z C)^2 I): the update over
all LoRA tensors together is scaled to L2 norm at most C (``clip_norm``), then every coordinate
gets Gaussian noise of standard deviation z C (``noise_multiplier`` z). This is the client-level
Gaussian mechanism of DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private
Recurrent Language Models", Alg. 1, flat clipping), with the noise added by the client itself
(local DP), because mira's server sees every client's adapter, not only a sum. Its privacy over
the rounds a client trains is :func:`mira.core.accounting.client_epsilon`.

Flower's own building blocks do the work (``flwr.supercore.differential_privacy``, the helpers
behind its DP strategies and mods): ``get_norm``, ``clip_inputs_inplace`` (FlatClip),
``compute_stdv`` and ``add_gaussian_noise_inplace``. Flower's ``LocalDpMod`` does not fit
mira's exchange: it requires exactly one ArrayRecord in the server's message and in the reply
(mira's carry ``neighbour_mean`` under ``server.step = "auto"`` and ``fingerprint`` on a graph
refresh; identify queries and evaluation-only replies carry none, which it answers with an
error); under auto the client starts training from its mix with the mean, not from the adapter
in the message; it calibrates sigma with the classic (epsilon < 1) bound instead of a noise
multiplier; and its noise cannot be seeded.

Flower's noise helper draws from NumPy's global generator. :func:`privatise_update` seeds that
generator from the caller's ``rng`` for the call and restores it afterwards, so the caller owns
the randomness. In a real run that ``rng`` must come from the operating system's entropy
(``np.random.default_rng()``), never from ``federation.seed``: noise the server can regenerate
is no noise.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from flwr.supercore.differential_privacy import (
    add_gaussian_noise_inplace,
    clip_inputs_inplace,
    compute_stdv,
    get_norm,
)

from mira.core.adapters import Adapter

# NumPy's global generator is process-wide: one privatisation at a time swaps it.
_GLOBAL_RNG = threading.Lock()


@contextmanager
def _global_numpy_rng(rng: np.random.Generator) -> Iterator[None]:
    """NumPy's global generator, seeded from ``rng`` (128 bits), inside the block only."""
    with _GLOBAL_RNG:
        saved = np.random.get_state()
        entropy = [int(x) for x in rng.integers(0, 2**32, size=4, dtype=np.uint64)]
        seeded = np.random.RandomState(np.random.MT19937(np.random.SeedSequence(entropy)))
        np.random.set_state(seeded.get_state())
        try:
            yield
        finally:
            np.random.set_state(saved)


def privatise_update(
    start: Adapter,
    trained: Adapter,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> tuple[Adapter, float]:
    """The adapter a client uploads under DP, and the L2 norm of its update before clipping.

    Args:
        start: the adapter the client started training from (under ``server.step = "auto"``,
            its chosen mix with its neighbours' mean, not the adapter in the message).
        trained: the adapter after local training; same keys, shapes and dtypes as ``start``.
        clip_norm: C > 0, the bound on ||trained - start|| over all tensors together.
        noise_multiplier: z >= 0; every coordinate gets N(0, (z C)^2). 0 clips only.
        rng: where the noise comes from (see the module docstring).

    Returns:
        (start + clip_C(trained - start) + noise, in ``start``'s dtypes; ||trained - start||).
        The norm is for monitoring only: releasing it would leak beyond the accounted epsilon.
    """
    if not clip_norm > 0.0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm!r}")
    if not noise_multiplier >= 0.0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if set(start) != set(trained):
        raise ValueError("start and trained adapters hold different tensors")
    keys = sorted(start)
    for key in keys:
        if start[key].shape != trained[key].shape:
            raise ValueError(
                f"{key}: trained shape {trained[key].shape} != start shape {start[key].shape}"
            )
    # float64 for the arithmetic; the upload goes back to the adapter's own dtype.
    update = [trained[k].astype(np.float64) - start[k].astype(np.float64) for k in keys]
    norm = get_norm(update)
    if norm > clip_norm:  # below C FlatClip scales by 1, and a zero update would divide by 0
        clip_inputs_inplace(update, clip_norm)
    if noise_multiplier > 0.0:
        with _global_numpy_rng(rng):
            add_gaussian_noise_inplace(update, compute_stdv(noise_multiplier, clip_norm, 1))
    released = {
        k: (start[k].astype(np.float64) + u).astype(start[k].dtype)
        for k, u in zip(keys, update, strict=True)
    }
    return released, norm
