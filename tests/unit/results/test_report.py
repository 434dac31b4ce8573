"""mira report on synthetic run and comparison directories: files, images, numbers, links."""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from mira.results.document import number_format
from mira.results.errors import ReportError
from mira.results.report import final_table, write_report
from mira.results.runs import load_run, run_folder
from mira.results.schema import ClientRow, ComparisonLayout, ReportFiles, RunLayout
from mira.results.stats import client_curves, mean_curves
from test_compare import CLIENTS, make_comparison_dir, rewrite_client_rows, write_fake_run

PLOT_NAMES = ["client_loss_plot", "mean_loss_plot", "task_graph_plot", "per_task_plot"]
"""The plots every report has (ReportFiles attributes), when its runs recorded a graph."""


def check_png(path: Path) -> None:
    """A readable PNG of a sane size that is not a blank canvas."""
    assert path.is_file() and path.stat().st_size > 1000, path
    image = imread(path)
    height, width = image.shape[:2]
    assert 200 <= height <= 3000 and 200 <= width <= 4000, (path, image.shape)
    assert float(np.std(image[..., :3])) > 0.01, f"{path} is blank"


def check_links(out_dir: Path, names: list[str]) -> tuple[str, str]:
    """report.md links every plot (``names``: ReportFiles attributes) by its path relative to
    the report; report.html embeds the same PNGs (byte for byte, in the same order) and
    links no file, so the page is self-contained."""
    files = ReportFiles(out_dir)
    markdown = files.report_md.read_text()
    page = files.report_html.read_text()
    plots = [getattr(files, name) for name in names]
    for path in plots:
        check_png(path)
        assert f"]({files.link(path)})" in markdown
    folder = files.link(files.plots)
    linked = re.findall(rf"\]\(({folder}/[^)]+)\)", markdown)
    assert set(linked) == {files.link(path) for path in plots}
    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [(out_dir / p).read_bytes() for p in linked]
    assert page.count("<img ") == len(names)
    assert f'src="{folder}/' not in page and f'href="{folder}/' not in page
    # every markdown table is a real HTML table, and nothing is preformatted text
    assert page.count("<table>") == markdown.count("\n| ---") + markdown.count("\n| :--")
    assert page.count("<table>") == page.count("</table>") > 0
    assert "<pre>" not in page or all(
        block.startswith("<pre><code>mira ") for block in re.findall(r"<pre>.{0,20}", page)
    )
    return markdown, page


def test_report_of_a_single_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_fake_run(run, "mira", 1)
    path = write_report(run)
    assert path == ReportFiles(run).report_md
    markdown, page = check_links(run, PLOT_NAMES)
    # final round of the synthetic run: losses 1, 2, 4 -> mean 7/3, worst 4, spread std
    round_two = next(line for line in markdown.splitlines() if line.startswith("| 2 "))
    assert [c.strip() for c in round_two.split("|")[1:5]] == ["2", "2.333", "4.000", "1.247"]
    assert "Personalised eval loss after round 2" in markdown  # the outputs.final_table text
    assert "sentiment-0" in markdown and "accuracy" in markdown
    assert "personalised" in markdown.lower() and "personalised" in page.lower()
    assert "global loss" not in markdown.lower()
    assert "<table>" in page and "<pre>" not in page


def test_single_run_without_graph_has_no_heatmap(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_fake_run(run, "local", 1)
    RunLayout(run).graph.unlink()
    write_report(run)
    check_links(run, [n for n in PLOT_NAMES if n != "task_graph_plot"])


def test_report_of_a_comparison(tmp_path: Path) -> None:
    root = make_comparison_dir(tmp_path / "cmp")
    write_report(root)
    markdown, page = check_links(root, PLOT_NAMES)
    # mira: mean over seeds of the client-mean loss 7/3 and 7/3 + 0.2, sample std 0.2/sqrt 2,
    # in the loss table's one format (3 decimals: its largest loss is 5.1)
    expected = number_format([5.1]).pm(7 / 3 + 0.1, 0.2 / np.sqrt(2))
    assert expected == "2.433 ± 0.141"
    assert expected in markdown and expected in page
    assert "3.100 ± 0.141" in markdown  # local
    assert "Per client: final personalised eval loss, mean over seeds" in markdown
    assert "shared global model" in markdown
    for method in ("mira", "fedit", "local"):
        assert f"| {method} " in markdown


def test_incomplete_runs_are_left_out_and_named(tmp_path: Path) -> None:
    root = make_comparison_dir(tmp_path / "cmp")
    folder = run_folder(root, "local", 2)
    RunLayout(folder).done.unlink()
    write_report(root)
    markdown = ReportFiles(root).report_md.read_text()
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
    ComparisonLayout(tmp_path).runs.mkdir()
    with pytest.raises(ReportError, match="no finished run"):
        write_report(tmp_path)
    shutil.rmtree(ComparisonLayout(tmp_path).runs)


def test_comparison_report_lists_each_seeds_mean_per_round(tmp_path: Path) -> None:
    root = make_comparison_dir(tmp_path / "cmp")
    write_report(root)
    markdown = ReportFiles(root).report_md.read_text()
    assert "Per round: mean personalised eval loss over clients, one value per seed" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| round "))
    methods = [c.strip() for c in header.split("|")[2:-1]]
    row = next(line for line in markdown.splitlines() if line.startswith("| 1 "))
    cells = dict(zip(methods, [c.strip() for c in row.split("|")[2:-1]], strict=True))
    # mira, round 1 of 2: client mean 7/3 + 0.5, seed 2 shifted by 0.2
    assert cells["mira"] == f"{7 / 3 + 0.5:.3f} {7 / 3 + 0.7:.3f}"
    assert "Seeds in each cell, in order: mira: 1, 2" in markdown


# ------------------------------------------------------------------------------ mix weights
def add_mix_weights(folder: Path, base: float) -> None:
    """Client i takes base + 0.1 i + 0.05 (round - 1) from its neighbours."""
    names = [c for c, _ in CLIENTS]

    def mix(row: ClientRow) -> None:
        row.mix_weight = base + 0.1 * names.index(row.client) + 0.05 * (row.round - 1)

    rewrite_client_rows(folder, mix)


def table_rows(markdown: str, title: str) -> dict[str, list[str]]:
    section = markdown.split(f"## {title}")[1].split("\n## ")[0]
    return {
        cells[0]: cells[1:]
        for line in section.splitlines()
        if line.startswith("| ")
        and not line.startswith(("| method", "| round", "| client", "| ---"))
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }


def test_single_run_report_plots_and_tabulates_mix_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_fake_run(run, "mira", 1)
    add_mix_weights(run, 0.2)
    write_report(run)
    markdown, _ = check_links(run, [*PLOT_NAMES, "mix_weight_plot"])
    rounds = table_rows(markdown, "Per round: personalised eval loss over clients")
    # round 1: 0.2, 0.3, 0.4 -> 0.3; round 2: each + 0.05 -> 0.35
    assert rounds["1"][-1] == "0.3000" and rounds["2"][-1] == "0.3500"
    final = table_rows(markdown, "Personalised eval loss after round 2")
    assert final["qa-0"][-1] == "0.4500"  # 0.2 + 0.2 + 0.05
    mixing = table_rows(markdown, "Mix weight after the final round")
    assert mixing["mira"] == ["0.3500", "0.3000", "0.4500"]  # all, sentiment, qa


def test_comparison_plots_mix_weights_of_the_mira_rule_only(tmp_path: Path) -> None:
    root = make_comparison_dir(tmp_path / "cmp")
    add_mix_weights(run_folder(root, "local", 1), 0.0)
    write_report(root)
    check_links(root, PLOT_NAMES)  # local's mix weights are not plotted
    variant = run_folder(root, "mira@server.step=0.2", 1)
    write_fake_run(variant, "mira", 1, seconds=3.0)
    add_mix_weights(variant, 0.5)
    write_report(root)
    markdown, _ = check_links(root, [*PLOT_NAMES, "mix_weight_plot"])
    mixing = table_rows(markdown, "Mix weight after the final round")
    assert set(mixing) == {"local", "mira@server.step=0.2"}
    assert mixing["mira@server.step=0.2"][0] == "0.6500"


def test_single_run_cost_uses_the_recorded_round_seconds(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_fake_run(run, "mira", 1)  # no run.json: two rounds of 1.5 s
    write_report(run)
    cost = table_rows(ReportFiles(run).report_md.read_text(), "Cost")
    assert cost["mira"][2] == "3.000"


def test_mean_loss_promises_a_band_only_with_several_seeds(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_fake_run(run, "mira", 1)
    write_report(run)
    assert "band:" not in ReportFiles(run).report_md.read_text()
    root = make_comparison_dir(tmp_path / "cmp")
    write_report(root)
    assert "band: min to max over seeds" in ReportFiles(root).report_md.read_text()


def test_per_task_panels_only_for_the_metrics_a_task_has(tmp_path: Path) -> None:
    from mira.results.report import _comparison_dots, _single_run_dots
    from mira.results.stats import summarise_runs

    root = make_comparison_dir(tmp_path)
    runs = [load_run(run_folder(root, m, s), m, s) for m, s in [("mira", 1), ("local", 1)]]
    rows, _ = summarise_runs(runs)
    panels = {task: [p.title for p in row] for task, row in _comparison_dots(rows)}
    assert panels == {
        "sentiment": ["personalised eval loss", "personalised accuracy"],
        "qa": ["personalised eval loss", "personalised token_f1"],
    }
    single = {task: [p.title for p in row] for task, row in _single_run_dots(runs[0])}
    assert single == panels
    qa_loss = dict(_comparison_dots(rows))["qa"][0]
    assert qa_loss.labels == ["mira", "local"] and qa_loss.values == [4.0, 5.0]


def test_close_values_get_a_zoomed_axis_not_bars_from_zero() -> None:
    from mira.results.plots import DotPanel, _zoom

    def gap_share(values: list[float]) -> float:
        panel = DotPanel("loss", ["a", "b"], values, [math.nan] * 2, ["C0", "C1"], True)
        low, high = _zoom(panel)
        assert low < min(values) and high > max(values)
        assert low > 0  # zoomed: not from 0
        return (max(values) - min(values)) / (high - low)

    # 5.916 and 5.932 are told apart, but their 0.3% difference does not fill the axis: the
    # axis spans at least 2% of the values (0.119), plus margins
    assert gap_share([5.916, 5.932]) == pytest.approx(0.016 / (0.02 * 5.932 * 1.3))
    # two methods 0.001 apart at a loss of 0.6 sit side by side
    assert gap_share([0.5933, 0.5943]) < 0.07
    # values far apart fill the axis (less the margins)
    assert gap_share([1.0, 2.0]) == pytest.approx(1 / 1.3)
    # equal values: a span centred on them
    panel = DotPanel("loss", ["a", "b"], [0.5, 0.5], [math.nan] * 2, ["C0", "C1"], True)
    low, high = _zoom(panel)
    assert (low + high) / 2 == pytest.approx(0.5) and high - low == pytest.approx(0.013)


# ------------------------------------------------------------------------------ formats
def test_single_round_run_has_one_loss_column(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_fake_run(run, "mira", 1, rounds=1)
    write_report(run)
    markdown = ReportFiles(run).report_md.read_text()
    section = markdown.split("## Personalised eval loss after round 1")[1].split("\n## ")[0]
    header = next(line for line in section.splitlines() if line.startswith("| client"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == ["client", "task", "loss, round 1", "accuracy", "token_f1"]
    final = table_rows(markdown, "Personalised eval loss after round 1")
    assert final["qa-0"][1:3] == ["4.000", "-"]  # the loss once, 3 decimals as 1.000 and 2.000
    assert final["sentiment-0"][1:3] == ["1.000", "0.5000"]
    two = tmp_path / "two"
    write_fake_run(two, "mira", 1, rounds=2)
    write_report(two)
    final = table_rows(
        ReportFiles(two).report_md.read_text(), "Personalised eval loss after round 2"
    )
    assert final["qa-0"][1:3] == ["4.500", "4.000"]  # round 1 is 0.5 higher


def test_the_table_mira_run_prints_is_the_reports_table(tmp_path: Path) -> None:
    """What ``mira run`` prints at its end: the final table of report.md, one loss column
    for a one-round run, then the round's mean, worst and spread."""
    run = tmp_path / "run"
    write_fake_run(run, "mira", 1, rounds=1)
    write_report(run)
    printed = final_table(run)
    lines = printed.splitlines()
    assert lines[0].startswith("Personalised eval loss after round 1 (each client's own")
    cells = [c.strip() for c in lines[1].strip("|").split("|")]
    assert cells == ["client", "task", "loss, round 1", "accuracy", "token_f1"]
    assert "| qa-0 " in printed and "4.000" in printed
    assert "mean 2.333  worst 4.000  std 1.247  (method mira)" in printed
    section = ReportFiles(run).report_md.read_text().split("after round 1")[1]
    assert all(line in section for line in lines[1:6])  # the rows of report.md's table


def scale_losses(folder: Path, factor: float, clients: set[str]) -> None:
    """Multiply the eval losses of ``clients`` in a fake run by ``factor``."""

    def scale(row: ClientRow) -> None:
        if row.client in clients and row.eval_loss is not None:
            row.eval_loss *= factor

    rewrite_client_rows(folder, scale)


def decimals(cell: str) -> set[int]:
    """Decimals of every number in a cell ('0.5000 ± 0.0354' -> {4})."""
    return {len(n.split(".")[1]) if "." in n else 0 for n in re.findall(r"-?\d+\.?\d*", cell)}


def test_every_quantity_has_one_number_format(tmp_path: Path) -> None:
    """A sentiment loss of 1e-05 (a memorised task) beside losses of 0.5 to 5: no exponent,
    no 0.000 beside 0.5000, the same decimals in every cell of the quantity."""
    root = make_comparison_dir(tmp_path / "cmp")
    for seed in (1, 2):
        scale_losses(run_folder(root, "mira", seed), 1e-5, {"sentiment-0", "sentiment-1"})
    write_report(root)
    markdown = ReportFiles(root).report_md.read_text()
    assert "e-0" not in markdown and "e+0" not in markdown
    per_task = table_rows(markdown, "Personalised eval loss per task")
    # largest loss 5.1: 3 decimals for the whole table; mira's sentiment loss prints as 0
    assert per_task["mira"][0] == "0.000 ± 0.000"
    assert per_task["local"] == ["2.100 ± 0.141", "5.100 ± 0.141"]
    for name in (
        "Personalised eval loss per task",
        "Personalised eval loss after the final",
        "Personalised task metrics",
        "Per client: final personalised eval loss",
    ):
        cells = [c for row in table_rows(markdown, name).values() for c in row]
        numbers = [c for c in cells if re.fullmatch(r"[-\d. ±]+", c) and "." in c]
        assert len({d for c in numbers for d in decimals(c)}) == 1, (name, cells)
    metrics = table_rows(markdown, "Personalised task metrics")
    assert metrics["fedit"][0] == "0.5000" and metrics["mira"][0] == "0.6500 ± 0.0354"


def test_number_format_is_chosen_by_magnitude_and_spread() -> None:
    form = number_format([0.0, 0.5, -2.007e-05])
    assert [form(v) for v in (0.0, 0.5, -2.007e-05)] == ["0.0000", "0.5000", "0.0000"]
    assert number_format([2.333, 4.0, 1.247]).decimals == 3  # 4 digits of the largest
    assert number_format([1037.0, 12.0])(12.0) == "12"
    # values closer than the magnitude's last digit get the digits their spread needs
    form = number_format([0.59331, 0.59334])
    assert (form(0.59331), form(0.59334)) == ("0.59331", "0.59334")
    # ... but not a dozen for rounding noise
    assert number_format([0.5, 0.5 + 1e-12]).decimals == 4
    assert number_format([None, math.nan, "n/a"]).decimals == 0
    assert form.pm(0.5, None) == "0.50000" and form.pm(0.5, 0.01) == "0.50000 ± 0.01000"
    assert form(None) == "-" and form(math.inf) == "inf"


def test_local_costs_what_it_exchanges_and_the_note_names_the_harness_traffic(
    tmp_path: Path,
) -> None:
    root = make_comparison_dir(tmp_path / "cmp")
    write_report(root)
    markdown = ReportFiles(root).report_md.read_text()
    cost = table_rows(markdown, "Cost")
    # BYTES_UP 300 and 500, BYTES_DOWN 600 and 1000: 400 and 800 bytes a round
    assert cost["mira"][:2] == ["0.0004000 ± 0.0000000", "0.0008000 ± 0.0000000"]
    assert cost["fedit"][:2] == ["0.0004000", "0.0008000"]
    assert cost["local"][:2] == ["0.0000000 ± 0.0000000", "0.0000000 ± 0.0000000"]
    note = markdown.split("## Cost")[1].split("\n## ")[0]
    assert "local exchanges nothing" in note
    assert "0.0004000 MB up and 0.0008000 MB down measured" in note
    assert "mira exchanges nothing" not in note and "fedit exchanges" not in note


# ------------------------------------------------------------------------------ many clients
def write_many_clients_run(folder: Path, per_task: int, rounds: int = 2) -> None:
    """A run of two tasks with ``per_task`` clients each: client i of a task ends with the
    personalised eval loss 1 + 0.01 i (0.5 higher in earlier rounds) and mix weight i / 100;
    the graph links the clients of a task."""
    from mira.results.rundir import round_aggregate
    from mira.results.schema import encode_row

    folder.mkdir(parents=True, exist_ok=True)
    clients = [(f"{task}-{i}", task, i) for task in ("sentiment", "qa") for i in range(per_task)]
    lines = []
    for rnd in range(1, rounds + 1):
        rows = [
            ClientRow(
                round=rnd,
                client=client,
                task=task,
                method="mira",
                rank=8,
                sampled=i % 4 == 0,
                train_loss=2.0,
                eval_loss=1.0 + 0.01 * i + 0.5 * (rounds - rnd),
                bytes_up=100,
                bytes_down=200,
                mix_weight=i / 100,
                metrics={"accuracy": 0.5} if task == "sentiment" else {"token_f1": 0.25},
            )
            for client, task, i in clients
        ]
        lines += [*(encode_row(r) for r in rows), encode_row(round_aggregate(rnd, "mira", 1, rows))]
    RunLayout(folder).metrics.write_text("\n".join(lines) + "\n")
    labels = [0 if task == "sentiment" else 1 for _, task, _ in clients]
    adjacency = [
        [1.0 / (per_task - 1) if a == b and k != j else 0.0 for j, b in enumerate(labels)]
        for k, a in enumerate(labels)
    ]
    graph = {
        "source": "tasks",
        "clients": [c for c, _, _ in clients],
        "tasks": [t for _, t, _ in clients],
        "clusters": labels,
        "adjacency": adjacency,
    }
    RunLayout(folder).graph.write_text(json.dumps(graph))


def test_a_run_of_many_clients_is_summarised_not_drawn_client_by_client(tmp_path: Path) -> None:
    """96 clients, 48 a task: the per-task plot shows each task's quantiles (its height no
    longer grows with the clients), the line plots each task's median and range, and the
    captions say so."""
    from mira.results.report import MAX_DOTS, QUANTILE_LABELS, _single_run_dots

    run = tmp_path / "run"
    write_many_clients_run(run, 48)
    write_report(run)
    markdown, _ = check_links(run, [*PLOT_NAMES, "mix_weight_plot"])
    files = ReportFiles(run)
    assert imread(files.per_task_plot).shape[0] < 1200  # five dots a task, not 48
    assert imread(files.task_graph_plot).shape[:2] == (900, 1020)  # 9 x 10.2 in: no names
    assert f"a task of more than {MAX_DOTS} clients: the quantiles of its clients" in markdown
    assert "the median client's line and the band from the lowest to the highest" in markdown
    groups = dict(_single_run_dots(load_run(run)))
    loss, accuracy = groups["sentiment (48 clients)"]
    assert loss.labels == QUANTILE_LABELS == accuracy.labels
    # losses 1.00, 1.01, ..., 1.47: numpy's linear percentiles at 35.25 and 11.75 of 47
    np.testing.assert_allclose(loss.values, [1.47, 1.3525, 1.235, 1.1175, 1.0])
    assert loss.reference == pytest.approx(1.235)
    assert accuracy.values == [0.5] * 5


def test_twenty_clients_a_panel_keep_one_dot_and_one_line_each(tmp_path: Path) -> None:
    """20 clients a task is the most drawn one by one: the per-task dots and the mix weight
    (a panel per task) show every client; the loss plot's one panel holds all 40 and
    summarises them."""
    from mira.results.report import _single_run_dots

    run = tmp_path / "run"
    write_many_clients_run(run, 20)
    write_report(run)
    markdown = ReportFiles(run).report_md.read_text()
    assert "quantiles" not in markdown
    assert "(one panel per task, one line per client)." in markdown
    assert "colour = task; one line per client; a panel of more than 20 clients" in markdown
    loss = dict(_single_run_dots(load_run(run)))["qa"][0]
    assert loss.labels == [f"qa-{i}" for i in range(20)]
    np.testing.assert_allclose(loss.values, 1.0 + 0.01 * np.arange(20))


def test_task_spread_is_each_tasks_median_and_range_per_round() -> None:
    from mira.results.plots import task_spread

    curves = {
        "a-0": (np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0])),
        "a-1": (np.array([1, 2, 3]), np.array([3.0, 4.0, 5.0])),
        "a-2": (np.array([1, 3]), np.array([2.0, 10.0])),  # no row in round 2
        "b-0": (np.array([2, 3]), np.array([7.0, math.nan])),
    }
    spread = task_spread(curves, {c: c[0] for c in curves})
    rounds, median, low, high = spread["a"]
    np.testing.assert_array_equal(rounds, [1, 2, 3])
    np.testing.assert_allclose(median, [2.0, 3.0, 5.0])
    np.testing.assert_allclose(low, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(high, [3.0, 4.0, 10.0])
    rounds, median, low, high = spread["b"]  # round 3 has no value: left out
    np.testing.assert_array_equal(rounds, [2])
    assert (median[0], low[0], high[0]) == (7.0, 7.0, 7.0)


def test_a_task_graph_names_clients_up_to_forty_then_its_clusters(tmp_path: Path) -> None:
    from mira.results.plots import MAX_LABELLED, plot_adjacency

    def graph(num: int) -> tuple[np.ndarray, list[str], list[int]]:
        labels = [k % 2 for k in range(num)]
        adjacency = np.array(
            [[float(a == b and k != j) for j, b in enumerate(labels)] for k, a in enumerate(labels)]
        )
        return adjacency, [f"client-{k}" for k in range(num)], labels

    named = plot_adjacency(*graph(MAX_LABELLED), tmp_path / "named.png")
    assert imread(named).shape[:2] == (1650, 1770)  # 0.35 in a client + 2.5 in (+ 1.2 in)
    clustered = plot_adjacency(*graph(MAX_LABELLED + 1), tmp_path / "clusters.png")
    assert imread(clustered).shape[:2] == (900, 1020)


def printed_rows(text: str, title: str) -> dict[str, list[str]]:
    """The rows of the table that follows the line starting with ``title`` in the terminal
    text, by first cell (header and rule left out)."""
    after = ("\n" + text).split("\n" + title, 1)[1].splitlines()[1:]
    table = [line for line in itertools.takewhile(lambda line: line.startswith("|"), after)]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    return {cells[0]: cells[1:] for cells in rows}


def test_mira_run_prints_each_task_and_the_worst_clients_of_a_large_run(tmp_path: Path) -> None:
    """More than 24 clients: the per-task table and the ten clients of the highest loss,
    not a screenful of rows; report.md keeps every client."""
    run = tmp_path / "run"
    write_many_clients_run(run, 30)
    write_report(run)
    printed = final_table(run)
    assert len(printed.splitlines()) < 30
    tasks = printed_rows(printed, "Per task after round 2")
    # a task's losses 1.00 ... 1.29: mean 1.145, worst 1.29 (its client 29)
    assert tasks["sentiment"][:4] == ["sentiment-29", "30", "1.145", "1.290"]
    assert tasks["qa"][:4] == ["qa-29", "30", "1.145", "1.290"]
    worst = printed_rows(printed, "Personalised eval loss after round 2")
    assert list(worst)[:2] == ["sentiment-29", "qa-29"]  # highest first
    assert set(worst) == {f"{task}-{i}" for task in ("sentiment", "qa") for i in range(25, 30)}
    assert "the 10 clients of the highest loss" in printed
    assert f"every one of the 60 clients: {ReportFiles(run).report_md}" in printed
    markdown = ReportFiles(run).report_md.read_text()
    assert all(f"| qa-{i} " in markdown for i in range(30))
