"""mira compare on the tiny model through the real Simulation Engine: every cell runs, the
summary holds finite numbers, and the report reads what real runs write. The statistics
against hand-computed values: tests/unit/experiments/test_compare.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tomli_w

from mira.config import load_config
from mira.experiments.compare import run_comparison
from mira.results.schema import ComparisonLayout, ReportFiles
from test_compare import read_csv


@pytest.mark.slow
def test_real_comparison_of_mira_and_local_on_the_tiny_model(tiny_config, tmp_path: Path) -> None:
    # one client per task: the 'full' graph gives mira a neighbour to pull toward
    cfg = tiny_config(
        "federation.rounds=1", "federation.local_steps=1", "server.graph=full", clients=1
    )
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(cfg.to_dict()))
    out = tmp_path / "cmp"
    run_comparison(str(path), [], ["mira", "local"], [3], out)
    rows = read_csv(ComparisonLayout(out).summary_csv)
    assert list(rows) == ["mira", "local"]
    for row in rows.values():
        assert row["seeds"] == "1"
        assert math.isfinite(float(row["personalised_loss_mean"]))
        assert math.isfinite(float(row["personalised_loss_worst"]))
        assert float(row["bytes_up_per_round"]) > 0
        assert float(row["wall_seconds"]) > 0
    # same clients, data and initialisation; only the server rule differs
    assert rows["mira"]["personalised_loss_mean"] != rows["local"]["personalised_loss_mean"]
    stored = load_config(ComparisonLayout(out).run("mira", 3).config)
    assert stored.federation.seed == 3 and stored.server.method == "mira"
    # the report reads what real runs write (seconds, not minutes, on top of the runs)
    from mira.results.report import write_report

    write_report(out)
    assert ReportFiles(out).task_graph_plot.is_file()
