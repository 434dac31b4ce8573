"""The command line: config TOML round trip, suggestions, output folders, compare's summary,
diff's locations."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from mira.cli import build_parser, main
from mira.config import load_config
from mira.results.rundir import RunLock
from mira.results.schema import ClientRow, ComparisonLayout, RunLayout
from test_compare import (
    CLIENTS,
    make_comparison_dir,
    raw_config,
    rewrite_client_rows,
    write_fake_run,
)


def test_config_show_prints_toml_that_loads_back_to_the_same_config(tmp_path: Path, capsys) -> None:
    assert main(["config", "--show"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("# mira config") and "\n[server]\n" in shown
    path = tmp_path / "shown.toml"
    path.write_text(shown)
    assert load_config(path) == load_config(None)
    assert tomllib.loads(shown)["server"]["method"] == "mira"


def test_config_show_of_a_file_with_overrides_round_trips(tmp_path: Path, capsys) -> None:
    source = tmp_path / "mine.toml"
    source.write_text(tomli_w.dumps(raw_config(rounds=4)))
    overrides = [
        "server.step=auto",
        "data.val_size=8",
        "tasks.1.clients=3",
        "lora.ranks=[4, 8, 8, 4, 4]",
    ]
    assert main(["config", "--show", str(source), *(f"--set={o}" for o in overrides)]) == 0
    shown = tmp_path / "shown.toml"
    shown.write_text(capsys.readouterr().out)
    expected = load_config(source, overrides)
    assert load_config(shown) == expected
    assert expected.server.step == "auto" and expected.federation.rounds == 4
    # and `mira run` takes it as it is: it gets as far as refusing the occupied folder
    occupied = tmp_path / "occupied"
    write_fake_run(occupied, "mira", 1)
    assert main(["run", str(shown), "--out", str(occupied)]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message", "suggestion"),
    [
        ("server.stpe=0.1", "unknown key server.stpe; allowed keys: ", "server.step"),
        ("server.method=mirra", "server.method = 'mirra' is not allowed; choose", "mira"),
        ("server.step=atuo", "must be a number or one of: auto; got 'atuo'", "auto"),
        ("tasks.0.clints=2", "unknown key tasks[0].clints; allowed keys: ", "tasks[0].clients"),
    ],
)
def test_a_typo_gets_a_suggestion(override: str, message: str, suggestion: str, capsys) -> None:
    assert main(["config", "--show", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mira: config error: ") and message in err
    assert err.endswith(f"; did you mean {suggestion}?")


def test_no_suggestion_when_nothing_is_close(capsys) -> None:
    assert main(["config", "--show", "--set", "server.method=zzz"]) == 2
    assert "did you mean" not in capsys.readouterr().err


def test_run_refuses_a_folder_with_a_run_without_calling_it_a_config_error(
    tmp_path: Path, capsys
) -> None:
    write_fake_run(tmp_path / "run", "mira", 1)
    assert main(["run", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "config error" not in err
    assert err.strip() == (
        f"mira: {tmp_path / 'run'} already holds a run; continue it with "
        f"`mira run --resume {tmp_path / 'run'}` or choose another --out"
    )


def test_resume_refuses_a_folder_another_process_is_writing(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "run"
    write_fake_run(folder, "mira", 1)
    RunLayout(folder).config.write_text(tomli_w.dumps(raw_config()))
    lock = RunLock(folder)
    try:
        assert main(["run", "--resume", str(folder)]) == 1
    finally:
        lock.release()
    assert "is in use by another mira run" in capsys.readouterr().err


def test_run_writes_into_a_fresh_timestamped_folder_by_default() -> None:
    args = build_parser().parse_args(["run"])
    assert args.out is None  # resolved to runs/run-YYYYMMDD-HHMMSS by rundir.default_run_dir


def test_compare_ends_with_a_short_summary_and_the_path_of_the_tables(
    tmp_path: Path, capsys
) -> None:
    root = make_comparison_dir(tmp_path / "cmp")  # every run already complete: nothing trains
    config = tmp_path / "compare.toml"
    config.write_text(tomli_w.dumps(raw_config()))
    argv = ["compare", str(config), "--methods", "mira,local", "--seeds", "1,2", "--out", str(root)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = {
        cells[0]: cells[1:]
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| method")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert rows["mira"] == ["2", "2.433 ± 0.141", "4.100 ± 0.141"]
    assert rows["local"] == ["2", "3.100 ± 0.141", "5.100 ± 0.141"]
    assert f"all tables: {ComparisonLayout(root).summary_md}" in out
    assert "Per client" not in out and "Paired by seed" not in out  # not all of comparison.md
    assert "## Paired by seed" in ComparisonLayout(root).summary_md.read_text()


def test_diff_names_the_round_client_and_tensor_of_the_largest_difference(
    tmp_path: Path, capsys
) -> None:
    from safetensors.numpy import save_file

    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        write_fake_run(folder, "mira", 1)

    def shifted(row: ClientRow) -> None:
        assert row.eval_loss is not None
        if row.round == 1:
            row.eval_loss += 0.01
        if (row.round, row.client) == (2, "sentiment-1"):
            row.eval_loss += 0.3

    rewrite_client_rows(second, shifted)
    for folder, shift in ((first, 0.0), (second, 0.125)):
        for client, _ in CLIENTS:
            RunLayout(folder).adapter(client).dir.mkdir(parents=True)
            tensors = {
                "a.lora_A": np.zeros((2, 3), dtype=np.float32),
                "a.lora_B": np.full((3, 2), shift if client == "qa-0" else 0.0, dtype=np.float32),
            }
            save_file(tensors, str(RunLayout(folder).adapter(client).weights))
    assert main(["diff", str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"largest \|difference\| 0\.3 at round 2, client sentiment-1 \(2 in .*a, 2\.3 in .*b\)",
        out,
    ), out
    assert "adapters: 3 clients, largest |difference| 0.125 at client qa-0, tensor a.lora_B" in out
