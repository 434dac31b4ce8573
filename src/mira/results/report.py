"""``mira report DIR`` and the comparison summary files: what a run or a comparison shows.

DIR is either one run (``metrics.jsonl`` at its top, see :mod:`mira.results.rundir`) or a
comparison (``runs/<method>/seed-<s>/``, see :mod:`mira.results.runs`). The report is a list
of blocks (:mod:`mira.results.document`) written as ``report.md`` (plots linked from
``plots/``) and ``report.html`` (one self-contained page, plots embedded). ``comparison.md``
is the same comparison blocks without the plots, so the two never disagree.

Plots (``plots/``):

* ``client_loss.png``: each client's personalised eval loss per round, one panel per method,
  one line per client coloured by task (mean over seeds).
* ``mean_loss.png``: mean personalised eval loss over clients per round, one line per method;
  with several seeds, the band is their min-max.
* ``mix_weight.png`` (when the runs record it): each client's mix weight alpha per round, the
  share of its neighbours' adapters it took; a single run has one panel per task, a
  comparison one panel per run of rule ``mira`` or a variant of it.
* ``task_graph.png``: the task graph from graph.json, ordered by cluster.
* ``per_task.png``: final personalised eval loss and task metrics per task, as dots on axes
  zoomed to the values (a comparison: one dot per method, ± std over seeds; a single run: one
  dot per client, dashed line at the task's mean). A task only gets panels for its metrics.

Many clients: a panel of more than 20 clients draws each task's median client and the band
from its lowest to its highest client (:func:`mira.results.plots.plot_client_lines`); a task
of more than 20 clients shows the quantiles of its clients in ``per_task.png``; the task graph
of more than 40 clients names its clusters; ``mira run``'s closing table of more than 24
clients shows each task and the 10 clients of the highest loss (report.md lists every client).

Every loss and metric is personalised (each client's own adapter on its own held-out split),
and the report says so; under fedit and cluster-merge that adapter is the shared global model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mira.results import plots
from mira.results.document import (
    Block,
    Code,
    Figure,
    Heading,
    Paragraph,
    Table,
    fmt,
    markdown_table,
    render_html,
    render_markdown,
)
from mira.results.errors import ReportError
from mira.results.files import write_atomic, write_csv
from mira.results.rundir import read_metrics
from mira.results.runs import collect_runs, load_run, read_manifest, rule_of
from mira.results.schema import ComparisonLayout, ReportFiles, RunLayout, RunRecord
from mira.results.stats import (
    client_curves,
    eval_loss,
    mean_curves,
    metric_names,
    mix_weight,
    per_task_values,
    summarise_runs,
    summary_metric_names,
    unique,
    value,
)
from mira.results.tables import (
    PERSONALISED_NOTE,
    final_client_table,
    mean_curve_table,
    paired_table,
    round_table,
    summary_tables,
    task_table,
)

MAX_PRINTED = 24
"""``mira run``'s closing table lists every client up to this many (:func:`final_table`)."""
WORST_PRINTED = 10
"""Beyond, it lists this many: the clients of the highest loss."""

MIX_RULE = "mira"
"""Runs of this rule (and its variants) get the mix weight plot in a comparison."""


# ------------------------------------------------------------------------------ plots
def _task_of(runs: Sequence[RunRecord]) -> dict[str, str]:
    return {r.client: r.task for run in runs for r in run.rows.clients}


def _graph_source(runs: Sequence[RunRecord]) -> RunRecord | None:
    with_graph = [r for r in runs if RunLayout(r.folder).graph.is_file()]
    preferred = [r for r in with_graph if rule_of(r.method) == MIX_RULE]
    candidates = preferred or with_graph
    return candidates[0] if candidates else None


def _comparison_dots(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[plots.DotPanel]]]:
    """Per task: a panel per metric it has, one dot per method (± std over seeds)."""
    methods = [r["method"] for r in rows]
    colours = plots.method_colours(methods)
    by_task: dict[str, list[plots.DotPanel]] = {}
    panels = [("personalised_loss", "personalised eval loss", True)]
    panels += [(m, f"personalised {m}", False) for m in summary_metric_names(rows)]
    for prefix, title, lower in panels:
        tasks, values = per_task_values(rows, prefix)
        for k, task in enumerate(tasks):
            means = [values[m][0][k] for m in methods]
            if all(math.isnan(v) for v in means):
                continue
            by_task.setdefault(task, []).append(
                plots.DotPanel(
                    title,
                    methods,
                    means,
                    [values[m][1][k] for m in methods],
                    [colours[m] for m in methods],
                    lower,
                )
            )
    return list(by_task.items())


MAX_DOTS = 20
"""A task of a single run's per-task plot shows one dot per client up to this many clients,
else the quantiles of its clients (:data:`QUANTILES`)."""
QUANTILES = (
    ("highest", 100.0),
    ("75th percentile", 75.0),
    ("median", 50.0),
    ("25th percentile", 25.0),
    ("lowest", 0.0),
)
"""The dots of a task of more than :data:`MAX_DOTS` clients, top to bottom."""
QUANTILE_LABELS = [label for label, _ in QUANTILES]


def _single_run_dots(run: RunRecord) -> list[tuple[str, list[plots.DotPanel]]]:
    """Per task: a panel per metric it has, one dot per client, dashed at the task's mean; a
    task of more than :data:`MAX_DOTS` clients gets the quantiles of its clients instead, so
    the figure keeps its size whatever the number of clients."""
    final = run.rows.final_clients()
    tasks = unique(r.task for r in final)
    colour = plots.palette(tasks)
    out = []
    for task in tasks:
        mine = [r for r in final if r.task == task]
        many = len(mine) > MAX_DOTS
        labels = QUANTILE_LABELS if many else [str(r.client) for r in mine]
        panels = []
        measured = [("personalised eval loss", True, [eval_loss(r) for r in mine])]
        measured += [
            (f"personalised {m}", False, [value(r.metrics.get(m)) for r in mine])
            for m in metric_names(mine)
        ]
        for title, lower, values in measured:
            finite = [v for v in values if math.isfinite(v)]
            if not finite:
                continue
            if many:
                values = [float(np.percentile(finite, q)) for _, q in QUANTILES]
            panels.append(
                plots.DotPanel(
                    title,
                    labels,
                    values,
                    [math.nan] * len(labels),
                    [colour[task]] * len(labels),
                    lower,
                    reference=float(np.mean(finite)),
                )
            )
        if panels:
            out.append((f"{task} ({len(mine)} clients)" if many else task, panels))
    return out


def _lines(panels: Any) -> str:
    """How :func:`plots.plot_client_lines` draws the clients of ``panels``, for a caption."""
    if not plots.summarised(panels):
        return "one line per client"
    return (
        f"one line per client; a panel of more than {plots.MAX_LINES} clients draws, per task, "
        "the median client's line and the band from the lowest to the highest client"
    )


def _mix_weight_figure(
    runs: Sequence[RunRecord], files: ReportFiles, single: bool
) -> Figure | None:
    path = files.mix_weight_plot
    task_of = _task_of(runs)
    if single:
        curves = client_curves(runs, mix_weight)
        if not curves:
            return None
        mine = next(iter(curves.values()))
        panels = {
            task: {c: curve for c, curve in mine.items() if task_of[c] == task}
            for task in unique(task_of[c] for c in mine)
        }
        plots.plot_client_lines(
            panels,
            task_of,
            path,
            ylabel="mix weight alpha",
            title="Mix weight alpha of each client per round, one panel per task "
            "(0 = keeps its own adapter, 1 = takes its neighbours' mean)",
            ylim=(-0.03, 1.03),
            colour_clients=True,
        )
        return Figure(
            path,
            files.link(path),
            "Mix weight alpha of every client per round: the share of its neighbours' adapters "
            f"it took after local training (one panel per task, {_lines(panels)}).",
        )
    mixing = [r for r in runs if rule_of(r.method) == MIX_RULE]
    curves = client_curves(mixing, mix_weight)
    if not curves:
        return None
    plots.plot_client_lines(
        curves,
        task_of,
        path,
        ylabel="mix weight alpha",
        title=f"Mix weight alpha of each client per round, runs of rule {MIX_RULE} "
        "(mean over seeds)",
        ylim=(-0.03, 1.03),
    )
    return Figure(
        path,
        files.link(path),
        f"Mix weight alpha of every client per round in the runs of rule {MIX_RULE} and its "
        "variants: the share of its neighbours' adapters it took (one panel per method, "
        f"colour = task, mean over seeds; {_lines(curves)}).",
    )


def _figures(
    runs: Sequence[RunRecord], rows: Sequence[dict[str, Any]], out_dir: Path, single: bool
) -> list[Figure]:
    files = ReportFiles(out_dir)
    task_of = _task_of(runs)
    figures = []
    losses = client_curves(runs)
    plots.plot_client_lines(
        losses,
        task_of,
        files.client_loss_plot,
        ylabel="personalised eval loss",
        title="Personalised eval loss of each client (own adapter, own held-out split)",
    )
    figures.append(
        Figure(
            files.client_loss_plot,
            files.link(files.client_loss_plot),
            "Personalised eval loss of every client per round (one panel per method, colour = "
            "task" + ("" if single else ", mean over seeds") + "; "
            f"{_lines(losses)}).",
        )
    )
    curves = mean_curves(runs)
    plots.plot_mean_curves(curves, files.mean_loss_plot)
    several = any(matrix.shape[0] > 1 for _, _, matrix in curves.values())
    figures.append(
        Figure(
            files.mean_loss_plot,
            files.link(files.mean_loss_plot),
            "Mean personalised eval loss over clients per round"
            + (" (line: mean over seeds; band: min to max over seeds)." if several else "."),
        )
    )
    mixing = _mix_weight_figure(runs, files, single)
    if mixing is not None:
        figures.append(mixing)
    source = _graph_source(runs)
    if source is not None:
        plots.plot_adjacency(*_graph(RunLayout(source.folder).graph), files.task_graph_plot)
        where = "this run" if source.folder == out_dir else source.folder.relative_to(out_dir)
        figures.append(
            Figure(
                files.task_graph_plot,
                files.link(files.task_graph_plot),
                f"Task graph a_kl used by the server (from {where}), clients ordered by cluster.",
            )
        )
    dots = _single_run_dots(runs[0]) if single else _comparison_dots(rows)
    if dots:
        quantiles = (
            f"; a task of more than {MAX_DOTS} clients: the quantiles of its clients"
            if single and any(panels[0].labels == QUANTILE_LABELS for _, panels in dots)
            else ""
        )
        plots.plot_dot_grid(
            dots,
            files.per_task_plot,
            "Final round, personalised, per task: "
            + (
                f"one dot per client, dashed line at the task's mean{quantiles}"
                if single
                else "mean over the task's clients, one dot per method (bar: ± std over seeds)"
            ),
        )
        figures.append(
            Figure(
                files.per_task_plot,
                files.link(files.per_task_plot),
                "Final personalised eval loss and task metrics per task "
                + (
                    f"for every client (dashed: the task's mean{quantiles}). "
                    if single
                    else "and method (error bars: ± std over seeds). "
                )
                + "A dot plot: each panel's axis is zoomed to its own values (spanning at least "
                "2% of them, so equal values sit side by side) and does not start at 0, so "
                "compare positions within a panel and read the printed values across panels.",
            )
        )
    return figures


def _graph(path: Path) -> tuple[np.ndarray, list[str], list[int] | None]:
    try:
        graph = json.loads(path.read_text())
        return (
            np.asarray(graph["adjacency"], dtype=np.float64),
            list(graph["clients"]),
            graph.get("clusters"),
        )
    except (ValueError, KeyError) as err:
        raise ReportError(f"{path} is not a readable task graph ({err})") from None


# ------------------------------------------------------------------------------ documents
def comparison_blocks(
    title: str,
    runs: Sequence[RunRecord],
    incomplete: Sequence[Path],
    out_dir: Path,
) -> list[Block]:
    """What ``comparison.md`` and the comparison report share: how it was run, how to read
    it, and every table."""
    rows, per_client = summarise_runs(runs)
    commands = [c["command"] for c in read_manifest(out_dir).get("commands", [])]
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    blocks: list[Block] = [
        Heading(title, 1),
        Paragraph(
            f"Methods: {', '.join(r['method'] for r in rows)}. Seeds: "
            f"{', '.join(map(str, seeds))} (`federation.seed`; the seeds column gives how many "
            "finished runs each row averages)."
        ),
        Paragraph(
            "All methods ran from the same config, so they share clients, data splits, the "
            "LoRA initialisation and the data order; only `server.method`, `federation.seed` "
            "and a variant's own overrides (after '@' in its name) vary."
        ),
        Paragraph(PERSONALISED_NOTE),
        Paragraph(
            "Cells are mean ± std over seeds (sample std, ddof 1; no ± with one seed). Spread "
            "is the std of the personalised eval loss across clients within one run."
        ),
    ]
    if incomplete:
        blocks.append(
            Paragraph("Not finished, left out of every table: " + ", ".join(map(str, incomplete)))
        )
    if commands:
        blocks += [
            Paragraph("Command line" + ("s (in order):" if len(commands) > 1 else ":")),
            Code(tuple(commands)),
        ]
    tables: list[Table] = summary_tables(rows, per_client)
    paired = paired_table(runs)
    if paired is not None:
        tables.insert(1, paired)
    return blocks + tables


def write_comparison(out_dir: Path) -> Path:
    """Write comparison.csv, comparison_clients.csv and comparison.md; return the .md path."""
    out_dir = Path(out_dir)
    layout = ComparisonLayout(out_dir)
    complete, incomplete = collect_runs(out_dir)
    rows, per_client = summarise_runs(complete)
    write_csv(layout.summary_csv, rows)
    write_csv(layout.clients_csv, per_client)
    title = f"Comparison: {', '.join(r['method'] for r in rows) or 'no finished runs'}"
    path = layout.summary_md
    write_atomic(path, render_markdown(comparison_blocks(title, complete, incomplete, out_dir)))
    return path


def _single_run_blocks(out_dir: Path) -> list[Block]:
    run = load_run(out_dir)
    layout = RunLayout(out_dir)
    clients = run.rows.clients
    if not clients:
        raise ReportError(f"{layout.metrics} holds no completed round")
    rows, _ = summarise_runs([run])
    rounds = max(r.round for r in clients)
    names = unique(r.client for r in clients)
    has_adapters = all(layout.adapter(name).dir.is_dir() for name in names)
    return [
        Heading(f"mira report: {out_dir.name}", 1),
        Paragraph(
            f"One run of method `{run.method}`"
            + (f", seed {run.seed}" if run.seed is not None else "")
            + f": {len(names)} clients, {rounds} rounds recorded. Directory: `{out_dir}`."
        ),
        Paragraph(PERSONALISED_NOTE),
        final_client_table(
            run.rows, layout.adapters.relative_to(out_dir) if has_adapters else None
        ),
        round_table(run),
        *summary_tables(rows, []),
        Heading("Plots"),
        *_figures([run], rows, out_dir, single=True),
    ]


def _comparison_report_blocks(out_dir: Path) -> list[Block]:
    runs, incomplete = collect_runs(out_dir)
    if not runs:
        where = ComparisonLayout(out_dir).run_pattern
        raise ReportError(f"{out_dir} holds no finished run under {where}/")
    rows, _ = summarise_runs(runs)
    return [
        *comparison_blocks(f"mira report: comparison {out_dir.name}", runs, incomplete, out_dir),
        mean_curve_table(runs),
        Heading("Plots"),
        *_figures(runs, rows, out_dir, single=False),
    ]


def final_table(out_dir: Path) -> str:
    """What ``mira run`` prints at its end: each client's personalised eval loss after the
    first and the last round (:func:`mira.results.tables.final_client_table`), the round's
    mean, worst and spread, and where the adapters are, as aligned text for the terminal.

    A run of more than :data:`MAX_PRINTED` clients prints the per-task table
    (:func:`mira.results.tables.task_table`) and its :data:`WORST_PRINTED` clients of the
    highest loss instead; report.md has every client."""
    rows = read_metrics(out_dir)
    last = rows.last_round()
    if last is None:
        return "no rounds completed"
    count = len(rows.clients_of(last))
    if count <= MAX_PRINTED:
        table = final_client_table(rows, None)
        lines = [table.title, markdown_table(table)]
    else:
        by_task = task_table(rows)
        worst = final_client_table(rows, None, worst=WORST_PRINTED)
        lines = [by_task.title, markdown_table(by_task), "", worst.title, markdown_table(worst)]
        lines.append(f"every one of the {count} clients: {ReportFiles(out_dir).report_md}")
    aggregate = rows.round_row(last)
    return "\n".join(
        [
            *lines,
            f"mean {fmt(aggregate and aggregate.personalised_eval_loss_mean)}  "
            f"worst {fmt(aggregate and aggregate.personalised_eval_loss_worst)}  "
            f"std {fmt(aggregate and aggregate.personalised_eval_loss_std)}  "
            f"(method {aggregate.method if aggregate else '?'})",
            f"each client's adapter: {RunLayout(out_dir).adapters}/<client>/ "
            "(peft.PeftModel.from_pretrained(base, path) loads it)",
        ]
    )


def write_report(out_dir: Path) -> Path:
    """Write report.md, report.html and plots/*.png into ``out_dir``; return report.md's path.

    ``out_dir`` is one run (metrics.jsonl at the top) or a comparison (runs/ at the top).
    """
    out_dir = Path(out_dir)
    run, comparison = RunLayout(out_dir), ComparisonLayout(out_dir)
    if run.metrics.is_file():
        blocks = _single_run_blocks(out_dir)
    elif comparison.runs.is_dir():
        blocks = _comparison_report_blocks(out_dir)
    else:
        raise ReportError(
            f"{out_dir} is neither a run directory ({run.metrics.name}) nor a comparison "
            f"({comparison.runs.name}/)"
        )
    title = next(b.text for b in blocks if isinstance(b, Heading))
    files = ReportFiles(out_dir)
    markdown = write_atomic(files.report_md, render_markdown(blocks))
    write_atomic(files.report_html, render_html(blocks, title))
    return markdown
