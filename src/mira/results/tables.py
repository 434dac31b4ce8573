"""The tables of a run or a comparison, as :class:`mira.results.document.Table` models.

Each table is built once here and rendered by :mod:`mira.results.document` (markdown for
``comparison.md`` and ``report.md``, HTML for ``report.html``, aligned text for the terminal).
Every loss and task metric is personalised, and the titles say so. Every quantity of a table
(a column, or the columns of one quantity: the losses of a loss table, the task metrics) gets one
number format whose decimals its values choose (:func:`mira.results.document.number_format`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mira.config import TASK_METRICS
from mira.results.document import NumberFormat, Table, number_format
from mira.results.schema import MIX_WEIGHT, ReportFiles, RoundRow, RunLayout, RunRecord, RunRows
from mira.results.stats import (
    CONFIDENCE,
    mean_curves,
    mean_std,
    run_statistics,
    summary_metric_names,
    t_interval,
    unique,
)

PERSONALISED_NOTE = (
    "Every number is personalised: each client's own adapter after the server rule, "
    "evaluated on its own held-out split. For fedit and cluster-merge the personalised "
    "adapter is the shared global model that every client receives; for cluster-fedavg it "
    "is the model of the client's cluster."
)
REFERENCE = "mira"
"""The method the paired table subtracts."""


def _scaled(value: Any, factor: float) -> Any:
    return None if value is None else float(value) * factor


def _task_columns(rows: Sequence[dict[str, Any]], prefix: str) -> list[str]:
    return unique(
        k for r in rows for k in r if k.startswith(prefix + "[") and not k.endswith("_std")
    )


def _format(rows: Iterable[dict[str, Any]], keys: Sequence[str]) -> NumberFormat:
    """One format for the values of ``keys`` in every row (one quantity)."""
    return number_format(r.get(k) for r in rows for k in keys)


def _cells(row: dict[str, Any], keys: Sequence[str], form: NumberFormat) -> list[str]:
    return [form.pm(row.get(k), row.get(f"{k}_std")) for k in keys]


# ------------------------------------------------------------------------------ summaries
def loss_table(rows: Sequence[dict[str, Any]]) -> Table:
    """Per method: mean, worst client and spread of the final personalised eval loss."""
    keys = ["personalised_loss_mean", "personalised_loss_worst", "personalised_loss_spread"]
    form = _format(rows, keys)
    return Table(
        "Personalised eval loss after the final round (lower is better)",
        ["method", "seeds", "mean over clients", "worst client", "spread (std over clients)"],
        [[r["method"], str(r["seeds"]), *_cells(r, keys, form)] for r in rows],
    )


def short_summary_table(rows: Sequence[dict[str, Any]]) -> Table:
    """What ``mira compare`` prints at the end: method, seeds, mean and worst client."""
    keys = ["personalised_loss_mean", "personalised_loss_worst"]
    form = _format(rows, keys)
    return Table(
        "Personalised eval loss after the final round (lower is better; mean ± std over seeds)",
        ["method", "seeds", "mean over clients", "worst client"],
        [[r["method"], str(r["seeds"]), *_cells(r, keys, form)] for r in rows],
    )


def summary_tables(
    rows: Sequence[dict[str, Any]], per_client: Sequence[dict[str, Any]]
) -> list[Table]:
    """The readable tables of a summary: losses, task metrics, mix weights, cost, then per
    client."""
    tables = [loss_table(rows)]
    task_losses = _task_columns(rows, "personalised_loss")
    if task_losses:
        tables.append(
            Table(
                "Personalised eval loss per task, mean over the task's clients",
                ["method", *(k[len("personalised_loss[") : -1] for k in task_losses)],
                [[r["method"], *_cells(r, task_losses, _format(rows, task_losses))] for r in rows],
            )
        )
    metric_columns = [c for m in summary_metric_names(rows) for c in [m, *_task_columns(rows, m)]]
    if metric_columns:
        tables.append(
            Table(
                "Personalised task metrics (higher is better): mean over clients, "
                "and per task as metric[task]",
                ["method", *metric_columns],
                [
                    [r["method"], *_cells(r, metric_columns, _format(rows, metric_columns))]
                    for r in rows
                ],
            )
        )
    mixing = [r for r in rows if r.get(MIX_WEIGHT) is not None]
    if mixing:
        columns = [MIX_WEIGHT, *_task_columns(mixing, MIX_WEIGHT)]
        tables.append(
            Table(
                "Mix weight after the final round: the share of its neighbours' adapters "
                "each client took",
                ["method", "all clients", *(c[len(MIX_WEIGHT) + 1 : -1] for c in columns[1:])],
                [[r["method"], *_cells(r, columns, _format(mixing, columns))] for r in mixing],
                note="Mean over clients (and per task, over the task's clients). 0 keeps the "
                "client's own adapter; 1 replaces it by its neighbours' weighted mean.",
            )
        )
    tables.append(cost_table(rows))
    if per_client:
        tables += per_client_tables(per_client)
    return tables


MB = 1e-6
"""1 MB = 10^6 bytes."""


def cost_table(rows: Sequence[dict[str, Any]]) -> Table:
    """Per method: the bytes its server rule exchanges per round, wall time, peak memory.

    A rule that exchanges nothing (local) shows 0; what mira's harness still moves for it
    (each adapter to the server and back, the server being where client state lives between
    rounds) is measured and named in the note, never shown as the rule's cost.
    """
    up, down = "exchanged_bytes_up_per_round", "exchanged_bytes_down_per_round"
    megabytes = number_format(_scaled(r.get(k), MB) for r in rows for k in (up, down))
    seconds, memory = _format(rows, ["wall_seconds"]), _format(rows, ["peak_memory_mb"])

    def mb(row: dict[str, Any], key: str) -> str:
        return megabytes.pm(_scaled(row.get(key), MB), _scaled(row.get(f"{key}_std"), MB))

    body = [
        [
            r["method"],
            mb(r, up),
            mb(r, down),
            *_cells(r, ["wall_seconds"], seconds),
            *_cells(r, ["peak_memory_mb"], memory),
        ]
        for r in rows
    ]
    note = (
        "Bytes are what each server rule exchanges in one round: the adapters sent by all "
        "clients (up) and to all clients (down), averaged over rounds; 1 MB = 10^6 bytes."
    )
    moved = number_format(
        _scaled(r.get(k), MB) for r in rows for k in ("bytes_up_per_round", "bytes_down_per_round")
    )
    for r in rows:
        if r.get(up) == 0 and (r.get("bytes_up_per_round") or r.get("bytes_down_per_round")):
            note += (
                f" {r['method']} exchanges nothing: every client could keep its own adapter. "
                "mira's harness still moves each adapter to the server and back every round "
                "(the server holds every client's state between rounds): "
                f"{moved(_scaled(r['bytes_up_per_round'], MB))} MB up and "
                f"{moved(_scaled(r.get('bytes_down_per_round'), MB))} MB down measured, "
                "not counted above."
            )
    note += (
        " Wall time is the run's start to end where a comparison recorded it "
        f"({RunLayout(Path()).run_info.name}), else "
        "the sum of its rounds' recorded seconds. Peak memory is the largest client process "
        "peak of the run."
    )
    return Table(
        "Cost",
        ["method", "MB up / round", "MB down / round", "wall time (s)", "peak memory (MB)"],
        body,
        note=note,
    )


def paired_table(runs: Sequence[RunRecord]) -> Table | None:
    """Each method against mira on the seeds both finished: the per-seed difference of the
    mean personalised eval loss (method - mira), its mean ± std over those seeds, the 95%
    Student's t-interval of that mean (:func:`mira.results.stats.t_interval`), and on how
    many seeds mira was lower. Seeds change the client splits as well, so a difference
    within one seed is the sharper comparison than two means over seeds."""
    means = {
        (r.method, r.seed): run_statistics(r)["personalised_loss_mean"]
        for r in runs
        if r.seed is not None
    }
    mine = {seed: v for (method, seed), v in means.items() if method == REFERENCE}
    others = unique(r.method for r in runs if r.method != REFERENCE)
    if not mine or not others:
        return None
    found = []
    for method in others:
        differences: list[float] = []
        for (name, seed), value in sorted(means.items(), key=lambda item: item[0][1]):
            reference = mine.get(seed)
            if name == method and value is not None and reference is not None:
                differences.append(value - reference)
        if differences:
            found.append((method, differences, *mean_std(differences), t_interval(differences)))
    if not found:
        return None
    form = number_format(
        v
        for _, differences, mean, _, interval in found
        for v in [*differences, mean, *(interval or ())]
    )
    body = [
        [
            method,
            str(len(differences)),
            form.pm(mean, std),
            "-" if interval is None else f"{form(interval[0])} to {form(interval[1])}",
            " ".join(form(d) for d in differences),
            f"{sum(d > 0 for d in differences)} of {len(differences)}",
        ]
        for method, differences, mean, std, interval in found
    ]
    return Table(
        f"Paired by seed: mean personalised eval loss of each method minus {REFERENCE}'s",
        [
            "method",
            "seeds",
            "difference",
            f"{CONFIDENCE:.0%} t-interval",
            "per seed",
            f"{REFERENCE} lower",
        ],
        body,
        note=f"Positive: {REFERENCE} reached the lower mean personalised eval loss on the same "
        "seed (same clients, splits, initialisation and data order). Difference: mean ± std "
        f"(ddof 1) over the seeds; t-interval: the {CONFIDENCE:.0%} confidence interval of "
        "that mean, mean ± t(n - 1) std / sqrt(n) with Student's t on n - 1 degrees of "
        "freedom ('-' with one seed). An interval that excludes 0 says the sign is not seed "
        "noise at that level.",
    )


def per_client_tables(per_client: Sequence[dict[str, Any]]) -> list[Table]:
    """Client x method tables of the final personalised loss, each task metric and the mix
    weight; each table one format (one quantity)."""
    methods = unique(r["method"] for r in per_client)
    clients = unique(r["client"] for r in per_client)
    task_of = {r["client"]: r["task"] for r in per_client}
    cell = {(r["method"], r["client"]): r for r in per_client}
    tables = []
    for name, title in [
        ("personalised_loss", "Per client: final personalised eval loss, mean over seeds"),
        *((m, f"Per client: final personalised {m}, mean over seeds") for m in TASK_METRICS),
        (MIX_WEIGHT, "Per client: mix weight in the final round, mean over seeds"),
    ]:
        shown = [c for c in clients if any(name in cell.get((m, c), {}) for m in methods)]
        if not shown:
            continue
        form = number_format(cell.get((m, c), {}).get(name) for c in shown for m in methods)
        tables.append(
            Table(
                title,
                ["client", "task", *methods],
                [
                    [c, task_of[c], *(form(cell.get((m, c), {}).get(name)) for m in methods)]
                    for c in shown
                ],
                numeric_from=2,
            )
        )
    return tables


# ------------------------------------------------------------------------------ one run
def final_client_table(rows: RunRows, adapters: Path | None, worst: int | None = None) -> Table:
    """Each client's personalised eval loss after the first and the last round (one column
    when they are the same round), its task metrics and mix weight after the last, and (with
    ``adapters``) its adapter's folder. Losses share one format, task metrics another.

    ``worst``: only that many clients, those of the highest final loss, highest first.
    """
    clients = rows.clients
    last = max(r.round for r in clients)
    start = min(r.round for r in clients)
    final = rows.clients_of(last)
    if worst is not None:
        final = sorted(final, key=lambda r: -_loss(r.eval_loss))[:worst]
    first = {r.client: r for r in rows.clients_of(start)}
    metrics = [m for m in TASK_METRICS if any(r.metrics.get(m) is not None for r in final)]
    mixing = any(r.mix_weight is not None for r in final)
    rounds = [start, last] if start != last else [last]
    losses = number_format(r.eval_loss for r in clients if r.round in rounds)
    scores = number_format(r.metrics.get(m) for r in final for m in metrics)
    mix = number_format(r.mix_weight for r in final)
    header = ["client", "task"]
    if adapters is not None:
        header.append("adapter")
    header += [f"loss, round {n}" for n in rounds]
    header += metrics
    if mixing:
        header.append("mix weight")
    body = []
    for r in final:
        cells = [str(r.client), str(r.task)]
        if adapters is not None:
            cells.append(str(adapters / r.client))
        if start != last:
            cells.append(losses(first[r.client].eval_loss))
        cells.append(losses(r.eval_loss))
        cells += [scores(r.metrics.get(m)) for m in metrics]
        if mixing:
            cells.append(mix(r.mix_weight))
        body.append(cells)
    return Table(
        f"Personalised eval loss after round {last} "
        "(each client's own adapter on its own held-out split)"
        + ("" if worst is None else f": the {len(final)} clients of the highest loss"),
        header,
        body,
        note="Task metrics are personalised too ('-': not a metric of that client's task)."
        + (
            " Mix weight: the share of its neighbours' adapters the client took in the last round."
            if mixing
            else ""
        ),
        numeric_from=3 if adapters is not None else 2,
    )


def _loss(loss: float | None) -> float:
    """A loss for ranking clients: a missing or NaN one ranks as the lowest."""
    return -math.inf if loss is None or math.isnan(loss) else loss


def task_table(rows: RunRows) -> Table:
    """Per task after the last round: its clients, the mean and the worst client of their
    personalised eval loss, the mean of each task metric, and the mean mix weight."""
    final = rows.final_clients()
    tasks = unique(r.task for r in final)
    metrics = [m for m in TASK_METRICS if any(r.metrics.get(m) is not None for r in final)]
    mixing = any(r.mix_weight is not None for r in final)

    def mean(values: Iterable[float | None]) -> float | None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        return float(np.mean(finite)) if finite else None

    found = []
    for task in tasks:
        mine = [r for r in final if r.task == task]
        worst = max(mine, key=lambda r: _loss(r.eval_loss))
        found.append(
            (
                task,
                len(mine),
                mean(r.eval_loss for r in mine),
                worst,
                [mean(r.metrics.get(m) for r in mine) for m in metrics],
                mean(r.mix_weight for r in mine),
            )
        )
    losses = number_format(v for f in found for v in (f[2], f[3].eval_loss))
    scores = number_format(v for f in found for v in f[4])
    mix = number_format(f[5] for f in found)
    header = ["task", "worst client", "clients", "mean loss", "worst loss", *metrics]
    if mixing:
        header.append("mix weight (mean)")
    body = []
    for task, count, loss, worst, means, weight in found:
        cells = [task, str(worst.client), str(count), losses(loss), losses(worst.eval_loss)]
        cells += [scores(v) for v in means]
        if mixing:
            cells.append(mix(weight))
        body.append(cells)
    last = max(r.round for r in final) if final else 0
    return Table(
        f"Per task after round {last}: personalised eval loss and task metrics over its clients",
        header,
        body,
        note="Means over the task's clients of each client's own adapter on its own held-out "
        "split; the worst client is the one of the highest loss.",
        numeric_from=2,
    )


# ------------------------------------------------------------------------------ per round
def round_table(run: RunRecord) -> Table:
    """One run, per round: the personalised eval loss over clients, train loss, mix weight."""
    rounds = run.rows.rounds
    clients = run.rows.clients
    mixing = any(r.mix_weight is not None for r in clients)

    def mean_mix(number: int) -> float | None:
        values = [r.mix_weight for r in clients if r.round == number and r.mix_weight is not None]
        return float(np.mean(values)) if values else None

    def round_losses(row: RoundRow) -> list[float | None]:
        return [
            row.personalised_eval_loss_mean,
            row.personalised_eval_loss_worst,
            row.personalised_eval_loss_std,
            row.train_loss_mean,
        ]

    losses = number_format(v for r in rounds for v in round_losses(r))
    seconds = number_format(r.seconds for r in rounds)
    mixes = {r.round: mean_mix(r.round) for r in rounds}
    mix = number_format(mixes.values())
    header = ["round", "mean", "worst", "spread (std)", "train loss", "seconds"]
    if mixing:
        header.append("mix weight (mean)")
    body = []
    for r in rounds:
        cells = [str(r.round), *(losses(v) for v in round_losses(r)), seconds(r.seconds)]
        if mixing:
            cells.append(mix(mixes[r.round]))
        body.append(cells)
    return Table(
        "Per round: personalised eval loss over clients, and mean train loss",
        header,
        body,
        note="Mean, worst and spread are over clients of each client's personalised eval "
        "loss after that round's server rule."
        + (" Mix weight: the mean share taken from neighbours that round." if mixing else ""),
    )


def mean_curve_table(runs: Sequence[RunRecord]) -> Table:
    """The numbers of ``mean_loss.png``: per round and method, each seed's mean over clients."""
    curves = mean_curves(runs)
    rounds = sorted({int(r) for method_rounds, _, _ in curves.values() for r in method_rounds})
    seeds = {method: [run.seed for run in runs if run.method == method] for method in curves}
    form = number_format(float(v) for _, _, matrix in curves.values() for v in matrix.flat)
    rows = []
    for rnd in rounds:
        cells = [str(rnd)]
        for method_rounds, _, matrix in curves.values():
            where = np.flatnonzero(method_rounds == rnd)
            column = matrix[:, where[0]] if where.size else np.full(matrix.shape[0], math.nan)
            cells.append(" ".join(form(float(v)) for v in column))
        rows.append(cells)
    seed_lists = "; ".join(
        f"{method}: {', '.join(str(s) for s in seeds[method])}" for method in curves
    )
    return Table(
        "Per round: mean personalised eval loss over clients, one value per seed",
        ["round", *curves],
        rows,
        note=f"Seeds in each cell, in order: {seed_lists}. These are the lines of "
        f"{ReportFiles(Path()).mean_loss_plot.name}.",
    )
