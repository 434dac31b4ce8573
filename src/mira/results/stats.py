"""Statistics of runs: per-round summaries over clients, per-run statistics after the final
round, means and stds over seeds, and the per-round curves the plots draw.

Reads nothing and imports neither torch nor flwr: rows in, numbers out. Runs come in as
:class:`mira.results.schema.RunRecord` (method, seed, folder, metric rows, run.json).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from scipy import stats as scipy_stats

from mira.config import RULES, TASK_METRICS
from mira.results.schema import MIX_WEIGHT, ClientRow, RunRecord, RunRows

Stat = float | None
Curve = tuple[np.ndarray, np.ndarray]
"""(rounds, values), rounds ascending."""
T = TypeVar("T")

CONFIDENCE = 0.95
"""Level of the t-interval of a mean over seeds (:func:`t_interval`)."""
SILENT_RULES = tuple(rule.name for rule in RULES.values() if not rule.exchanges)
"""Server rules that exchange nothing: every client could keep its own adapter."""


def unique(items: Iterable[T]) -> list[T]:
    """Items in order of first appearance, each once."""
    return list(dict.fromkeys(items))


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


# ------------------------------------------------------------------------------ one run
def value(recorded: float | None) -> float:
    """A recorded number, NaN when absent or null (a diverged client stays visible as NaN)."""
    return math.nan if recorded is None else float(recorded)


def eval_loss(row: ClientRow) -> float:
    """A client row's personalised eval loss, NaN when not recorded."""
    return value(row.eval_loss)


def mix_weight(row: ClientRow) -> float | None:
    """A client row's mix weight (None: not recorded)."""
    return row.mix_weight


def metric_names(rows: Iterable[ClientRow]) -> list[str]:
    """Task metrics present in any row, in the canonical order."""
    present = {name for r in rows for name in r.metrics}
    return [m for m in TASK_METRICS if m in present]


def summary_metric_names(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Task metrics with a column in any summary row, in the canonical order."""
    present = {k for r in rows for k in r}
    return [m for m in TASK_METRICS if m in present]


def client_numbers(rows: Sequence[ClientRow]) -> dict[str, list[float | None]]:
    """Each task metric any row records, then the mix weight: one value per row (None where
    that row records none), by the name summaries give them."""
    numbers: dict[str, list[float | None]] = {
        name: [r.metrics.get(name) for r in rows] for name in metric_names(rows)
    }
    numbers[MIX_WEIGHT] = [r.mix_weight for r in rows]
    return numbers


def rule_of_rows(rows: RunRows, label: str) -> str:
    """The server rule a run's rows record (``server.method``), else its label's rule
    (``'mira@server.step=0.1'`` -> ``'mira'``)."""
    recorded = next((r.method for r in rows.all() if r.method), label)
    return recorded.split("@", 1)[0]


def wall_seconds(run: RunRecord) -> Stat:
    """The run's wall time: run.json's (a comparison records start to end), else the sum of
    the seconds its round rows recorded (a single run)."""
    if run.info.get("seconds") is not None:
        return float(run.info["seconds"])
    seconds = [float(r.seconds) for r in run.rows.rounds]
    return float(sum(seconds)) if seconds else None


def run_statistics(run: RunRecord) -> dict[str, Stat]:
    """Statistics of one run after its final round.

    ``personalised_loss_mean`` / ``_worst`` / ``_spread``: mean, max and std (over clients,
    ddof 0 as in the round rows) of each client's personalised eval loss; ``<metric>`` and
    ``<metric>[<task>]``: mean over clients (of that task) of each task metric, and
    ``personalised_loss[<task>]`` likewise; ``mix_weight`` and ``mix_weight[<task>]``: mean
    share taken from neighbours in the final round; ``bytes_up_per_round`` /
    ``bytes_down_per_round``: mean over rounds of the round totals mira's harness moved, and
    ``exchanged_bytes_up_per_round`` / ``..._down_...`` what the server rule exchanges: the
    same, except 0 for a rule of ``SILENT_RULES`` (local: the harness still ships each
    adapter to the server, which keeps client state between rounds, and back);
    ``peak_memory_mb``: max over rounds; ``wall_seconds``: :func:`wall_seconds`.
    """
    final = run.rows.final_clients()
    rounds = run.rows.rounds
    losses = np.array([eval_loss(r) for r in final])
    stats: dict[str, Stat] = {
        "personalised_loss_mean": float(np.mean(losses)) if losses.size else None,
        "personalised_loss_worst": float(np.max(losses)) if losses.size else None,
        "personalised_loss_spread": float(np.std(losses)) if losses.size else None,
    }
    tasks = unique(r.task for r in final)
    for task in tasks:
        of_task = [eval_loss(r) for r in final if r.task == task]
        stats[f"personalised_loss[{task}]"] = float(np.mean(of_task))
    for name, numbers in client_numbers(final).items():
        present = [v for v in numbers if v is not None]
        if not present:
            continue
        stats[name] = float(np.mean(present))
        for task in tasks:
            values = [
                v for r, v in zip(final, numbers, strict=True) if r.task == task and v is not None
            ]
            if values:
                stats[f"{name}[{task}]"] = float(np.mean(values))
    up = [float(r.bytes_up) for r in rounds]
    down = [float(r.bytes_down) for r in rounds]
    memory = [float(r.peak_memory_mb) for r in rounds if r.peak_memory_mb is not None]
    stats["bytes_up_per_round"] = float(np.mean(up)) if up else None
    stats["bytes_down_per_round"] = float(np.mean(down)) if down else None
    silent = rule_of_rows(run.rows, run.method) in SILENT_RULES
    for key in ("bytes_up_per_round", "bytes_down_per_round"):
        measured = stats[key]
        stats[f"exchanged_{key}"] = 0.0 if silent and measured is not None else measured
    stats["wall_seconds"] = wall_seconds(run)
    stats["peak_memory_mb"] = max(memory) if memory else None
    return stats


# ------------------------------------------------------------------------------ over seeds
def mean_std(values: Sequence[Stat]) -> tuple[Stat, Stat]:
    """Mean and sample std (ddof 1) over seeds of the values that exist; std None below 2."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    mean = float(np.mean(present))
    if len(present) < 2:
        return mean, None
    std = float(np.std(present, ddof=1))
    # Equal values give a std of rounding noise (1e-16); show it as the 0 it is.
    return mean, (0.0 if std <= 1e-12 * max(1.0, abs(mean)) else std)


def t_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """The Student's t confidence interval of the mean of ``values`` (independent draws, e.g.
    per-seed paired differences): mean ± t_{(1+c)/2, n-1} s / sqrt(n), s the sample std
    (ddof 1). None below two values (no spread to estimate)."""
    n = len(values)
    if n < 2:
        return None
    mean, std = mean_std(values)
    assert mean is not None and std is not None
    half = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def summarise_runs(
    runs: Sequence[RunRecord],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per method (mean and std over seeds) and per method x client (mean over seeds).

    Row keys: ``method``, ``seeds`` (how many), ``seed_list``, then for every statistic of
    :func:`run_statistics` the mean over seeds under its name and the std under ``<name>_std``.
    Per-client keys: ``method``, ``client``, ``task``, ``seeds``, ``personalised_loss`` (+
    ``_std``), each task metric and ``mix_weight`` (+ ``_std``).
    """
    rows: list[dict[str, Any]] = []
    per_client: list[dict[str, Any]] = []
    for method in unique(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        stats = [run_statistics(r) for r in mine]
        row: dict[str, Any] = {
            "method": method,
            "seeds": len(mine),
            "seed_list": " ".join(str(r.seed) for r in mine),
        }
        for name in unique(k for s in stats for k in s):
            row[name], row[f"{name}_std"] = mean_std([s.get(name) for s in stats])
        rows.append(row)
        finals = [r.rows.final_clients() for r in mine]
        for client in unique(c.client for final in finals for c in final):
            seen = [c for final in finals for c in final if c.client == client]
            entry: dict[str, Any] = {
                "method": method,
                "client": client,
                "task": seen[0].task,
                "seeds": len(seen),
            }
            losses: list[Stat] = [eval_loss(c) for c in seen]
            entry["personalised_loss"], entry["personalised_loss_std"] = mean_std(losses)
            for name, numbers in client_numbers(seen).items():
                if any(v is not None for v in numbers):
                    entry[name], entry[f"{name}_std"] = mean_std(numbers)
            per_client.append(entry)
    return rows, per_client


def per_task_values(
    rows: Sequence[dict[str, Any]], prefix: str
) -> tuple[list[str], dict[str, tuple[list[float], list[float]]]]:
    """Tasks with ``prefix[task]`` columns, and per method the means and stds (NaN if absent)."""
    tasks = unique(
        k[len(prefix) + 1 : -1]
        for r in rows
        for k in r
        if k.startswith(prefix + "[") and not k.endswith("_std")
    )

    def number(cell: Any) -> float:
        return math.nan if cell is None else float(cell)

    values = {
        r["method"]: (
            [number(r.get(f"{prefix}[{t}]")) for t in tasks],
            [number(r.get(f"{prefix}[{t}]_std")) for t in tasks],
        )
        for r in rows
    }
    return tasks, values


# ------------------------------------------------------------------------------ curves
Measure = Callable[[ClientRow], float | None]
"""What a curve follows in each client row (None: the row does not record it)."""


def _client_values(run: RunRecord, measure: Measure) -> dict[tuple[str, int], float]:
    return {
        (r.client, r.round): recorded
        for r in run.rows.clients
        if (recorded := measure(r)) is not None
    }


def client_curves(
    runs: Sequence[RunRecord], measure: Measure = eval_loss
) -> dict[str, dict[str, Curve]]:
    """method -> client -> ``measure`` (default: personalised eval loss) per round, mean over
    the method's seeds. Clients that never recorded it are left out."""
    out: dict[str, dict[str, Curve]] = {}
    for method in unique(r.method for r in runs):
        samples: dict[tuple[str, int], list[float]] = {}
        for run in (r for r in runs if r.method == method):
            for point, recorded in _client_values(run, measure).items():
                samples.setdefault(point, []).append(recorded)
        curves: dict[str, Curve] = {}
        for client in unique(c for c, _ in samples):
            rounds = sorted(r for c, r in samples if c == client)
            values = [float(np.mean(samples[(client, r)])) for r in rounds]
            curves[client] = (np.array(rounds), np.array(values))
        if curves:
            out[method] = curves
    return out


def mean_curves(runs: Sequence[RunRecord]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """method -> (rounds, mean over seeds, seeds x rounds matrix).

    Each matrix row is one seed's mean personalised eval loss over clients per round; the plot
    draws the mean over seeds and shades the min-max of the matrix columns.
    """
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for method in unique(r.method for r in runs):
        per_seed = []
        for run in (r for r in runs if r.method == method):
            by_round: dict[int, list[float]] = {}
            for (_, rnd), loss in _client_values(run, eval_loss).items():
                by_round.setdefault(rnd, []).append(loss)
            per_seed.append({rnd: float(np.mean(v)) for rnd, v in by_round.items()})
        rounds = np.array(sorted({rnd for seed in per_seed for rnd in seed}))
        matrix = np.array([[seed.get(int(rnd), math.nan) for rnd in rounds] for seed in per_seed])
        out[method] = (rounds, matrix.mean(axis=0), matrix)
    return out
