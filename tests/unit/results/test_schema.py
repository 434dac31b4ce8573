"""The rows of metrics.jsonl (mira.results.schema): every run folder the repository keeps still
reads, a row in today's format writes back byte for byte, and a row read back from a
checkpoint writes the line it would have written before."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mira.results.rundir import read_metrics
from mira.results.schema import (
    ClientRow,
    ComparisonLayout,
    RoundRow,
    RunLayout,
    client_row,
    decode_line,
    encode_row,
)

ARCHIVE = Path(__file__).resolve().parents[3] / "docs" / "results" / "archive"
RUNS = sorted(
    run.metrics
    for folder in sorted(ARCHIVE.iterdir())
    for _, _, run in ComparisonLayout(folder).run_folders()
    if run.metrics.is_file()
)
LINES = [line for path in RUNS for line in path.read_bytes().splitlines()]


def test_the_archive_is_there() -> None:
    assert len(LINES) > 5000


def test_every_archived_row_reads_and_keeps_every_value() -> None:
    """Rows of older mira versions lack keys added since: they read as the empty value, and
    every key and value a row holds comes back."""
    for line in LINES:
        original = json.loads(line)
        again = json.loads(encode_row(decode_line(line)))
        assert {k: again[k] for k in original} == original
        for key in again.keys() - original.keys():
            assert again[key] in (None, "ok"), (key, again[key])


def test_a_row_in_todays_format_writes_back_byte_for_byte() -> None:
    """Where a row holds the keys mira writes today, encoding it again gives the same bytes:
    the same keys, in the same order, the same number formatting."""
    current = 0
    for line in LINES:
        encoded = encode_row(decode_line(line))
        if json.loads(encoded).keys() == json.loads(line).keys():
            assert encoded.encode() == line
            current += 1
    assert current > 4000


def test_every_archived_run_reads_through_the_layout() -> None:
    comparisons = sorted(p for p in ARCHIVE.iterdir() if ComparisonLayout(p).runs.is_dir())
    assert comparisons
    for folder in comparisons:
        for _, _, run in ComparisonLayout(folder).run_folders():
            rows = read_metrics(run.dir)
            assert rows.rounds and rows.recorded_rounds() == {r.round for r in rows.clients}


def row(**changes) -> ClientRow:
    base = ClientRow(
        round=2,
        client="a-0",
        task="a",
        method="mira",
        rank=4,
        sampled=True,
        train_loss=1.5,
        eval_loss=1.25,
        bytes_up=10,
        bytes_down=20,
        mix_weight=0.5,
    )
    for name, value in changes.items():
        setattr(base, name, value)
    return base


def test_optional_fields_are_written_only_when_set_and_non_finite_numbers_as_null() -> None:
    plain = json.loads(encode_row(row()))
    assert "reason" not in plain and "epsilon" not in plain and "peak_memory_mb" not in plain
    private = row(epsilon=math.inf, metrics={"accuracy": math.nan})
    text = encode_row(private)
    assert "Infinity" not in text and "NaN" not in text
    back = decode_line(text.encode())
    assert isinstance(back, ClientRow)
    # present as null: NaN (so that it is written again), a task metric's null stays None
    assert back.epsilon is not None and math.isnan(back.epsilon)
    assert back.metrics == {"accuracy": None}
    assert encode_row(back) == text


def test_a_checkpointed_open_row_restores_to_the_same_line() -> None:
    open_row = row(status="failed", reason="client a-0: boom", epsilon=0.0)
    open_row.val_losses, open_row.candidates = [1.0, math.nan], [0.0, 0.5]
    restored = client_row(json.loads(json.dumps(open_row.to_dict(), allow_nan=True)))
    assert encode_row(restored) == encode_row(open_row)
    assert restored.epsilon == 0 and restored.reason == "client a-0: boom"


def test_a_round_row_keeps_its_task_metric_summaries_in_order() -> None:
    text = (
        '{"kind": "round", "round": 1, "method": "mira", "seconds": 1.5, '
        '"accuracy_mean": 0.5, "accuracy_worst": 0.25, "accuracy_worst_client": "a-1", '
        '"future_key": 3}'
    )
    back = decode_line(text.encode())
    assert isinstance(back, RoundRow)
    assert back.metrics["accuracy"].worst_client == "a-1" and back.extra == {"future_key": 3}


@pytest.mark.parametrize(
    "line",
    [b'{"kind": "client"}', b'{"kind": "other", "round": 1}', b"[1, 2]", b'{"round": 1}'],
)
def test_a_line_that_holds_no_row_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        decode_line(line)


def test_the_layout_names_each_file_once(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    files = [layout.lock, layout.config, layout.metrics, layout.graph, layout.graph_plot]
    files += [layout.run_info, layout.done, layout.report_md, layout.report_html, layout.state]
    assert len({p.name for p in files}) == len(files)
    assert layout.adapter("a-0").weights.parent == layout.adapters / "a-0"
    assert layout.checkpoint_adapters(3, "ab" * 32).parent == layout.checkpoint
    comparison = ComparisonLayout(tmp_path)
    assert comparison.run("mira", 2).dir.parent.parent == comparison.runs
    comparison.run("mira", 2).dir.mkdir(parents=True)
    assert [(m, s) for m, s, _ in comparison.run_folders()] == [("mira", 2)]
