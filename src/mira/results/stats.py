"""Statistics of runs: per-round summaries over clients, and the worst client of a metric.

Reads nothing and imports neither torch nor flwr: rows in, numbers out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def lower_is_better(name: str) -> bool:
    """Losses and perplexities shrink as models improve; every other metric grows."""
    return "loss" in name or "perplexity" in name


def summarise(values: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Mean and worst client of each metric: ``{name: {"mean", "worst", "worst_index"}}``.

    ``values[name]`` holds one value per client; the worst is the minimum for accuracy,
    ROUGE-L, exact match and token F1, and the maximum for losses. NaN values (a client
    without that metric) are left out; a metric with no value is left out.
    """
    summary = {}
    for name, seq in values.items():
        array = np.asarray(seq, dtype=np.float64)
        valid = np.flatnonzero(~np.isnan(array))
        if valid.size == 0:
            continue
        picked = array[valid]
        pos = int(np.argmax(picked) if lower_is_better(name) else np.argmin(picked))
        summary[name] = {
            "mean": float(picked.mean()),
            "worst": float(picked[pos]),
            "worst_index": int(valid[pos]),
        }
    return summary
