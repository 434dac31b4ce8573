"""Reading finished runs back: one run directory, or every run of a comparison directory.

Layout of a comparison directory ``DIR`` (written by :mod:`mira.experiments.compare`; the
names are :class:`mira.results.schema.ComparisonLayout`'s)::

    comparison.json             what was asked: command lines, config source, methods, seeds
    runs/<method>/seed-<s>/     one ordinary run directory (see mira.results.rundir), plus
        run.json                start, end and wall-clock seconds of the run
        DONE                    written only after the run returned with its last round
    comparison.csv              one row per method: mean and std over seeds of every statistic
    comparison_clients.csv      one row per method and client, mean and std over seeds
    comparison.md               the same as readable tables

A method label is a server rule, optionally with its own overrides after '@'
(``mira@server.step=0.1``); :func:`rule_of` gives the rule.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mira.config import METHODS
from mira.results.errors import ResultsError, RunDirError
from mira.results.files import write_json
from mira.results.rundir import read_metrics
from mira.results.schema import ComparisonLayout, RunLayout, RunRecord
from mira.results.stats import summarise_runs


def run_folder(out_dir: Path, method: str, seed: int) -> Path:
    """Where the run of ``method`` with ``seed`` lives in a comparison directory."""
    return ComparisonLayout(out_dir).run(method, seed).dir


def rule_of(method: str) -> str:
    """The server rule of a method label: ``'mira@server.step=0.1'`` -> ``'mira'``."""
    return method.split("@", 1)[0]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except ValueError as err:
        raise RunDirError(f"{path} is not valid JSON ({err}); restore or delete it") from None
    if not isinstance(payload, dict):
        raise RunDirError(f"{path} does not hold a JSON object; restore or delete it")
    return payload


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """comparison.json (what was asked), or an empty manifest when there is none."""
    path = ComparisonLayout(out_dir).manifest
    manifest: dict[str, Any] = {"methods": [], "seeds": [], "commands": []}
    if path.is_file():
        manifest.update(_read_json(path))
    return manifest


def update_run_info(folder: Path, fields: dict[str, Any]) -> Path:
    """Merge ``fields`` into the run's run.json (what ran where: the device and dtype the
    clients train on, the privacy spent; a comparison adds its start, end and seconds)."""
    path = RunLayout(folder).run_info
    info = _read_json(path) if path.is_file() else {}
    info.update(fields)
    return write_json(path, info)


def load_run(folder: Path, method: str | None = None, seed: int | None = None) -> RunRecord:
    """Read one run directory; method and seed default to what the run recorded."""
    folder = Path(folder)
    layout = RunLayout(folder)
    rows = read_metrics(folder)
    info = _read_json(layout.run_info) if layout.run_info.is_file() else {}
    if method is None:
        recorded = [r.method for r in rows.all() if r.method]
        method = recorded[0] if recorded else "run"
    if seed is None and layout.config.is_file():
        stored = tomllib.loads(layout.config.read_text())
        seed = stored.get("federation", {}).get("seed")
    return RunRecord(method, seed, folder, rows, info)


def _method_order(out_dir: Path, found: Iterable[str]) -> list[str]:
    asked = read_manifest(out_dir)["methods"]
    found = set(found)
    known = [m for m in asked if m in found]
    rest = sorted(found - set(known), key=lambda m: (_rule_order(m), m))
    return known + rest


def _rule_order(method: str) -> int:
    rule = rule_of(method)
    return METHODS.index(rule) if rule in METHODS else len(METHODS)


def collect_runs(out_dir: Path) -> tuple[list[RunRecord], list[Path]]:
    """Finished runs of a comparison directory (method order as asked, seeds ascending),
    and the folders of runs that are not finished (left out of every table)."""
    out_dir = Path(out_dir)
    layout = ComparisonLayout(out_dir)
    if not layout.runs.is_dir():
        raise ResultsError(
            f"{out_dir} holds no {layout.runs.name}/ folder; is it a comparison directory?"
        )
    by_method: dict[str, list[tuple[int, RunLayout]]] = {}
    for method, seed, run in layout.run_folders():
        by_method.setdefault(method, []).append((seed, run))
    complete, incomplete = [], []
    for method in _method_order(out_dir, by_method):
        for seed, run in sorted(by_method[method], key=lambda found: found[0]):
            if run.done.is_file() and run.metrics.is_file():
                complete.append(load_run(run.dir, method, seed))
            else:
                incomplete.append(run.dir)
    return complete, incomplete


def summarise_comparison(out_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """:func:`mira.results.stats.summarise_runs` over the finished runs of a comparison."""
    complete, _ = collect_runs(out_dir)
    return summarise_runs(complete)
