"""Client fingerprints: a shared random projection of a client's LoRA gradient or update.

A fingerprint summarises what a client's task asks of the model without sending its data: the
client flattens its LoRA gradients (or first-round update) in sorted key order and projects the
resulting vector, of dimension d (about a million for SmolLM2-135M with rank 8), to ``dim``
numbers with a random matrix R [d, dim] that every client derives from the same seed. By the
Johnson–Lindenstrauss lemma, inner products and distances between clients are approximately
preserved, so clustering fingerprints groups clients whose tasks pull the adapter the same way
(docs/design.md, "Task graph").

R is never held in memory: its rows are generated in fixed blocks of ``CHUNK_ROWS`` rows, block
``b`` from ``SeedSequence([seed, b])``, so row i of R depends only on (seed, i, dim, distribution)
and not on how the input is split into parts. Pure numpy: arrays in, arrays out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

CHUNK_ROWS = 8192
"""Rows of the projection matrix generated at once (8192 x 256 float32 = 8 MiB)."""

DISTRIBUTIONS = ("gaussian", "rademacher")


def _block(seed: int, index: int, dim: int, distribution: str) -> np.ndarray:
    """Rows [index * CHUNK_ROWS, (index + 1) * CHUNK_ROWS) of the projection matrix."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    if distribution == "gaussian":
        return rng.standard_normal((CHUNK_ROWS, dim), dtype=np.float32)
    signs = rng.integers(0, 2, size=(CHUNK_ROWS, dim), dtype=np.int8)
    return (2 * signs - 1).astype(np.float32)


def projection_matrix(
    num_features: int, dim: int = 256, seed: int = 0, distribution: str = "gaussian"
) -> np.ndarray:
    """The dense [num_features, dim] matrix :func:`project` applies, for tests and small inputs.

    Entries are i.i.d. standard normal (or +-1); the usual 1/sqrt(dim) scale is left out
    because :func:`project` L2-normalises its output, which cancels any common scale.
    """
    _check_settings(dim, seed, distribution)
    blocks = -(-num_features // CHUNK_ROWS)
    rows = [_block(seed, b, dim, distribution) for b in range(blocks)]
    if not rows:
        return np.zeros((0, dim), dtype=np.float32)
    return np.concatenate(rows)[:num_features]


def _check_settings(dim: int, seed: int, distribution: str) -> None:
    if dim < 1:
        raise ValueError(f"projection dim must be >= 1, got {dim}")
    if seed < 0:
        raise ValueError(f"projection seed must be >= 0, got {seed}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")


def _parts(vector_parts: Mapping[str, np.ndarray] | np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """(name, flat float array) in sorted key order, the layout every client shares."""
    if isinstance(vector_parts, Mapping):
        for key in sorted(vector_parts):
            yield str(key), np.asarray(vector_parts[key]).reshape(-1)
    else:
        yield "vector", np.asarray(vector_parts).reshape(-1)


def project(
    vector_parts: Mapping[str, np.ndarray] | np.ndarray,
    dim: int = 256,
    seed: int = 0,
    distribution: str = "gaussian",
) -> np.ndarray:
    """L2-normalised random projection x @ R of a (possibly huge) vector, shape [dim], float64.

    vector_parts: one array, or a mapping name -> array (e.g. LoRA gradients); a mapping is
        flattened in sorted key order, so clients with the same keys and shapes share the layout.
    dim: fingerprint size (default 256).
    seed: shared projection seed; the same seed gives every client the same R.
    distribution: 'gaussian' (N(0, 1) entries) or 'rademacher' (+-1 entries).

    Raises ValueError when a part is non-numeric or non-finite, or the whole vector is empty or
    zero (a fingerprint of nothing cannot be normalised).
    """
    _check_settings(dim, seed, distribution)
    parts = list(_parts(vector_parts))
    peak = 0.0
    for name, part in parts:
        if not (np.issubdtype(part.dtype, np.floating) or np.issubdtype(part.dtype, np.integer)):
            raise ValueError(f"fingerprint part {name!r} is not real-valued (dtype {part.dtype})")
        bad = int(np.count_nonzero(~np.isfinite(part))) if part.dtype.kind == "f" else 0
        if bad:
            raise ValueError(
                f"fingerprint part {name!r} has {bad} non-finite values (NaN or inf) out of "
                f"{part.size}; the gradient or update diverged"
            )
        if part.size:
            peak = max(peak, float(np.max(np.abs(part))))
    total = sum(part.size for _name, part in parts)
    if total == 0:
        raise ValueError("cannot fingerprint an empty vector (no parts, or all parts empty)")
    if peak == 0.0:
        raise ValueError(f"cannot fingerprint a zero vector: all {total} values are 0")

    # Dividing by the peak first keeps float32 products in range; the final norm cancels it.
    result = np.zeros(dim, dtype=np.float64)
    offset = 0
    cached: tuple[int, np.ndarray] | None = None
    for _name, part in parts:
        start = 0
        while start < part.size:
            block, row = divmod(offset, CHUNK_ROWS)
            length = min(CHUNK_ROWS - row, part.size - start)
            if cached is None or cached[0] != block:
                cached = (block, _block(seed, block, dim, distribution))
            segment = (part[start : start + length] / peak).astype(np.float32)
            result += segment @ cached[1][row : row + length]
            start += length
            offset += length
    norm = float(np.linalg.norm(result))
    if not norm > 0.0 or not np.isfinite(norm):
        raise ValueError(f"projection of the {total}-value vector has norm {norm}")
    return result / norm
