"""Plots of a run and of a comparison (matplotlib, Agg canvas, no global pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mira.core.mixing import validate_adjacency

Labels = Sequence[int] | np.ndarray


def plot_adjacency(
    adjacency: np.ndarray,
    client_ids: Sequence[str],
    labels: Labels | None,
    path: str | Path,
) -> Path:
    """Write a PNG heatmap of the graph, clients ordered by cluster, boundaries drawn.

    adjacency: K x K task graph.
    client_ids: tick label of every client.
    labels: cluster of every client (None = one group, client order kept).
    path: output file; parent folders are created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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

    side = float(min(20.0, max(4.0, 0.35 * num + 2.5)))
    # A Figure with its own Agg canvas: no global pyplot state, safe in any process or thread.
    figure = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(ordered, cmap="viridis", vmin=0.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="a_kl")
    axes.set_xticks(range(num), names, rotation=90, fontsize=8)
    axes.set_yticks(range(num), names, fontsize=8)
    sorted_labels = label_array[order]
    for boundary in np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 0.5:
        axes.axhline(boundary, color="white", linewidth=1.5)
        axes.axvline(boundary, color="white", linewidth=1.5)
    axes.set_title(f"Task graph ({num} clients, ordered by cluster)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out
