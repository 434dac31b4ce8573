"""``mira diff A B``: how far two runs of the same clients are apart, and where.

A check that two settings compute the same thing: ``server.step = 0`` against ``local``, a
resumed run against an uninterrupted one, two machines. It compares every recorded (round,
client) personalised eval loss, and the final adapters in ``adapters/`` where both runs saved
them, and names the round, client and tensor of the largest difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mira.results.errors import DiffError
from mira.results.rundir import read_metrics
from mira.results.schema import RunLayout


@dataclass(frozen=True)
class RunDifferences:
    """How far two run directories are apart, as largest absolute differences."""

    pairs: int  # (round, client) eval losses compared
    eval_loss: float
    clients_with_adapters: int  # clients whose saved adapters were compared (0: none saved)
    adapter: float | None  # None when the folders do not both hold adapters
    eval_loss_at: tuple[int, str] | None = None  # (round, client) of the largest difference
    eval_loss_values: tuple[float, float] | None = None  # the two losses there
    adapter_at: tuple[str, str] | None = None  # (client, tensor) of the largest difference

    def largest(self) -> float:
        return max(self.eval_loss, self.adapter or 0.0)

    def describe(self, first: str = "A", second: str = "B") -> list[str]:
        """Two lines for the terminal: eval losses, then adapters."""
        line = f"eval loss: {self.pairs} (round, client) pairs, largest |difference| "
        line += f"{self.eval_loss:.3g}"
        if self.eval_loss > 0 and self.eval_loss_at and self.eval_loss_values:
            rnd, client = self.eval_loss_at
            a, b = self.eval_loss_values
            line += f" at round {rnd}, client {client} ({a:.6g} in {first}, {b:.6g} in {second})"
        lines = [line]
        if self.adapter is None:
            lines.append("adapters: not saved in both runs, not compared")
        else:
            line = (
                f"adapters: {self.clients_with_adapters} clients, largest |difference| "
                f"{self.adapter:.3g}"
            )
            if self.adapter > 0 and self.adapter_at is not None:
                line += f" at client {self.adapter_at[0]}, tensor {self.adapter_at[1]}"
            lines.append(line)
        return lines


def _client_losses(folder: Path) -> dict[tuple[int, str], float]:
    metrics = RunLayout(folder).metrics
    if not metrics.is_file():
        raise DiffError(f"{folder} is not a run directory: it has no {metrics.name}")
    return {
        (r.round, r.client): math.nan if r.eval_loss is None else float(r.eval_loss)
        for r in read_metrics(folder).clients
    }


def _gap(a: float, b: float) -> float:
    """|a - b|, 0 when both are missing (NaN), infinite when only one is."""
    if math.isnan(a) and math.isnan(b):
        return 0.0
    if math.isnan(a) or math.isnan(b):
        return math.inf
    return abs(a - b)


def run_differences(first: Path, second: Path) -> RunDifferences:
    """Compare two runs of the same clients: every recorded (round, client) eval loss, and
    the final adapters in ``adapters/`` where both folders have them.

    Raises DiffError when the runs do not cover the same rounds and clients, or their adapters
    hold different tensors.
    """
    from safetensors.numpy import load_file

    first, second = Path(first), Path(second)
    losses_a, losses_b = _client_losses(first), _client_losses(second)
    if losses_a.keys() != losses_b.keys():
        only_a = sorted(losses_a.keys() - losses_b.keys())[:3]
        only_b = sorted(losses_b.keys() - losses_a.keys())[:3]
        raise DiffError(
            f"the runs record different (round, client) pairs: only in {first}: {only_a}; "
            f"only in {second}: {only_b}"
        )
    eval_loss, eval_at, eval_values = 0.0, None, None
    for key in sorted(losses_a):
        gap = _gap(losses_a[key], losses_b[key])
        if gap > eval_loss or eval_at is None:
            eval_loss, eval_at, eval_values = gap, key, (losses_a[key], losses_b[key])
    layout_a, layout_b = RunLayout(first), RunLayout(second)
    clients_a, clients_b = set(layout_a.saved_adapters()), set(layout_b.saved_adapters())
    if not clients_a or not clients_b:
        return RunDifferences(len(losses_a), eval_loss, 0, None, eval_at, eval_values)
    if clients_a != clients_b:
        raise DiffError(
            f"the runs saved adapters for different clients: {sorted(clients_a ^ clients_b)}"
        )
    worst, worst_at = 0.0, None
    for client in sorted(clients_a):
        a = load_file(str(layout_a.adapter(client).weights))
        b = load_file(str(layout_b.adapter(client).weights))
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise DiffError(f"client {client}: the two adapters hold different tensors")
        for tensor in sorted(a):
            difference = np.abs(a[tensor].astype(np.float64) - b[tensor].astype(np.float64))
            largest = float(difference.max(initial=0.0))
            if largest > worst or worst_at is None:
                worst, worst_at = largest, (client, tensor)
    return RunDifferences(
        len(losses_a), eval_loss, len(clients_a), worst, eval_at, eval_values, worst_at
    )
