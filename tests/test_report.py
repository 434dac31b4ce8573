"""mira report on synthetic run and comparison directories: files, images, numbers, links."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from mira.experiments.compare import fmt_pm, load_run, run_folder
from mira.results.report import ReportError, client_curves, mean_curves, write_report
from test_compare import CLIENTS, make_comparison_dir, write_fake_run

PLOT_NAMES = ["client_loss.png", "mean_loss.png", "task_graph.png", "per_task.png"]


def check_png(path: Path) -> None:
    """A readable PNG of a sane size that is not a blank canvas."""
    assert path.is_file() and path.stat().st_size > 1000, path
    image = imread(path)
    height, width = image.shape[:2]
    assert 200 <= height <= 3000 and 200 <= width <= 4000, (path, image.shape)
    assert float(np.std(image[..., :3])) > 0.01, f"{path} is blank"


def check_links(out_dir: Path, names: list[str]) -> tuple[str, str]:
    markdown = (out_dir / "report.md").read_text()
    page = (out_dir / "report.html").read_text()
    for name in names:
        check_png(out_dir / "plots" / name)
        assert f"](plots/{name})" in markdown
        assert f'<img src="plots/{name}"' in page
    linked = set(re.findall(r"\]\((plots/[^)]+)\)", markdown))
    assert linked == {f"plots/{n}" for n in names}
    assert page.count("<img ") == len(names)
    return markdown, page


def test_report_of_a_single_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_fake_run(run, "mira", 1)
    path = write_report(run)
    assert path == run / "report.md"
    markdown, page = check_links(run, PLOT_NAMES)
    # final round of the synthetic run: losses 1, 2, 4 -> mean 7/3, worst 4, spread std
    round_two = next(line for line in markdown.splitlines() if line.startswith("| 2 "))
    assert [c.strip() for c in round_two.split("|")[1:5]] == ["2", "2.333", "4.000", "1.247"]
    assert "Personalised eval loss after round 2" in markdown  # the outputs.final_table text
    assert "sentiment-0" in markdown and "accuracy" in markdown
    assert "personalised" in markdown.lower() and "personalised" in page.lower()
    assert "global loss" not in markdown.lower()
    assert "<table>" in page and "<pre>" in page


def test_single_run_without_graph_has_no_heatmap(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_fake_run(run, "local", 1)
    (run / "graph.json").unlink()
    write_report(run)
    check_links(run, [n for n in PLOT_NAMES if n != "task_graph.png"])


def test_report_of_a_comparison(tmp_path: Path) -> None:
    root = make_comparison_dir(tmp_path / "cmp")
    write_report(root)
    markdown, page = check_links(root, PLOT_NAMES)
    # mira: mean over seeds of the client-mean loss 7/3 and 7/3 + 0.2, sample std 0.2/sqrt 2
    expected = fmt_pm(7 / 3 + 0.1, 0.2 / np.sqrt(2))
    assert expected == "2.433 ± 0.1414"
    assert expected in markdown and expected in page
    assert "3.100 ± 0.1414" in markdown  # local
    assert "Per client: final personalised eval loss, mean over seeds" in markdown
    assert "shared global model" in markdown
    for method in ("mira", "fedit", "local"):
        assert f"| {method} " in markdown


def test_incomplete_runs_are_left_out_and_named(tmp_path: Path) -> None:
    root = make_comparison_dir(tmp_path / "cmp")
    folder = run_folder(root, "local", 2)
    (folder / "DONE").unlink()
    write_report(root)
    markdown = (root / "report.md").read_text()
    assert str(folder) in markdown
    assert "| local  |     1 |" in markdown  # one finished seed left for local


def test_curves_average_seeds(tmp_path: Path) -> None:
    root = make_comparison_dir(tmp_path)
    runs = [load_run(run_folder(root, "mira", s), "mira", s) for s in (1, 2)]
    curves = client_curves(runs)["mira"]
    assert list(curves) == [c for c, _ in CLIENTS]
    rounds, losses = curves["sentiment-0"]
    np.testing.assert_allclose(rounds, [1, 2])
    np.testing.assert_allclose(losses, [1.6, 1.1])  # (1.5 + 1.7) / 2, (1.0 + 1.2) / 2
    rounds, mean, matrix = mean_curves(runs)["mira"]
    np.testing.assert_allclose(matrix, [[7 / 3 + 0.5, 7 / 3], [7 / 3 + 0.7, 7 / 3 + 0.2]])
    np.testing.assert_allclose(mean, matrix.mean(axis=0))


def test_a_folder_that_is_neither_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="neither"):
        write_report(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ReportError, match="no finished run"):
        write_report(tmp_path)
    shutil.rmtree(tmp_path / "runs")


def test_comparison_report_lists_each_seeds_mean_per_round(tmp_path: Path) -> None:
    root = make_comparison_dir(tmp_path / "cmp")
    write_report(root)
    markdown = (root / "report.md").read_text()
    assert "Per round: mean personalised eval loss over clients, one value per seed" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| round "))
    methods = [c.strip() for c in header.split("|")[2:-1]]
    row = next(line for line in markdown.splitlines() if line.startswith("| 1 "))
    cells = dict(zip(methods, [c.strip() for c in row.split("|")[2:-1]], strict=True))
    # mira, round 1 of 2: client mean 7/3 + 0.5, seed 2 shifted by 0.2
    assert cells["mira"] == f"{7 / 3 + 0.5:.3f} {7 / 3 + 0.7:.3f}"
    assert "Seeds in each cell, in order: mira: 1, 2" in markdown
