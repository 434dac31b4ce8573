"""mira compare: planning, skipping and re-running, and the aggregated numbers.

A fake runner writes synthetic run directories with fixed numbers, so every statistic in
comparison.csv is checked against a value computed by hand below. The real Simulation Engine
on the tiny model: tests/e2e/test_compare_runs.py.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from mira.config import Config, ConfigError
from mira.experiments.compare import CompareError, parse_methods, parse_seeds, run_comparison
from mira.results.diff import DiffError
from mira.results.document import Table, markdown_table
from mira.results.report import write_comparison
from mira.results.rundir import read_metrics
from mira.results.runs import run_folder, summarise_comparison
from mira.results.schema import (
    ClientRow,
    ComparisonLayout,
    RoundRow,
    RunLayout,
    encode_row,
)

CLIENTS = [("sentiment-0", "sentiment"), ("sentiment-1", "sentiment"), ("qa-0", "qa")]
# Final-round personalised eval loss of each client (order of CLIENTS) at seed 1; every seed
# above 1 adds SEED_SHIFT * (seed - 1) to every client. Round 1 is 0.5 higher.
FINAL_LOSS = {"mira": [1.0, 2.0, 4.0], "local": [1.5, 2.5, 5.0], "fedit": [2.0, 2.0, 2.0]}
SEED_SHIFT = 0.2
ACCURACY = {"mira": [0.5, 0.75], "local": [0.25, 0.5], "fedit": [0.5, 0.5]}  # + 0.05 (seed - 1)
TOKEN_F1 = {"mira": 0.3, "local": 0.2, "fedit": 0.1}  # qa-0; + 0.1 (seed - 1)
BYTES_UP = [300, 500]  # round totals
BYTES_DOWN = [600, 1000]


def raw_config(rounds: int = 2) -> dict:
    return {
        "model": {"name": "tiny-random-llama"},
        "federation": {"rounds": rounds},
        "tasks": [
            {
                "name": "sentiment",
                "clients": 2,
                "path": "sentiment.jsonl",
                "kind": "classification",
                "verbalisers": ["positive", "negative"],
            },
            {"name": "qa", "clients": 1, "path": "qa.jsonl", "kind": "generation"},
        ],
    }


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "compare.toml"
    path.write_text(tomli_w.dumps(raw_config()))
    return path


def write_fake_run(
    folder: Path,
    method: str,
    seed: int,
    cfg: Config | None = None,
    rounds: int = 2,
    seconds: float | None = None,
) -> None:
    """A run directory as mira.results.rundir writes it, with the fixed numbers above."""
    folder.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        RunLayout(folder).config.write_text(tomli_w.dumps(cfg.to_dict()))
    lines = []
    for rnd in range(1, rounds + 1):
        rows = []
        for index, (client, task) in enumerate(CLIENTS):
            loss = FINAL_LOSS[method][index] + SEED_SHIFT * (seed - 1) + 0.5 * (rounds - rnd)
            if task == "sentiment":
                metrics = {"accuracy": ACCURACY[method][index] + 0.05 * (seed - 1)}
            else:
                metrics = {"token_f1": TOKEN_F1[method] + 0.1 * (seed - 1)}
            row = ClientRow(
                round=rnd,
                client=client,
                task=task,
                method=method,
                rank=8,
                sampled=True,
                train_loss=loss + 0.1,
                eval_loss=loss,
                bytes_up=BYTES_UP[(rnd - 1) % 2] // 3,
                bytes_down=BYTES_DOWN[(rnd - 1) % 2] // 3,
                mix_weight=None,  # as a run from before mira recorded it
                peak_memory_mb=100.0 + 50.0 * (rnd - 1) + seed,
                metrics=metrics,
            )
            rows.append(row)
        losses = [r.eval_loss for r in rows if r.eval_loss is not None]
        aggregate = RoundRow(
            round=rnd,
            method=method,
            seconds=1.5,
            personalised_eval_loss_mean=float(np.mean(losses)),
            personalised_eval_loss_worst=float(np.max(losses)),
            personalised_eval_loss_std=float(np.std(losses)),
            train_loss_mean=float(np.mean(losses)) + 0.1,
            mix_weight_mean=None,
            clients_trained=len(rows),
            bytes_up=BYTES_UP[(rnd - 1) % 2],
            bytes_down=BYTES_DOWN[(rnd - 1) % 2],
            peak_memory_mb=max(r.peak_memory_mb or 0.0 for r in rows),
        )
        lines += [*(encode_row(r) for r in rows), encode_row(aggregate)]
    RunLayout(folder).metrics.write_text("\n".join(lines) + "\n")
    adjacency = [[0.0, 0.5, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]
    graph = {
        "source": "tasks",
        "clients": [c for c, _ in CLIENTS],
        "tasks": [t for _, t in CLIENTS],
        "clusters": [0, 0, 1],
        "adjacency": adjacency,
        "degree": [0.5, 0.5, 0.0],
        "step": 0.1,
    }
    RunLayout(folder).graph.write_text(json.dumps(graph))
    if seconds is not None:
        RunLayout(folder).run_info.write_text(json.dumps({"seconds": seconds}))
        RunLayout(folder).done.write_text("done\n")


def rewrite_client_rows(folder: Path, change: Callable[[ClientRow], None]) -> None:
    """Apply ``change`` to every client row of a run's metrics.jsonl, in place."""
    rows = read_metrics(folder)
    for row in rows.clients:
        change(row)
    lines = [
        encode_row(r) + "\n"
        for n in sorted(rows.recorded_rounds())
        for r in [*rows.clients_of(n), rows.round_row(n)]
        if r is not None
    ]
    RunLayout(folder).metrics.write_text("".join(lines))


SECONDS = {("mira", 1): 10.0, ("mira", 2): 14.0, ("local", 1): 5.0, ("local", 2): 5.0}


def make_comparison_dir(root: Path) -> Path:
    """mira and local with seeds 1 and 2, fedit with seed 1, as a finished comparison."""
    for (method, seed), seconds in [*SECONDS.items(), (("fedit", 1), 7.0)]:
        write_fake_run(run_folder(root, method, seed), method, seed, seconds=seconds)
    return root


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    key = "client" if "client" in rows[0] else "method"
    return {(r["method"], r[key]) if key == "client" else r["method"]: r for r in rows}


def approx(value: float) -> object:
    return pytest.approx(value, rel=1e-9, abs=1e-12)


class FakeRunner:
    """Writes a synthetic run from the config it is given; records every call."""

    def __init__(self, rounds: int | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.rounds = rounds

    def __call__(self, cfg: Config, folder: Path) -> None:
        self.calls.append((cfg.server.method, cfg.federation.seed))
        rounds = self.rounds or cfg.federation.rounds
        write_fake_run(folder, cfg.server.method, cfg.federation.seed, cfg, rounds=rounds)


# ------------------------------------------------------------------------------ numbers
def test_comparison_csv_holds_means_and_stds_over_seeds(tmp_path: Path) -> None:
    root = make_comparison_dir(tmp_path)
    write_comparison(root)
    rows = read_csv(ComparisonLayout(root).summary_csv)
    assert list(rows) == ["mira", "fedit", "local"]  # canonical method order without a manifest

    mira = rows["mira"]
    assert mira["seeds"] == "2" and mira["seed_list"] == "1 2"
    # seed 1: mean(1, 2, 4) = 7/3; seed 2: every client + 0.2
    assert float(mira["personalised_loss_mean"]) == approx(7 / 3 + 0.1)
    assert float(mira["personalised_loss_mean_std"]) == approx(0.2 / math.sqrt(2))
    assert float(mira["personalised_loss_worst"]) == approx(4.1)
    assert float(mira["personalised_loss_worst_std"]) == approx(0.2 / math.sqrt(2))
    assert float(mira["personalised_loss_spread"]) == approx(np.std([1.0, 2.0, 4.0]))
    assert float(mira["personalised_loss_spread_std"]) == approx(0.0)
    assert float(mira["personalised_loss[sentiment]"]) == approx(1.6)
    assert float(mira["personalised_loss[qa]"]) == approx(4.1)
    # accuracy only on the two sentiment clients: (0.5 + 0.75) / 2 = 0.625, then + 0.05
    assert float(mira["accuracy"]) == approx(0.65)
    assert float(mira["accuracy_std"]) == approx(0.05 / math.sqrt(2))
    assert float(mira["accuracy[sentiment]"]) == approx(0.65)
    assert "accuracy[qa]" not in mira
    assert float(mira["token_f1"]) == approx(0.35)
    assert float(mira["token_f1[qa]"]) == approx(0.35)
    assert float(mira["token_f1_std"]) == approx(0.1 / math.sqrt(2))
    assert float(mira["bytes_up_per_round"]) == approx(400.0)
    assert float(mira["bytes_down_per_round"]) == approx(800.0)
    assert float(mira["exchanged_bytes_up_per_round"]) == approx(400.0)
    assert float(mira["exchanged_bytes_down_per_round"]) == approx(800.0)
    assert float(mira["wall_seconds"]) == approx(12.0)
    assert float(mira["wall_seconds_std"]) == approx(math.sqrt(8.0))
    assert float(mira["peak_memory_mb"]) == approx(151.5)  # max over rounds: 151 and 152

    local = rows["local"]
    assert float(local["personalised_loss_mean"]) == approx(3.1)
    assert float(local["personalised_loss_worst"]) == approx(5.1)
    assert float(local["accuracy"]) == approx(0.4)
    assert float(local["wall_seconds_std"]) == approx(0.0)
    # local exchanges nothing; the harness's round trip through the server is measured apart
    assert float(local["exchanged_bytes_up_per_round"]) == 0.0
    assert float(local["exchanged_bytes_down_per_round"]) == 0.0
    assert float(local["bytes_up_per_round"]) == approx(400.0)

    fedit = rows["fedit"]  # one seed: no std
    assert fedit["seeds"] == "1"
    assert float(fedit["personalised_loss_mean"]) == approx(2.0)
    assert float(fedit["personalised_loss_spread"]) == approx(0.0)
    assert fedit["personalised_loss_mean_std"] == ""

    clients = read_csv(ComparisonLayout(root).clients_csv)
    assert float(clients[("mira", "sentiment-0")]["personalised_loss"]) == approx(1.1)
    assert float(clients[("mira", "sentiment-0")]["personalised_loss_std"]) == approx(
        0.2 / math.sqrt(2)
    )
    assert float(clients[("local", "qa-0")]["personalised_loss"]) == approx(5.1)
    assert float(clients[("local", "qa-0")]["token_f1"]) == approx(0.25)
    assert clients[("local", "qa-0")].get("accuracy", "") == ""
    assert float(clients[("mira", "sentiment-1")]["accuracy"]) == approx(0.775)


def test_summary_matches_csv_and_markdown_says_personalised(tmp_path: Path) -> None:
    root = make_comparison_dir(tmp_path)
    rows, per_client = summarise_comparison(root)
    assert [r["method"] for r in rows] == ["mira", "fedit", "local"]
    assert len(per_client) == 9
    write_comparison(root)
    text = ComparisonLayout(root).summary_md.read_text()
    assert "2.433 ± 0.141" in text  # mira mean loss: 4 digits of the table's largest, 5.100
    fedit = next(line for line in text.splitlines() if line.startswith("| fedit "))
    assert [c.strip() for c in fedit.split("|")[2:6]] == ["1", "2.000", "2.000", "0.000"]
    local = next(line for line in text.splitlines() if line.startswith("| local "))
    assert "1.472 ± 0.000" in local  # equal spreads over seeds: a std of 0, not 2e-16
    assert "personalised" in text.lower()
    assert "fedit and cluster-merge the personalised adapter is the shared global model" in text
    assert "global loss" not in text.lower() and "global eval" not in text.lower()
    assert "accuracy[sentiment]" in text
    # tables are aligned: every line of a table has the same width
    for block in text.split("\n\n"):
        lines = block.splitlines()
        if lines and lines[0].startswith("|"):
            assert len({len(line) for line in lines}) == 1, block


def test_markdown_table_is_aligned() -> None:
    table = Table("t", ["method", "value"], [["mira", "1.234"], ["cluster-fedavg", "10"]])
    lines = markdown_table(table).splitlines()
    assert lines == [
        "| method         | value |",
        "| -------------- | ----: |",
        "| mira           | 1.234 |",
        "| cluster-fedavg |    10 |",
    ]


def test_parse_methods_and_seeds() -> None:
    assert parse_methods("mira, fedit,local") == ["mira", "fedit", "local"]
    assert parse_seeds("1,2,3") == [1, 2, 3]
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(CompareError):
        parse_seeds("one")
    with pytest.raises(CompareError):
        parse_methods(" , ")


# ------------------------------------------------------------------------------ running
def test_runs_every_cell_then_skips_completed_runs(tmp_path: Path, config_file: Path) -> None:
    out = tmp_path / "cmp"
    runner = FakeRunner()
    logs: list[str] = []
    result = run_comparison(
        str(config_file), [], ["mira", "local"], [1, 2], out, runner=runner, log=logs.append
    )
    assert result == out
    assert runner.calls == [("mira", 1), ("mira", 2), ("local", 1), ("local", 2)]
    for method, seed in runner.calls:
        folder = run_folder(out, method, seed)
        assert RunLayout(folder).done.is_file()
        info = json.loads(RunLayout(folder).run_info.read_text())
        assert info["method"] == method and info["seed"] == seed and info["seconds"] >= 0
    rows = read_csv(ComparisonLayout(out).summary_csv)
    assert float(rows["local"]["personalised_loss_mean"]) == approx(3.1)
    assert ComparisonLayout(out).summary_md.is_file()

    again = FakeRunner()
    run_comparison(str(config_file), [], ["mira", "local"], [1, 2], out, runner=again, log=print)
    assert again.calls == []

    more = FakeRunner()
    run_comparison(str(config_file), [], ["local", "fedit"], [2, 3], out, runner=more, log=print)
    assert more.calls == [("local", 3), ("fedit", 2), ("fedit", 3)]
    manifest = json.loads(ComparisonLayout(out).manifest.read_text())
    assert manifest["methods"] == ["mira", "local", "fedit"]
    assert len(manifest["commands"]) == 3
    assert manifest["commands"][0]["command"].startswith("mira compare ")
    assert list(read_csv(ComparisonLayout(out).summary_csv)) == ["mira", "local", "fedit"]


def test_incomplete_runs_are_rerun_from_scratch(tmp_path: Path, config_file: Path) -> None:
    out = tmp_path / "cmp"
    run_comparison(str(config_file), [], ["mira"], [1, 2, 3], out, runner=FakeRunner(), log=print)
    no_marker = run_folder(out, "mira", 1)
    RunLayout(no_marker).done.unlink()
    (no_marker / "stale.txt").write_text("from the interrupted run")
    short = run_folder(out, "mira", 2)  # DONE present but round 2 missing
    metrics = RunLayout(short).metrics.read_text().splitlines()
    RunLayout(short).metrics.write_text("\n".join(metrics[:4]) + "\n")

    runner = FakeRunner()
    run_comparison(str(config_file), [], ["mira"], [1, 2, 3], out, runner=runner, log=print)
    assert runner.calls == [("mira", 1), ("mira", 2)]
    assert not (no_marker / "stale.txt").exists()
    assert RunLayout(no_marker).done.is_file() and RunLayout(short).done.is_file()


def test_resume_hook_finishes_incomplete_runs_in_place(tmp_path: Path, config_file: Path) -> None:
    out = tmp_path / "cmp"
    run_comparison(str(config_file), [], ["mira"], [1, 2], out, runner=FakeRunner(), log=print)
    folder = run_folder(out, "mira", 2)
    RunLayout(folder).done.unlink()
    (folder / "keep.txt").write_text("resume needs what is here")
    resumed: list[Path] = []

    def resume(cfg: Config, where: Path) -> None:
        assert (where / "keep.txt").is_file()
        resumed.append(where)

    runner = FakeRunner()
    run_comparison(
        str(config_file), [], ["mira"], [1, 2], out, runner=runner, resume=resume, log=print
    )
    assert runner.calls == [] and resumed == [folder]
    assert json.loads(RunLayout(folder).run_info.read_text())["resumed"] is True
    assert RunLayout(folder).done.is_file()


def test_bad_method_fails_before_any_run(tmp_path: Path, config_file: Path) -> None:
    out = tmp_path / "cmp"
    runner = FakeRunner()
    with pytest.raises(ConfigError, match=r"server\.method"):
        run_comparison(str(config_file), [], ["mira", "fedavg"], [1], out, runner=runner)
    assert runner.calls == []
    assert not out.exists()


def test_bad_override_and_owned_keys_fail_before_any_run(tmp_path: Path, config_file: Path) -> None:
    runner = FakeRunner()
    with pytest.raises(ConfigError, match=r"federation\.rounds"):
        run_comparison(
            str(config_file), ["federation.rounds=0"], ["mira"], [1], tmp_path, runner=runner
        )
    with pytest.raises(CompareError, match=r"server\.method"):
        run_comparison(
            str(config_file), ["server.method=fedit"], ["mira"], [1], tmp_path, runner=runner
        )
    assert runner.calls == []


def test_a_run_with_a_different_config_is_refused(tmp_path: Path, config_file: Path) -> None:
    out = tmp_path / "cmp"
    run_comparison(str(config_file), [], ["mira"], [1], out, runner=FakeRunner(), log=print)
    runner = FakeRunner()
    with pytest.raises(CompareError, match=r"server\.step: 0\.1 -> 0\.2"):
        run_comparison(
            str(config_file), ["server.step=0.2"], ["mira"], [1], out, runner=runner, log=print
        )
    # how many workers run the clients does not change the results: the run is reused
    run_comparison(
        str(config_file), ["federation.workers=2"], ["mira"], [1], out, runner=runner, log=print
    )
    assert runner.calls == []


def test_auto_keys_matter_only_to_an_auto_run(tmp_path: Path, config_file: Path) -> None:
    out = tmp_path / "cmp"
    methods = ["local", "mira", "mira@server.step=auto"]
    val = ["data.val_size=2"]
    run_comparison(str(config_file), val, methods, [1], out, runner=FakeRunner(), log=print)
    # local and fixed-step mira never read the auto keys: their runs are reused ...
    runner = FakeRunner()
    smoother = [*val, "server.auto_smoothing=0.25"]
    run_comparison(str(config_file), smoother, methods[:2], [1], out, runner=runner, log=print)
    assert runner.calls == []
    # ... an auto run does, so it is not.
    with pytest.raises(CompareError, match=r"server\.auto\.smoothing: 0\.5 -> 0\.25"):
        run_comparison(str(config_file), smoother, methods, [1], out, runner=runner, log=print)


def test_a_runner_that_stops_early_is_not_marked_done(tmp_path: Path, config_file: Path) -> None:
    out = tmp_path / "cmp"
    with pytest.raises(CompareError, match="round 2"):
        run_comparison(str(config_file), [], ["mira"], [1], out, runner=FakeRunner(rounds=1))
    assert not RunLayout(run_folder(out, "mira", 1)).done.exists()


def _save_adapters(folder: Path, shift: float) -> None:
    from safetensors.numpy import save_file

    for index, (client, _) in enumerate(CLIENTS):
        RunLayout(folder).adapter(client).dir.mkdir(parents=True)
        tensors = {"lora_A": np.full((2, 3), float(index), dtype=np.float32)}
        tensors["lora_B"] = np.full((3, 2), index + shift, dtype=np.float32)
        save_file(tensors, str(RunLayout(folder).adapter(client).weights))


def test_diff_reports_the_largest_differences_of_two_runs(tmp_path: Path, capsys) -> None:
    from mira.cli import main
    from mira.results.diff import run_differences

    same_a, same_b, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_fake_run(same_a, "mira", 1)
    write_fake_run(same_b, "mira", 1)
    write_fake_run(other, "mira", 2)  # every loss SEED_SHIFT higher
    found = run_differences(same_a, same_b)
    assert (found.pairs, found.eval_loss, found.adapter) == (6, 0.0, None)
    assert run_differences(same_a, other).eval_loss == pytest.approx(SEED_SHIFT)

    _save_adapters(same_a, 0.0)
    _save_adapters(same_b, 0.25)
    found = run_differences(same_a, same_b)
    assert (found.clients_with_adapters, found.adapter) == (3, 0.25)
    assert main(["diff", str(same_a), str(same_b), "--atol", "0.3"]) == 0
    assert main(["diff", str(same_a), str(same_b), "--atol", "0.1"]) == 1
    assert "largest |difference| 0.25" in capsys.readouterr().out


def test_diff_refuses_runs_of_different_rounds_or_clients(tmp_path: Path) -> None:
    from mira.results.diff import run_differences

    write_fake_run(tmp_path / "two", "mira", 1, rounds=2)
    write_fake_run(tmp_path / "three", "mira", 1, rounds=3)
    with pytest.raises(DiffError, match=r"different \(round, client\) pairs.*\(3, "):
        run_differences(tmp_path / "two", tmp_path / "three")
    with pytest.raises(DiffError, match=r"has no metrics\.jsonl"):
        run_differences(tmp_path / "two", tmp_path)


def test_paired_table_subtracts_mira_seed_by_seed(tmp_path: Path) -> None:
    root = make_comparison_dir(tmp_path)
    write_comparison(root)
    text = ComparisonLayout(root).summary_md.read_text()
    section = text.split("## Paired by seed")[1].split("\n## ")[0]
    rows = {
        cells[0]: cells[1:]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| method")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    # local is 3 - 7/3 above mira on both seeds (a t-interval of width 0); fedit (seed 1
    # only) 1/3 below it, no interval. One format for every difference in the table.
    assert rows["local"] == ["2", "0.6667 ± 0.0000", "0.6667 to 0.6667", "0.6667 0.6667", "2 of 2"]
    assert rows["fedit"] == ["1", "-0.3333", "-", "-0.3333", "0 of 1"]
    # the paired table comes right after the main loss table
    assert text.index("## Personalised eval loss after") < text.index("## Paired by seed")
    assert text.index("## Paired by seed") < text.index("## Personalised eval loss per task")


def test_a_method_variant_carries_its_own_overrides(tmp_path):
    from mira.experiments.compare import parse_methods, plan_comparison

    methods = parse_methods("mira, mira@server.step=0.2@federation.rounds=3, local")
    planned = plan_comparison(None, [], methods, [1], tmp_path)
    by_label = {run.method: run for run in planned}
    assert by_label["mira"].cfg.server.step == 0.3  # the quickstart's own step
    variant = by_label["mira@server.step=0.2@federation.rounds=3"]
    assert variant.cfg.server.method == "mira" and variant.cfg.server.step == 0.2
    assert variant.cfg.federation.rounds == 3
    label = "mira@server.step=0.2@federation.rounds=3"
    assert variant.folder == ComparisonLayout(tmp_path).run(label, 1).dir
    with pytest.raises(CompareError, match="is chosen by mira compare"):
        parse_methods("mira@federation.seed=3")
    with pytest.raises(CompareError, match=r"is not a section\.key=value override"):
        parse_methods("mira@step")


def test_paired_differences_get_a_students_t_interval(tmp_path: Path) -> None:
    from scipy import stats

    from mira.results.report import write_report
    from mira.results.stats import t_interval

    # t-interval of [0.1, 0.3, 0.2]: 0.2 ± t(0.975, 2) 0.1 / sqrt(3), t(0.975, 2) = 4.3027
    low, high = t_interval([0.1, 0.3, 0.2])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert (low, high) == (approx(0.2 - half), approx(0.2 + half))
    assert t_interval([0.5]) is None

    root = tmp_path / "cmp"
    extra = {1: 0.0, 2: 0.3, 3: 0.15}  # local's client losses move by this on each seed
    for seed, shift in extra.items():
        write_fake_run(run_folder(root, "mira", seed), "mira", seed, seconds=1.0)
        folder = run_folder(root, "local", seed)
        write_fake_run(folder, "local", seed, seconds=1.0)

        def shifted(row: ClientRow, shift: float = shift) -> None:
            row.eval_loss = (row.eval_loss or 0.0) + shift

        rewrite_client_rows(folder, shifted)
    differences = [2 / 3 + s for s in extra.values()]
    mean, std = float(np.mean(differences)), float(np.std(differences, ddof=1))
    half = float(stats.t.ppf(0.975, 2)) * std / math.sqrt(3)
    assert (mean, std) == (approx(2 / 3 + 0.15), approx(0.15))
    expected = [
        "3",
        f"{mean:.3f} ± {std:.3f}",  # 3 decimals: the interval reaches 1.189
        f"{mean - half:.3f} to {mean + half:.3f}",
        " ".join(f"{d:.3f}" for d in differences),
        "3 of 3",
    ]
    assert expected[2] == "0.444 to 1.189"
    write_comparison(root)
    write_report(root)
    for path in (ComparisonLayout(root).summary_md, ComparisonLayout(root).report_md):
        text = path.read_text()
        section = text.split("## Paired by seed")[1].split("\n## ")[0]
        header = next(row for row in section.splitlines() if row.startswith("| method "))
        assert [c.strip() for c in header.strip("|").split("|")][2:4] == [
            "difference",
            "95% t-interval",
        ]
        line = next(row for row in section.splitlines() if row.startswith("| local "))
        assert [c.strip() for c in line.strip("|").split("|")][1:] == expected
