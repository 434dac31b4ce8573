"""``mira report DIR``: plots and a readable report of a run or a comparison directory.

Writes ``report.md`` and ``report.html`` (self-contained apart from the PNG files in
``plots/`` next to them). DIR is either one run (``metrics.jsonl`` at its top, see
:mod:`mira.results.rundir`) or a comparison (``runs/<method>/seed-<s>/``, see
:mod:`mira.experiments.compare`).

Plots:

* ``client_loss.png``: each client's personalised eval loss per round, one panel per method,
  one line per client coloured by task (mean over seeds).
* ``mean_loss.png``: mean personalised eval loss over clients per round, one line per method;
  the band is the min-max over seeds when there are several.
* ``task_graph.png``: the task graph from graph.json, ordered by cluster.
* ``per_task.png``: final personalised eval loss and task metrics per task and method.

Every loss and metric is personalised (each client's own adapter on its own held-out split),
and the report says so; under fedit and cluster-merge that adapter is the shared global model.
Figures are drawn on their own Agg canvas, never through pyplot's global state, so reports can
be written from any thread or a long-lived process.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mira.config import METHODS
from mira.experiments.compare import (
    MANIFEST,
    PERSONALISED_NOTE,
    RunRecord,
    Table,
    collect_runs,
    fmt,
    load_run,
    markdown_table,
    metric_names,
    summarise_runs,
    summary_tables,
)
from mira.results.plots import plot_adjacency
from mira.results.rundir import final_table

PLOTS = "plots"


class ReportError(ValueError):
    """The directory is neither a run nor a comparison, or holds no finished round."""


# ------------------------------------------------------------------------------ blocks
@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """Plain text; `backticks` mark code in both renderings."""

    text: str


@dataclass(frozen=True)
class Preformatted:
    text: str


@dataclass(frozen=True)
class Image:
    """A PNG, by its path relative to the report."""

    path: str
    caption: str


Block = Heading | Paragraph | Preformatted | Table | Image


def render_markdown(blocks: Sequence[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Preformatted):
            parts.append("```text\n" + block.text + "\n```")
        elif isinstance(block, Table):
            parts.append(f"**{block.title}**\n\n{markdown_table(block)}")
            if block.note:
                parts.append(block.note)
        else:
            parts.append(f"![{block.caption}]({block.path})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


_CODE = re.compile(r"`([^`]+)`")
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { font-weight: 600; text-align: left; padding-bottom: 0.3rem; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; }
figcaption { font-style: italic; color: #555; }
"""


def _inline(text: str) -> str:
    return _CODE.sub(r"<code>\1</code>", html.escape(text))


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{html.escape(c)}</td>'
            if i >= table.numeric_from
            else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>\n"
        for row in table.rows
    )
    note = f"<p>{_inline(table.note)}</p>" if table.note else ""
    return (
        f"<table><caption>{html.escape(table.title)}</caption>\n<thead><tr>{head}</tr></thead>\n"
        f"<tbody>\n{body}</tbody></table>{note}"
    )


def render_html(blocks: Sequence[Block], title: str) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Preformatted):
            parts.append(f"<pre>{html.escape(block.text)}</pre>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        else:
            caption = html.escape(block.caption)
            parts.append(
                f'<figure><img src="{html.escape(block.path)}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )


# ------------------------------------------------------------------------------ curves
Curve = tuple[np.ndarray, np.ndarray]
"""(rounds, values), rounds ascending."""


def _client_losses(run: RunRecord) -> dict[tuple[str, int], float]:
    return {
        (r["client"], int(r["round"])): (math.nan if r.get("eval_loss") is None else r["eval_loss"])
        for r in run.rows
        if r.get("kind") == "client"
    }


def client_curves(runs: Sequence[RunRecord]) -> dict[str, dict[str, Curve]]:
    """method -> client -> personalised eval loss per round, mean over the method's seeds."""
    out: dict[str, dict[str, Curve]] = {}
    for method in dict.fromkeys(r.method for r in runs):
        samples: dict[tuple[str, int], list[float]] = {}
        for run in (r for r in runs if r.method == method):
            for key, loss in _client_losses(run).items():
                samples.setdefault(key, []).append(loss)
        curves: dict[str, Curve] = {}
        for client in dict.fromkeys(c for c, _ in samples):
            rounds = sorted(r for c, r in samples if c == client)
            values = [float(np.mean(samples[(client, r)])) for r in rounds]
            curves[client] = (np.array(rounds), np.array(values))
        out[method] = curves
    return out


def mean_curves(runs: Sequence[RunRecord]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """method -> (rounds, mean over seeds, seeds x rounds matrix).

    Each matrix row is one seed's mean personalised eval loss over clients per round; the plot
    draws the mean over seeds and shades the min-max of the matrix columns.
    """
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for method in dict.fromkeys(r.method for r in runs):
        per_seed = []
        for run in (r for r in runs if r.method == method):
            by_round: dict[int, list[float]] = {}
            for (_, rnd), loss in _client_losses(run).items():
                by_round.setdefault(rnd, []).append(loss)
            per_seed.append({rnd: float(np.mean(v)) for rnd, v in by_round.items()})
        rounds = np.array(sorted({rnd for seed in per_seed for rnd in seed}))
        matrix = np.array([[seed.get(int(rnd), math.nan) for rnd in rounds] for seed in per_seed])
        out[method] = (rounds, matrix.mean(axis=0), matrix)
    return out


# ------------------------------------------------------------------------------ plots
def _figure(width: float, height: float) -> Any:
    # A Figure with its own Agg canvas: no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _integer_rounds(ax: Any, rounds: Sequence[int]) -> None:
    """Rounds are whole numbers: tick each one when there are few, else integer ticks."""
    from matplotlib.ticker import MaxNLocator

    if len(rounds) <= 12:
        ax.set_xticks(sorted(rounds))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _palette(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _method_colours(methods: Sequence[str]) -> dict[str, Any]:
    # Fixed per method, so a method has the same colour in every plot and every report.
    ordered = list(METHODS) + [m for m in methods if m not in METHODS]
    palette = _palette(ordered)
    return {m: palette[m] for m in methods}


def plot_client_curves(
    curves: dict[str, dict[str, Curve]], task_of: dict[str, str], path: Path
) -> Path:
    """One panel per method, one line per client, coloured by its task."""
    from matplotlib.lines import Line2D

    methods = list(curves)
    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    figure = _figure(max(6.0, 4.6 * cols), 3.4 * rows + 0.6)
    tasks = list(dict.fromkeys(task_of.values()))
    colour = _palette(tasks)
    num_clients = max(len(c) for c in curves.values())
    alpha = 0.85 if num_clients <= 20 else max(0.1, 20 / num_clients)
    axes = figure.subplots(rows, cols, squeeze=False, sharey=True)
    for index, method in enumerate(methods):
        ax = axes[index // cols][index % cols]
        for client, (rounds, losses) in curves[method].items():
            ax.plot(rounds, losses, color=colour[task_of[client]], alpha=alpha, marker=".")
        ax.set_title(method)
        ax.set_xlabel("round")
        _integer_rounds(ax, sorted({int(r) for c in curves[method].values() for r in c[0]}))
        ax.grid(alpha=0.3)
        if index % cols == 0:
            ax.set_ylabel("personalised eval loss")
    for index in range(len(methods), rows * cols):
        axes[index // cols][index % cols].set_visible(False)
    handles = [Line2D([], [], color=colour[t], label=t) for t in tasks]
    figure.legend(handles=handles, title="task", loc="outside right upper")
    # Wrapped: a single panel is narrower than the one-line title.
    figure.suptitle("Personalised eval loss of each client\n(own adapter, own held-out split)")
    return _save(figure, path)


def plot_mean_curves(
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path
) -> Path:
    """Mean over clients per round, one line per method, min-max band over seeds."""
    figure = _figure(6.4, 4.2)
    ax = figure.add_subplot()
    colours = _method_colours(list(curves))
    for method, (rounds, mean, matrix) in curves.items():
        seeds = matrix.shape[0]
        label = method if seeds == 1 else f"{method} ({seeds} seeds)"
        ax.plot(rounds, mean, color=colours[method], marker="o", label=label)
        if seeds > 1:
            ax.fill_between(
                rounds, matrix.min(axis=0), matrix.max(axis=0), color=colours[method], alpha=0.2
            )
    ax.set_xlabel("round")
    _integer_rounds(ax, sorted({int(r) for c in curves.values() for r in c[0]}))
    ax.set_ylabel("mean personalised eval loss")
    ax.set_title("Mean personalised eval loss over clients (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(figure, path)


def per_task_values(
    rows: Sequence[dict[str, Any]], prefix: str
) -> tuple[list[str], dict[str, tuple[list[float], list[float]]]]:
    """Tasks with ``prefix[task]`` columns, and per method the means and stds (NaN if absent)."""
    tasks = list(
        dict.fromkeys(
            k[len(prefix) + 1 : -1]
            for r in rows
            for k in r
            if k.startswith(prefix + "[") and not k.endswith("_std")
        )
    )

    def number(value: Any) -> float:
        return math.nan if value is None else float(value)

    values = {
        r["method"]: (
            [number(r.get(f"{prefix}[{t}]")) for t in tasks],
            [number(r.get(f"{prefix}[{t}]_std")) for t in tasks],
        )
        for r in rows
    }
    return tasks, values


def plot_task_bars(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Grouped bars per task: final personalised loss, then each task metric present.

    Error bars are the std over seeds where there are several.
    """
    panels = [("personalised_loss", "personalised eval loss (lower is better)")]
    panels += [(m, f"personalised {m} (higher is better)") for m in metric_names(rows)]
    figure = _figure(max(5.0, 4.6 * len(panels)), 3.8)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    methods = [r["method"] for r in rows]
    colours = _method_colours(methods)
    for ax, (prefix, label) in zip(axes, panels, strict=True):
        tasks, values = per_task_values(rows, prefix)
        width = 0.8 / max(1, len(methods))
        x = np.arange(len(tasks))
        for i, method in enumerate(methods):
            means, stds = values[method]
            errors = None if all(math.isnan(s) for s in stds) else np.nan_to_num(stds)
            ax.bar(
                x + (i - (len(methods) - 1) / 2) * width,
                means,
                width,
                yerr=errors,
                color=colours[method],
                label=method,
                capsize=3,
            )
        ax.set_xticks(x, tasks, rotation=20)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Final round, mean over each task's clients")
    return _save(figure, path)


def plot_task_graph(graph_path: Path, path: Path) -> Path:
    """The adjacency of graph.json ordered by cluster (``mira.graph.plot_adjacency``)."""
    graph = json.loads(graph_path.read_text())
    return plot_adjacency(
        np.asarray(graph["adjacency"], dtype=np.float64),
        graph["clients"],
        graph.get("clusters"),
        path,
    )


# ------------------------------------------------------------------------------ report
def _round_table(run: RunRecord) -> Table:
    rounds = [r for r in run.rows if r.get("kind") == "round"]
    return Table(
        "Per round: personalised eval loss over clients, and mean train loss",
        ["round", "mean", "worst", "spread (std)", "train loss", "seconds"],
        [
            [
                str(r["round"]),
                fmt(r.get("personalised_eval_loss_mean")),
                fmt(r.get("personalised_eval_loss_worst")),
                fmt(r.get("personalised_eval_loss_std")),
                fmt(r.get("train_loss_mean")),
                fmt(r.get("seconds")),
            ]
            for r in rounds
        ],
    )


def mean_curve_table(runs: Sequence[RunRecord]) -> Table:
    """The numbers of ``mean_loss.png``: per round and method, each seed's mean over clients."""
    curves = mean_curves(runs)
    rounds = sorted({int(r) for method_rounds, _, _ in curves.values() for r in method_rounds})
    seeds = {method: [run.seed for run in runs if run.method == method] for method in curves}
    rows = []
    for rnd in rounds:
        cells = [str(rnd)]
        for method_rounds, _, matrix in curves.values():
            where = np.flatnonzero(method_rounds == rnd)
            column = matrix[:, where[0]] if where.size else np.full(matrix.shape[0], math.nan)
            cells.append(" ".join(fmt(float(v)) for v in column))
        rows.append(cells)
    seed_lists = "; ".join(
        f"{method}: {', '.join(str(s) for s in seeds[method])}" for method in curves
    )
    return Table(
        "Per round: mean personalised eval loss over clients, one value per seed",
        ["round", *curves],
        rows,
        note=f"Seeds in each cell, in order: {seed_lists}. These are the lines of mean_loss.png.",
    )


def _graph_source(runs: Sequence[RunRecord]) -> RunRecord | None:
    with_graph = [r for r in runs if (r.folder / "graph.json").is_file()]
    preferred = [r for r in with_graph if r.method == "mira"]
    candidates = preferred or with_graph
    return candidates[0] if candidates else None


def _plots(runs: Sequence[RunRecord], rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Image]:
    plots = out_dir / PLOTS
    task_of = {
        r["client"]: r["task"] for run in runs for r in run.rows if r.get("kind") == "client"
    }
    images = []
    plot_client_curves(client_curves(runs), task_of, plots / "client_loss.png")
    images.append(
        Image(
            f"{PLOTS}/client_loss.png",
            "Personalised eval loss of every client per round (one panel per method, colour = "
            "task, mean over seeds).",
        )
    )
    plot_mean_curves(mean_curves(runs), plots / "mean_loss.png")
    images.append(
        Image(
            f"{PLOTS}/mean_loss.png",
            "Mean personalised eval loss over clients per round (band: min-max over seeds).",
        )
    )
    source = _graph_source(runs)
    if source is not None:
        plot_task_graph(source.folder / "graph.json", plots / "task_graph.png")
        where = source.folder.relative_to(out_dir) if source.folder != out_dir else "this run"
        images.append(
            Image(
                f"{PLOTS}/task_graph.png",
                f"Task graph a_kl used by the server (from {where}), clients ordered by cluster.",
            )
        )
    plot_task_bars(rows, plots / "per_task.png")
    images.append(
        Image(
            f"{PLOTS}/per_task.png",
            "Final personalised eval loss and task metrics per task and method "
            "(error bars: std over seeds).",
        )
    )
    return images


def _single_run_blocks(out_dir: Path) -> list[Block]:
    run = load_run(out_dir)
    if not any(r.get("kind") == "client" for r in run.rows):
        raise ReportError(f"{out_dir / 'metrics.jsonl'} holds no completed round")
    rows, _ = summarise_runs([run])
    rounds = max(r["round"] for r in run.rows if r.get("kind") == "client")
    clients = len({r["client"] for r in run.rows if r.get("kind") == "client"})
    blocks: list[Block] = [
        Heading(f"mira report: {out_dir.name}", 1),
        Paragraph(
            f"One run of method `{run.method}`"
            + (f", seed {run.seed}" if run.seed is not None else "")
            + f": {clients} clients, {rounds} rounds recorded. Directory: `{out_dir}`."
        ),
        Paragraph(PERSONALISED_NOTE),
        Heading("Final round, per client"),
        Preformatted(final_table(out_dir)),
        Heading("Tables"),
        _round_table(run),
        *summary_tables(rows, []),
        Heading("Plots"),
        *_plots([run], rows, out_dir),
    ]
    return blocks


def _comparison_blocks(out_dir: Path) -> list[Block]:
    runs, incomplete = collect_runs(out_dir)
    if not runs:
        raise ReportError(f"{out_dir} holds no finished run under runs/<method>/seed-<s>/")
    rows, per_client = summarise_runs(runs)
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    blocks: list[Block] = [
        Heading(f"mira report: comparison {out_dir.name}", 1),
        Paragraph(
            f"Methods: {', '.join(r['method'] for r in rows)}. Seeds: "
            f"{', '.join(map(str, seeds))}. All methods ran from the same config (same clients, "
            "splits, LoRA initialisation and data order); only `server.method` and "
            "`federation.seed` vary."
        ),
    ]
    for command in manifest.get("commands", []):
        blocks.append(Paragraph(f"Command: `{command['command']}`"))
    blocks += [
        Paragraph(PERSONALISED_NOTE),
        Paragraph(
            "Cells are mean ± std over seeds (sample std; no ± with one seed); spread is the "
            "std of the personalised eval loss across clients within one run."
        ),
    ]
    if incomplete:
        blocks.append(
            Paragraph("Not finished, left out: " + ", ".join(f"`{p}`" for p in incomplete))
        )
    blocks += [
        Heading("Tables"),
        *summary_tables(rows, per_client),
        mean_curve_table(runs),
        Heading("Plots"),
        *_plots(runs, rows, out_dir),
    ]
    return blocks


def write_report(out_dir: Path) -> Path:
    """Write report.md, report.html and plots/*.png into ``out_dir``; return report.md's path.

    ``out_dir`` is one run (metrics.jsonl at the top) or a comparison (runs/ at the top).
    """
    out_dir = Path(out_dir)
    if (out_dir / "metrics.jsonl").is_file():
        blocks = _single_run_blocks(out_dir)
    elif (out_dir / "runs").is_dir():
        blocks = _comparison_blocks(out_dir)
    else:
        raise ReportError(
            f"{out_dir} is neither a run directory (metrics.jsonl) nor a comparison (runs/)"
        )
    title = next(b.text for b in blocks if isinstance(b, Heading))
    markdown = out_dir / "report.md"
    markdown.write_text(render_markdown(blocks))
    (out_dir / "report.html").write_text(render_html(blocks, title))
    return markdown
