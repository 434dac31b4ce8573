"""Plots of a run and of a comparison (matplotlib, Agg canvas, no global pyplot state).

Every function takes numbers and a path and writes one PNG (atomically, like every results
file); what to plot is decided in :mod:`mira.results.report`. Figures are drawn on their own
Agg canvas, never through pyplot, so plots can be made from any thread or a long-lived process.

Conventions: a method has the same colour in every plot; clients are coloured by task; rounds
are whole numbers; legends sit outside the axes, so they never hide data; a comparison of
close numbers is a dot plot on an axis zoomed to the values (never bars from 0), spanning at
least 2% of them, so that equal methods do not look far apart. Beyond a few dozen clients a
plot summarises instead of drawing each client: a panel of more than :data:`MAX_LINES`
clients draws each task's median client and the band from its lowest to its highest, and a
task graph of more than :data:`MAX_LABELLED` clients names its clusters, not every client.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mira.config import METHODS
from mira.core.mixing import validate_adjacency
from mira.results.document import number_format
from mira.results.files import write_atomic

Labels = Sequence[int] | np.ndarray
Curve = tuple[np.ndarray, np.ndarray]

MAX_LINES = 20
"""A panel draws one line per client up to this many clients (as many as tab20 has distinct
colours), else each task's median and range."""
MAX_LABELLED = 40
"""A task graph names every client up to this many clients, else its clusters."""


def _figure(width: float, height: float) -> Any:
    # A Figure with its own Agg canvas: no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_atomic(Path(path), buffer.getvalue())


def _wrap(title: str, figure: Any) -> str:
    """Break a title into lines that fit the figure's width (about 11 characters an inch)."""
    return "\n".join(textwrap.wrap(title, max(40, int(figure.get_figwidth() * 11))))


def _integer_rounds(ax: Any, rounds: Sequence[int]) -> None:
    """Rounds are whole numbers: tick each one when there are few, else integer ticks."""
    from matplotlib.ticker import MaxNLocator

    if len(rounds) <= 12:
        ax.set_xticks(sorted(rounds))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def palette(names: Sequence[str]) -> dict[str, Any]:
    """A distinct colour per name, in order (tab10, then tab20 beyond ten names)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def method_colours(methods: Sequence[str]) -> dict[str, Any]:
    """Fixed per method, so a method has the same colour in every plot and every report."""
    ordered = list(METHODS) + [m for m in methods if m not in METHODS]
    colours = palette(ordered)
    return {m: colours[m] for m in methods}


# ------------------------------------------------------------------------------ graph
def plot_adjacency(
    adjacency: np.ndarray,
    client_ids: Sequence[str],
    labels: Labels | None,
    path: str | Path,
) -> Path:
    """Write a PNG heatmap of the graph, clients ordered by cluster, boundaries drawn.

    adjacency: K x K task graph.
    client_ids: tick label of every client (up to :data:`MAX_LABELLED` clients; beyond, the
        ticks name the clusters and their sizes).
    labels: cluster of every client (None = one group, client order kept).
    path: output file; parent folders are created.
    """
    matrix = validate_adjacency(adjacency)
    num = matrix.shape[0]
    if len(client_ids) != num:
        raise ValueError(f"{len(client_ids)} client ids for a {num} x {num} graph")
    label_array = np.zeros(num, dtype=np.int64) if labels is None else np.asarray(labels)
    if label_array.shape != (num,):
        raise ValueError(f"labels must have one entry per client ({num})")
    order = np.argsort(label_array, kind="stable")
    ordered = matrix[np.ix_(order, order)]
    names = [str(client_ids[i]) for i in order]
    sorted_labels = label_array[order]
    boundaries = np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 0.5

    labelled = num <= MAX_LABELLED
    side = float(max(4.0, 0.35 * num + 2.5)) if labelled else 9.0
    figure = _figure(side + 1.2, side)
    axes = figure.add_subplot()
    image = axes.imshow(ordered, cmap="viridis", vmin=0.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="a_kl")
    if labelled:
        axes.set_xticks(range(num), names, rotation=90, fontsize=8)
        axes.set_yticks(range(num), names, fontsize=8)
        title = f"Task graph ({num} clients, ordered by cluster)"
    else:  # one tick per cluster, at the middle of its block
        clusters, starts, sizes = np.unique(sorted_labels, return_index=True, return_counts=True)
        middles = starts + (sizes - 1) / 2
        if labels is None:
            ticks = [f"all clients ({num})"]
        else:
            ticks = [f"cluster {c} ({n})" for c, n in zip(clusters, sizes, strict=True)]
        axes.set_xticks(middles, ticks, rotation=90, fontsize=8)
        axes.set_yticks(middles, ticks, fontsize=8)
        title = f"Task graph ({num} clients, ordered by cluster; ticks name the clusters)"
    for boundary in boundaries:
        axes.axhline(boundary, color="white", linewidth=1.5)
        axes.axvline(boundary, color="white", linewidth=1.5)
    axes.set_title(_wrap(title, figure))
    return _save(figure, path)


# ------------------------------------------------------------------------------ curves
def plot_client_lines(
    panels: Mapping[str, Mapping[str, Curve]],
    task_of: Mapping[str, str],
    path: Path,
    *,
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
    colour_clients: bool = False,
) -> Path:
    """One panel per key of ``panels``, one line per client.

    Clients are coloured by task with a task legend beside the figure; with
    ``colour_clients`` (panels that each hold one task's clients) every client gets its own
    colour and each panel a legend of its clients below it. A panel of more than
    :data:`MAX_LINES` clients draws, per task, the median client's line and the band from
    the lowest to the highest client instead (:func:`task_spread`), and says so in its
    legend; :func:`summarised` tells whether any panel does.
    """
    from matplotlib.lines import Line2D

    names = list(panels)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    largest = max(len(c) for c in panels.values())
    legend_rows = 0
    if colour_clients:
        legend_rows = 1 if largest > MAX_LINES else math.ceil(largest / 3)
    figure = _figure(max(6.5, 4.6 * cols + 1.3), (3.3 + 0.22 * legend_rows) * rows + 0.8)
    tasks = list(dict.fromkeys(task_of.values()))
    task_colour = palette(tasks)
    alpha = 0.85 if largest <= MAX_LINES else max(0.15, MAX_LINES / largest)
    axes = figure.subplots(rows, cols, squeeze=False, sharey=True)
    for index, name in enumerate(names):
        ax = axes[index // cols][index % cols]
        clients = panels[name]
        if len(clients) > MAX_LINES:
            for task, (rounds, median, low, high) in task_spread(clients, task_of).items():
                colour = task_colour.get(task, "0.3")
                ax.fill_between(rounds, low, high, color=colour, alpha=0.2, linewidth=0)
                ax.plot(rounds, median, color=colour, marker=".")
        else:
            colours = palette(list(clients)) if colour_clients else {}
            for client, (rounds, values) in clients.items():
                colour = colours.get(client, task_colour.get(task_of.get(client, ""), "0.3"))
                ax.plot(rounds, values, color=colour, alpha=alpha, marker=".", label=client)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("round")
        _integer_rounds(ax, sorted({int(r) for c in clients.values() for r in c[0]}))
        ax.grid(alpha=0.3)
        if ylim is not None:
            ax.set_ylim(*ylim)
        if index % cols == 0:
            ax.set_ylabel(ylabel)
        below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.2), "frameon": False}
        if len(clients) > MAX_LINES:
            spread = [
                Line2D([], [], color="0.3", marker=".", label="median client"),
                Line2D([], [], color="0.3", alpha=0.3, linewidth=6, label="lowest to highest"),
            ]
            title = f"{len(clients)} clients" + ("" if colour_clients else ", per task")
            ax.legend(handles=spread, ncol=2, fontsize=7, title=title, title_fontsize=7, **below)
        elif colour_clients:
            ax.legend(ncol=3, fontsize=7, **below)
    for index in range(len(names), rows * cols):
        axes[index // cols][index % cols].set_visible(False)
    if not colour_clients:
        handles = [Line2D([], [], color=task_colour[t], label=t) for t in tasks]
        figure.legend(
            handles=handles, title="task", loc="outside lower center", ncol=min(len(tasks), 8)
        )
    figure.suptitle(_wrap(title, figure))
    return _save(figure, path)


def summarised(panels: Mapping[str, Mapping[str, Curve]]) -> bool:
    """Whether :func:`plot_client_lines` draws a summary instead of a line per client in
    some panel of ``panels``."""
    return any(len(clients) > MAX_LINES for clients in panels.values())


def task_spread(
    clients: Mapping[str, Curve], task_of: Mapping[str, str]
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per task (in order of first appearance): the rounds any of its clients has, and per
    round the median, lowest and highest value over the clients that have it."""
    groups: dict[str, list[Curve]] = {}
    for client, curve in clients.items():
        groups.setdefault(task_of.get(client, ""), []).append(curve)
    out = {}
    for task, curves in groups.items():
        rounds = np.array(sorted({float(r) for c, _ in curves for r in c}))
        table = np.full((len(curves), len(rounds)), np.nan)
        for row, (those, values) in zip(table, curves, strict=True):
            row[np.searchsorted(rounds, np.asarray(those, dtype=float))] = values
        present = ~np.all(np.isnan(table), axis=0)  # a round where every value is NaN
        table, rounds = table[:, present], rounds[present]
        out[task] = (
            rounds,
            np.nanmedian(table, axis=0),
            np.nanmin(table, axis=0),
            np.nanmax(table, axis=0),
        )
    return out


def plot_mean_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path
) -> Path:
    """Mean over clients per round, one line per method; with several seeds the line is the
    mean over seeds and the band their min-max (no band is drawn, or promised, for one)."""
    figure = _figure(7.8, 4.4)
    ax = figure.add_subplot()
    colours = method_colours(list(curves))
    banded = False
    for method, (rounds, mean, matrix) in curves.items():
        seeds = matrix.shape[0]
        label = method if seeds == 1 else f"{method} ({seeds} seeds)"
        ax.plot(rounds, mean, color=colours[method], marker="o", markersize=4, label=label)
        if seeds > 1:
            banded = True
            ax.fill_between(
                rounds, matrix.min(axis=0), matrix.max(axis=0), color=colours[method], alpha=0.2
            )
    ax.set_xlabel("round")
    _integer_rounds(ax, sorted({int(r) for c in curves.values() for r in c[0]}))
    ax.set_ylabel("mean personalised eval loss")
    ax.grid(alpha=0.3)
    title = "Mean personalised eval loss over clients"
    if len(curves) == 1:
        title += f": {next(iter(curves))}"
    else:
        figure.legend(loc="outside right upper", fontsize=9)
    if banded:
        title += "\nline: mean over seeds; band: min to max over seeds"
    ax.set_title(title, fontsize=11)
    return _save(figure, path)


# ------------------------------------------------------------------------------ dots
@dataclass(frozen=True)
class DotPanel:
    """One panel of :func:`plot_dot_grid`: one dot per label, top to bottom.

    ``errors`` are half-widths of the interval drawn around each dot (NaN: none);
    ``reference`` is drawn as a dashed vertical line (e.g. the mean of the dots).
    """

    title: str
    labels: list[str]
    values: list[float]
    errors: list[float]
    colours: list[Any]
    lower_is_better: bool
    reference: float | None = None


MIN_SPAN = 0.02
"""A dot plot's axis spans at least this share of its largest |value| ..."""
MIN_SPAN_FLOOR = 1e-3
"""... and at least this much (its quantities, losses and scores, are of order 1)."""


def _zoom(panel: DotPanel) -> tuple[float, float]:
    """An x range around the dots and their intervals (and the reference), not from 0.

    The span is at least ``MIN_SPAN`` of the largest magnitude (and ``MIN_SPAN_FLOOR``),
    centred on the values: two methods 0.001 apart at a loss of 0.6 sit side by side, not at
    the two ends of the axis, while 5.916 and 5.932 are still told apart.
    """
    points = [
        bound
        for v, e in zip(panel.values, panel.errors, strict=True)
        if math.isfinite(v)
        for bound in (v - (e if math.isfinite(e) else 0.0), v + (e if math.isfinite(e) else 0.0))
    ]
    if panel.reference is not None and math.isfinite(panel.reference):
        points.append(panel.reference)
    if not points:
        return 0.0, 1.0
    low, high = min(points), max(points)
    least = max(MIN_SPAN * max(abs(low), abs(high)), MIN_SPAN_FLOOR)
    if high - low < least:
        middle = (low + high) / 2
        low, high = middle - least / 2, middle + least / 2
    margin = 0.15 * (high - low)
    return low - margin, high + margin


def plot_dot_grid(rows: Sequence[tuple[str, Sequence[DotPanel]]], path: Path, title: str) -> Path:
    """A grid of dot plots: one row per group (a task), its panels left to right (one per
    metric the task has; no empty panels), every panel's x axis zoomed to its own values
    (:func:`_zoom`: 5.916 and 5.932 apart, two equal methods side by side), and each dot's
    value printed above it, in one format per panel."""
    from matplotlib.ticker import MaxNLocator

    cols = max(len(panels) for _, panels in rows)
    heights = [0.34 * max(len(p.labels) for p in panels) + 1.15 for _, panels in rows]
    label_width = max(len(label) for _, panels in rows for p in panels for label in p.labels)
    figure = _figure(3.6 * cols + 0.07 * label_width + 0.6, sum(heights) + 0.9)
    grid = figure.add_gridspec(len(rows), cols, height_ratios=heights)
    for i, (group, panels) in enumerate(rows):
        first = None
        for j, panel in enumerate(panels):
            ax = figure.add_subplot(grid[i, j], sharey=first)
            first = first or ax
            n = len(panel.labels)
            ys = np.arange(n)[::-1]
            form = number_format(panel.values)  # one format for the panel's printed values
            for y, v, e, colour in zip(ys, panel.values, panel.errors, panel.colours, strict=True):
                if not math.isfinite(v):
                    continue
                ax.errorbar(
                    v,
                    y,
                    xerr=e if math.isfinite(e) else None,
                    fmt="o",
                    color=colour,
                    markersize=6,
                    capsize=3,
                )
                ax.annotate(
                    form(v),
                    (v, y),
                    xytext=(0, 5),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7.5,
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.85},
                )
            if panel.reference is not None and math.isfinite(panel.reference):
                ax.axvline(panel.reference, color="0.45", linestyle="--", linewidth=1)
            if j == 0:
                ax.set_yticks(ys, panel.labels, fontsize=8.5)
            else:
                ax.tick_params(labelleft=False)
            ax.set_ylim(-0.6, n - 0.15)
            ax.set_xlim(*_zoom(panel))
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
            ax.ticklabel_format(axis="x", useOffset=False, style="plain")
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(f"{group}: {panel.title}", fontsize=9.5, loc="left")
            better = "lower" if panel.lower_is_better else "higher"
            ax.set_xlabel(f"{better} is better (axis zoomed, not from 0)", fontsize=8)
    figure.suptitle(_wrap(title, figure), fontsize=11)
    return _save(figure, path)
