"""Run several server rules on the same clients and seeds, and tabulate them fairly.

``mira compare`` is the harness behind the claims in DESIGN.md: every method (mira, fedit,
cluster-fedavg, cluster-merge, local) runs from the SAME config, so clients, data splits, the
shared LoRA initialisation and the data order are identical; they are all functions of the
config and ``federation.seed``. Only ``server.method`` and ``federation.seed`` vary.

Layout of a comparison directory ``DIR``::

    comparison.json             what was asked: command lines, config source, methods, seeds
    runs/<method>/seed-<s>/     one ordinary run directory (see mira.results.rundir), plus
        run.json                start, end and wall-clock seconds of the run
        DONE                    written only after the run returned with its last round
    comparison.csv              one row per method: mean and std over seeds of every statistic
    comparison_clients.csv      one row per method and client, mean and std over seeds
    comparison.md               the same as readable tables

Every number is *personalised*: each client's own adapter after the server rule, on its own
held-out split. Under fedit and cluster-merge that adapter is the one global model every client
receives; the tables say so rather than calling anything "global".
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import shlex
import shutil
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mira.config import METHODS, TASK_METRICS, Config, ConfigError, config_from_dict, load_config
from mira.federation.simulation import run_simulation

RUNS = "runs"
DONE = "DONE"
RUN_INFO = "run.json"
MANIFEST = "comparison.json"
# Keys that change how fast a run goes but not what it computes: a finished run stays
# reusable when only these differ.
OPERATIONAL_KEYS = ("federation.workers", "federation.timeout")
# Set by --methods and --seeds; an override of either would silently lose to them.
OWNED_KEYS = ("server.method", "federation.seed")

Runner = Callable[[Config, Path], None]
"""Runs one federation of a config into a directory (``run_simulation`` or a test fake)."""
Resume = Callable[[Config, Path], None]
"""Finishes an interrupted run in place from what its directory holds."""
Stat = float | None


class CompareError(ValueError):
    """A comparison cannot start or its directory holds something inconsistent."""


# ------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class PlannedRun:
    """One (method, seed) cell of the comparison, its validated config and its folder."""

    method: str
    seed: int
    cfg: Config
    folder: Path


def run_folder(out_dir: Path, method: str, seed: int) -> Path:
    return Path(out_dir) / RUNS / method / f"seed-{seed}"


def parse_methods(text: str) -> list[str]:
    """'mira,fedit' -> ['mira', 'fedit'] (names are checked later, by the config schema).

    An entry may carry its own overrides after '@': ``mira@server.step=0.1`` is the rule
    ``mira`` with ``server.step = 0.1``, next to a plain ``mira`` with the config's step; the
    whole entry names the variant in every table and folder.
    """
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise CompareError(f"--methods {text!r} names no method; choose from {', '.join(METHODS)}")
    for entry in methods:
        split_variant(entry)
    return methods


def split_variant(entry: str) -> tuple[str, list[str]]:
    """``'mira@server.step=0.1'`` -> ``('mira', ['server.step=0.1'])``."""
    method, *overrides = [part.strip() for part in entry.split("@")]
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if "=" not in text or "." not in key:
            raise CompareError(
                f"--methods entry {entry!r}: {text!r} is not a section.key=value override"
            )
        if key in OWNED_KEYS:
            raise CompareError(f"--methods entry {entry!r}: {key} is chosen by mira compare")
        if "/" in text:
            raise CompareError(f"--methods entry {entry!r} names a folder: no '/' allowed")
    return method, overrides


def parse_seeds(text: str) -> list[int]:
    """'1,2,3' or '1-3' -> [1, 2, 3]."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part.lstrip("-"):
                low, high = part.split("-", 1)
                seeds.extend(range(int(low), int(high) + 1))
            else:
                seeds.append(int(part))
        except ValueError as err:
            raise CompareError(f"--seeds {text!r}: {part!r} is not a seed or a range") from err
    if not seeds:
        raise CompareError(f"--seeds {text!r} names no seed")
    return seeds


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def plan_comparison(
    config_source: str | Path | None,
    overrides: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: Path,
) -> list[PlannedRun]:
    """Build and validate every (method, seed) config before anything runs.

    A bad method, key or value raises :class:`ConfigError` here, so a typo in the last method
    does not surface hours into the first one's training.
    """
    if not methods:
        raise CompareError("no methods to compare")
    if not seeds:
        raise CompareError("no seeds to run")
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key in OWNED_KEYS:
            raise CompareError(
                f"--set {text!r}: {key} is chosen by --methods / --seeds in mira compare"
            )
    planned = []
    for entry in _unique(methods):
        method, extra = split_variant(entry)
        for seed in _unique(seeds):
            cfg = load_config(
                config_source,
                [*overrides, *extra, f"server.method={method}", f"federation.seed={seed}"],
            )
            planned.append(PlannedRun(entry, seed, cfg, run_folder(out_dir, entry, seed)))
    return planned


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(cfg_dict))
    for key in OPERATIONAL_KEYS:
        section, name = key.split(".")
        out.get(section, {}).pop(name, None)
    return out


def config_differences(folder: Path, cfg: Config) -> list[str]:
    """Keys whose value in ``folder/config.toml`` differs from ``cfg`` (empty: same run).

    A folder without config.toml has nothing to compare and counts as the same run.
    """
    path = folder / "config.toml"
    if not path.is_file():
        return []
    try:
        stored = config_from_dict(tomllib.loads(path.read_text())).to_dict()
    except (tomllib.TOMLDecodeError, ConfigError) as err:
        return [f"config.toml unreadable ({err})"]
    old, new = _comparable(stored), _comparable(cfg.to_dict())
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            diffs.append(f"{section}: {a!r} -> {b!r}")
    return diffs


def has_final_round(folder: Path, rounds: int) -> bool:
    """metrics.jsonl holds the aggregate ("round") row of round ``rounds``."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        if row.get("kind") == "round" and row.get("round") == rounds:
            return True
    return False


def is_complete(folder: Path, rounds: int) -> bool:
    """Complete = the last configured round is recorded AND the DONE marker exists.

    Both are needed: the marker alone could outlive a metrics file rewritten by hand, and the
    final round alone could belong to a runner that crashed before returning.
    """
    return (folder / DONE).is_file() and has_final_round(folder, rounds)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


def canonical_command(
    config_source: str | Path | None,
    overrides: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: Path,
) -> str:
    """The ``mira compare`` command line that reproduces this comparison."""
    words = ["mira", "compare"]
    if config_source is not None:
        words.append(str(config_source))
    words += ["--methods", ",".join(methods), "--seeds", ",".join(str(s) for s in seeds)]
    for text in overrides:
        words += ["--set", text]
    words += ["--out", str(out_dir)]
    return shlex.join(words)


def _update_manifest(out_dir: Path, entry: dict[str, Any]) -> None:
    """Keep every command that wrote into this directory: a later call may add methods."""
    path = out_dir / MANIFEST
    manifest: dict[str, Any] = {"methods": [], "seeds": [], "commands": []}
    if path.is_file():
        manifest.update(json.loads(path.read_text()))
    manifest["methods"] = _unique([*manifest["methods"], *entry["methods"]])
    manifest["seeds"] = _unique([*manifest["seeds"], *entry["seeds"]])
    manifest["commands"] = [*manifest["commands"], entry]
    _write_json(path, manifest)


def _execute(
    run: PlannedRun, runner: Runner, resume: Resume | None, where: str, log: Callable[[str], None]
) -> None:
    """Run (or resume) one cell, check it reached its last round, then record and mark it."""
    rounds = run.cfg.federation.rounds
    resuming = resume is not None and run.folder.exists()
    if run.folder.exists() and not resuming:
        shutil.rmtree(run.folder)  # incomplete and no resume hook: start again from nothing
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / DONE).unlink(missing_ok=True)
    log(f"{where}: {'resuming' if resuming else 'running'} -> {run.folder}")
    started_at, started = _now(), time.monotonic()
    (resume if resume is not None and resuming else runner)(run.cfg, run.folder)
    seconds = time.monotonic() - started
    if not has_final_round(run.folder, rounds):
        raise CompareError(
            f"{where}: the run returned without recording round {rounds} in "
            f"{run.folder / 'metrics.jsonl'}"
        )
    _write_json(
        run.folder / RUN_INFO,
        {
            "method": run.method,
            "seed": run.seed,
            "start": started_at,
            "end": _now(),
            "seconds": round(seconds, 3),
            "resumed": resuming,
        },
    )
    (run.folder / DONE).write_text(_now() + "\n")
    log(f"{where}: done in {seconds:.0f}s")


def run_comparison(
    config_source: str | None,
    overrides: list[str],
    methods: list[str],
    seeds: list[int],
    out_dir: Path,
    runner: Runner = run_simulation,
    resume: Resume | None = None,
    *,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run every (method, seed) missing from ``out_dir``, then write the comparison tables.

    Args:
        config_source: TOML config path, or None for the packaged quickstart.
        overrides: 'section.key=value' applied to every run (not server.method/federation.seed).
        methods: server rules to compare; seeds: values of ``federation.seed``.
        out_dir: the comparison directory; runs go to ``runs/<method>/seed-<s>/``.
        runner: runs one federation (default: Flower's Simulation Engine).
        resume: finishes an incomplete run in place; None = delete it and run from scratch.
        command: command line recorded in comparison.md (default: the canonical one).
        log: receives one progress line per run.

    Returns ``out_dir``. Completed runs (see :func:`is_complete`) are skipped, so an
    interrupted comparison is continued by repeating the command. A run folder written with a
    different config is refused rather than reused or deleted.
    """
    out_dir = Path(out_dir)
    planned = plan_comparison(config_source, overrides, methods, seeds, out_dir)
    for run in planned:
        diffs = config_differences(run.folder, run.cfg)
        if diffs:
            raise CompareError(
                f"{run.folder} was run with a different config ({'; '.join(diffs[:5])}); "
                "use another --out or delete that folder"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    used_methods = _unique(methods)
    used_seeds = _unique(seeds)
    _update_manifest(
        out_dir,
        {
            "command": command
            or canonical_command(config_source, overrides, used_methods, used_seeds, out_dir),
            "config": None if config_source is None else str(config_source),
            "overrides": list(overrides),
            "methods": used_methods,
            "seeds": used_seeds,
            "at": _now(),
        },
    )
    for index, run in enumerate(planned, start=1):
        where = f"[{index}/{len(planned)}] {run.method} seed {run.seed}"
        if is_complete(run.folder, run.cfg.federation.rounds):
            log(f"{where}: complete, skipped ({run.folder})")
            continue
        _execute(run, runner, resume, where, log)
    write_comparison(out_dir)
    return out_dir


# ------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class RunRecord:
    """One finished run as read back from disk."""

    method: str
    seed: int | None
    folder: Path
    rows: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


def read_rows(folder: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, skipping a last line cut short by an interruption."""
    rows = []
    for line in (Path(folder) / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def load_run(folder: Path, method: str | None = None, seed: int | None = None) -> RunRecord:
    """Read one run directory; method and seed default to what the run recorded."""
    folder = Path(folder)
    rows = read_rows(folder)
    info_path = folder / RUN_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if method is None:
        method = next((str(r["method"]) for r in rows if "method" in r), "run")
    if seed is None and (folder / "config.toml").is_file():
        stored = tomllib.loads((folder / "config.toml").read_text())
        seed = stored.get("federation", {}).get("seed")
    return RunRecord(method, seed, folder, rows, info)


def _method_order(out_dir: Path, found: Iterable[str]) -> list[str]:
    path = out_dir / MANIFEST
    asked = json.loads(path.read_text()).get("methods", []) if path.is_file() else []
    found = set(found)
    known = [m for m in asked if m in found]
    rest = sorted(found - set(known), key=lambda m: (_rule_order(m), m))
    return known + rest


def _rule_order(entry: str) -> int:
    method = entry.split("@", 1)[0]
    return METHODS.index(method) if method in METHODS else 99


def collect_runs(out_dir: Path) -> tuple[list[RunRecord], list[Path]]:
    """Finished runs of a comparison directory (method order as asked, seeds ascending),
    and the folders of runs that are not finished (left out of every table)."""
    out_dir = Path(out_dir)
    root = out_dir / RUNS
    if not root.is_dir():
        raise CompareError(f"{out_dir} holds no {RUNS}/ folder; is it a comparison directory?")
    by_method: dict[str, list[tuple[int, Path]]] = {}
    for method_dir in root.iterdir():
        if not method_dir.is_dir():
            continue
        for seed_dir in method_dir.iterdir():
            name = seed_dir.name
            if seed_dir.is_dir() and name.startswith("seed-") and name[5:].isdigit():
                by_method.setdefault(method_dir.name, []).append((int(name[5:]), seed_dir))
    complete, incomplete = [], []
    for method in _method_order(out_dir, by_method):
        for seed, folder in sorted(by_method[method]):
            if (folder / DONE).is_file() and (folder / "metrics.jsonl").is_file():
                complete.append(load_run(folder, method, seed))
            else:
                incomplete.append(folder)
    return complete, incomplete


# ------------------------------------------------------------------------------ statistics
def _value(row: dict[str, Any], key: str) -> float:
    """A recorded number, NaN when absent or null (a diverged client stays visible as NaN)."""
    value = row.get(key)
    return math.nan if value is None else float(value)


def final_client_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    clients = [r for r in rows if r.get("kind") == "client"]
    if not clients:
        return []
    last = max(r["round"] for r in clients)
    return [r for r in clients if r["round"] == last]


def metric_names(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Task metrics present in any row, in the canonical order."""
    present = {k for r in rows for k in r}
    return [m for m in TASK_METRICS if m in present]


def run_statistics(run: RunRecord) -> dict[str, Stat]:
    """Statistics of one run after its final round.

    ``personalised_loss_mean`` / ``_worst`` / ``_spread``: mean, max and std (over clients,
    ddof 0 as in the round rows) of each client's personalised eval loss; ``<metric>`` and
    ``<metric>[<task>]``: mean over clients (of that task) of each task metric, and
    ``personalised_loss[<task>]`` likewise; bytes per round: mean over rounds of the round
    totals; ``peak_memory_mb``: max over rounds; ``wall_seconds``: from run.json.
    """
    final = final_client_rows(run.rows)
    rounds = [r for r in run.rows if r.get("kind") == "round"]
    losses = np.array([_value(r, "eval_loss") for r in final])
    stats: dict[str, Stat] = {
        "personalised_loss_mean": float(np.mean(losses)) if losses.size else None,
        "personalised_loss_worst": float(np.max(losses)) if losses.size else None,
        "personalised_loss_spread": float(np.std(losses)) if losses.size else None,
    }
    tasks = _unique(r["task"] for r in final)
    for task in tasks:
        of_task = [_value(r, "eval_loss") for r in final if r["task"] == task]
        stats[f"personalised_loss[{task}]"] = float(np.mean(of_task))
    for name in metric_names(final):
        stats[name] = float(np.mean([r[name] for r in final if r.get(name) is not None]))
        for task in tasks:
            values = [r[name] for r in final if r["task"] == task and r.get(name) is not None]
            if values:
                stats[f"{name}[{task}]"] = float(np.mean(values))
    up = [float(r["bytes_up"]) for r in rounds if r.get("bytes_up") is not None]
    down = [float(r["bytes_down"]) for r in rounds if r.get("bytes_down") is not None]
    memory = [float(r["peak_memory_mb"]) for r in rounds if r.get("peak_memory_mb") is not None]
    stats["bytes_up_per_round"] = float(np.mean(up)) if up else None
    stats["bytes_down_per_round"] = float(np.mean(down)) if down else None
    stats["wall_seconds"] = run.info.get("seconds")
    stats["peak_memory_mb"] = max(memory) if memory else None
    return stats


def mean_std(values: Sequence[Stat]) -> tuple[Stat, Stat]:
    """Mean and sample std (ddof 1) over seeds of the values that exist; std None below 2."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    mean = float(np.mean(present))
    if len(present) < 2:
        return mean, None
    std = float(np.std(present, ddof=1))
    # Equal values give a std of rounding noise (1e-16); show it as the 0 it is.
    return mean, (0.0 if std <= 1e-12 * max(1.0, abs(mean)) else std)


def summarise_runs(
    runs: Sequence[RunRecord],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per method (mean and std over seeds) and per method x client (mean over seeds).

    Row keys: ``method``, ``seeds`` (how many), ``seed_list``, then for every statistic of
    :func:`run_statistics` the mean over seeds under its name and the std under ``<name>_std``.
    Per-client keys: ``method``, ``client``, ``task``, ``seeds``, ``personalised_loss`` (+
    ``_std``) and each task metric (+ ``_std``).
    """
    methods = _unique(r.method for r in runs)
    rows: list[dict[str, Any]] = []
    per_client: list[dict[str, Any]] = []
    for method in methods:
        mine = [r for r in runs if r.method == method]
        stats = [run_statistics(r) for r in mine]
        names = _unique(k for s in stats for k in s)
        row: dict[str, Any] = {
            "method": method,
            "seeds": len(mine),
            "seed_list": " ".join(str(r.seed) for r in mine),
        }
        for name in names:
            row[name], row[f"{name}_std"] = mean_std([s.get(name) for s in stats])
        rows.append(row)
        finals = [final_client_rows(r.rows) for r in mine]
        order = _unique(c["client"] for final in finals for c in final)
        for client in order:
            seen = [c for final in finals for c in final if c["client"] == client]
            entry: dict[str, Any] = {
                "method": method,
                "client": client,
                "task": seen[0]["task"],
                "seeds": len(seen),
            }
            losses: list[Stat] = [_value(c, "eval_loss") for c in seen]
            entry["personalised_loss"], entry["personalised_loss_std"] = mean_std(losses)
            for name in metric_names(seen):
                entry[name], entry[f"{name}_std"] = mean_std([c.get(name) for c in seen])
            per_client.append(entry)
    return rows, per_client


def summarise_comparison(out_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """:func:`summarise_runs` over the finished runs of a comparison directory."""
    complete, _ = collect_runs(out_dir)
    return summarise_runs(complete)


# ------------------------------------------------------------------------------ tables
def fmt(value: Any) -> str:
    """4 significant digits (trailing zeros kept, so columns read alike), no exponent for
    large numbers; '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    rounded = float(f"{value:.4g}")
    if abs(rounded) >= 1e4:
        return f"{rounded:.0f}"
    return f"{rounded:#.4g}"


def fmt_pm(mean: Any, std: Any) -> str:
    """'mean ± std' (std over seeds), or the mean alone when there is one seed."""
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def _scaled(value: Any, factor: float) -> Any:
    return None if value is None else float(value) * factor


@dataclass(frozen=True)
class Table:
    """A titled table of already formatted cells; columns from ``numeric_from`` on are
    right-aligned."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    numeric_from: int = 1


def markdown_table(table: Table) -> str:
    """A GitHub markdown table padded so that it is aligned as plain text too."""
    widths = [
        max([3, len(table.header[i]), *(len(r[i]) for r in table.rows)])
        for i in range(len(table.header))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if i >= table.numeric_from else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        "-" * (w - 1) + ":" if i >= table.numeric_from else "-" * w for i, w in enumerate(widths)
    ]
    return "\n".join([line(table.header), "| " + " | ".join(rule) + " |", *map(line, table.rows)])


def _task_columns(rows: Sequence[dict[str, Any]], prefix: str) -> list[str]:
    return _unique(
        k for r in rows for k in r if k.startswith(prefix + "[") and not k.endswith("_std")
    )


def summary_tables(
    rows: Sequence[dict[str, Any]], per_client: Sequence[dict[str, Any]]
) -> list[Table]:
    """The readable tables of a summary: losses, task metrics, cost, then per client."""
    tables = [
        Table(
            "Personalised eval loss after the final round (lower is better)",
            ["method", "seeds", "mean over clients", "worst client", "spread (std over clients)"],
            [
                [
                    r["method"],
                    str(r["seeds"]),
                    *(
                        fmt_pm(r.get(k), r.get(f"{k}_std"))
                        for k in (
                            "personalised_loss_mean",
                            "personalised_loss_worst",
                            "personalised_loss_spread",
                        )
                    ),
                ]
                for r in rows
            ],
        )
    ]
    task_losses = _task_columns(rows, "personalised_loss")
    if task_losses:
        tables.append(
            Table(
                "Personalised eval loss per task, mean over the task's clients",
                ["method", *(k[len("personalised_loss[") : -1] for k in task_losses)],
                [
                    [r["method"], *(fmt_pm(r.get(k), r.get(f"{k}_std")) for k in task_losses)]
                    for r in rows
                ],
            )
        )
    metric_columns = [c for m in metric_names(rows) for c in [m, *_task_columns(rows, m)]]
    if metric_columns:
        tables.append(
            Table(
                "Personalised task metrics (higher is better): mean over clients, "
                "and per task as metric[task]",
                ["method", *metric_columns],
                [
                    [r["method"], *(fmt_pm(r.get(k), r.get(f"{k}_std")) for k in metric_columns)]
                    for r in rows
                ],
            )
        )
    tables.append(
        Table(
            "Cost",
            ["method", "MB up / round", "MB down / round", "wall time (s)", "peak memory (MB)"],
            [
                [
                    r["method"],
                    fmt_pm(
                        _scaled(r.get("bytes_up_per_round"), 1e-6),
                        _scaled(r.get("bytes_up_per_round_std"), 1e-6),
                    ),
                    fmt_pm(
                        _scaled(r.get("bytes_down_per_round"), 1e-6),
                        _scaled(r.get("bytes_down_per_round_std"), 1e-6),
                    ),
                    fmt_pm(r.get("wall_seconds"), r.get("wall_seconds_std")),
                    fmt_pm(r.get("peak_memory_mb"), r.get("peak_memory_mb_std")),
                ]
                for r in rows
            ],
            note="Bytes are the adapters sent by all clients (up) and to all clients (down) in "
            "one round, averaged over rounds; 1 MB = 10^6 bytes. Peak memory is the largest "
            "client process peak of the run.",
        )
    )
    if per_client:
        tables += per_client_tables(per_client)
    return tables


def paired_table(runs: Sequence[RunRecord]) -> Table | None:
    """Each method against mira on the seeds both finished: the per-seed difference of the
    mean personalised eval loss (method - mira), its mean and std over those seeds, and on how
    many of them mira was lower. Seeds change the client splits as well, so a difference
    within one seed is the sharper comparison than two means over seeds."""
    reference = "mira"
    means = {
        (r.method, r.seed): run_statistics(r)["personalised_loss_mean"]
        for r in runs
        if r.seed is not None
    }
    mine = {seed: v for (method, seed), v in means.items() if method == reference}
    others = _unique(r.method for r in runs if r.method != reference)
    if not mine or not others:
        return None
    body = []
    for method in others:
        differences = [
            value - mine[seed]  # type: ignore[operator]
            for (name, seed), value in sorted(means.items(), key=lambda item: item[0][1])
            if name == method and seed in mine and value is not None and mine[seed] is not None
        ]
        if not differences:
            continue
        mean, std = mean_std(differences)
        body.append(
            [
                method,
                str(len(differences)),
                fmt_pm(mean, std),
                " ".join(fmt(d) for d in differences),
                f"{sum(d > 0 for d in differences)} of {len(differences)}",
            ]
        )
    if not body:
        return None
    return Table(
        f"Paired by seed: mean personalised eval loss of each method minus {reference}'s",
        ["method", "seeds", "difference", "per seed", f"{reference} lower"],
        body,
        note=f"Positive: {reference} reached the lower mean personalised eval loss on the same "
        "seed (same clients, splits, initialisation and data order).",
    )


def per_client_tables(per_client: Sequence[dict[str, Any]]) -> list[Table]:
    """Client x method tables of the final personalised loss and of each task metric."""
    methods = _unique(r["method"] for r in per_client)
    clients = _unique(r["client"] for r in per_client)
    task_of = {r["client"]: r["task"] for r in per_client}
    cell = {(r["method"], r["client"]): r for r in per_client}
    tables = []
    for name, title in [
        ("personalised_loss", "Per client: final personalised eval loss, mean over seeds"),
        *((m, f"Per client: final personalised {m}, mean over seeds") for m in TASK_METRICS),
    ]:
        shown = [c for c in clients if any(name in cell.get((m, c), {}) for m in methods)]
        if not shown:
            continue
        tables.append(
            Table(
                title,
                ["client", "task", *methods],
                [
                    [c, task_of[c], *(fmt(cell.get((m, c), {}).get(name)) for m in methods)]
                    for c in shown
                ],
                numeric_from=2,
            )
        )
    return tables


PERSONALISED_NOTE = (
    "Every number is personalised: each client's own adapter after the server rule, "
    "evaluated on its own held-out split. For fedit and cluster-merge the personalised "
    "adapter is the shared global model that every client receives; for cluster-fedavg it "
    "is the model of the client's cluster."
)


def comparison_markdown(
    out_dir: Path,
    complete: Sequence[RunRecord],
    incomplete: Sequence[Path],
    rows: Sequence[dict[str, Any]],
    per_client: Sequence[dict[str, Any]],
) -> str:
    """comparison.md: what was run, how to read it, and the tables."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    commands = [c["command"] for c in manifest.get("commands", [])]
    methods = [r["method"] for r in rows]
    seeds = sorted({r.seed for r in complete if r.seed is not None})
    lines = [f"# Comparison: {', '.join(methods) or 'no finished runs'}", ""]
    if commands:
        lines += ["Command line" + ("s (in order)" if len(commands) > 1 else "") + ":", ""]
        lines += [f"    {c}" for c in commands]
        lines.append("")
    lines += [
        f"Methods: {', '.join(methods)}. Seeds: {', '.join(map(str, seeds))} "
        "(`federation.seed`; the seeds column gives how many finished runs each row averages).",
        "",
        "All methods ran from the same config, so they share clients, data splits, the LoRA "
        "initialisation and the data order; only `server.method` and `federation.seed` vary.",
        "",
        PERSONALISED_NOTE,
        "",
        "Cells are mean ± std over seeds (sample std, ddof 1; no ± with one seed). Spread is "
        "the std of the personalised eval loss across clients within one run.",
    ]
    if incomplete:
        lines += ["", "Not finished, left out of every table: " + ", ".join(map(str, incomplete))]
    tables = summary_tables(rows, per_client)
    paired = paired_table(complete)
    if paired is not None:
        tables.insert(1, paired)
    for table in tables:
        lines += ["", f"## {table.title}", "", markdown_table(table)]
        if table.note:
            lines += ["", table.note]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns = _unique(k for r in rows for k in r)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    tmp.replace(path)


def write_comparison(out_dir: Path) -> Path:
    """Write comparison.csv, comparison_clients.csv and comparison.md; return the .md path."""
    out_dir = Path(out_dir)
    complete, incomplete = collect_runs(out_dir)
    rows, per_client = summarise_runs(complete)
    _write_csv(out_dir / "comparison.csv", rows)
    _write_csv(out_dir / "comparison_clients.csv", per_client)
    path = out_dir / "comparison.md"
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(comparison_markdown(out_dir, complete, incomplete, rows, per_client))
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------ two runs
@dataclass(frozen=True)
class RunDifferences:
    """How far two run directories are apart, as largest absolute differences."""

    pairs: int  # (round, client) eval losses compared
    eval_loss: float
    clients_with_adapters: int  # clients whose saved adapters were compared (0: none saved)
    adapter: float | None  # None when the folders do not both hold adapters

    def largest(self) -> float:
        return max(self.eval_loss, self.adapter or 0.0)


def _client_losses(folder: Path) -> dict[tuple[int, str], float]:
    if not (folder / "metrics.jsonl").is_file():
        raise CompareError(f"{folder} is not a run directory: it has no metrics.jsonl")
    return {
        (int(r["round"]), str(r["client"])): float(r["eval_loss"])
        for r in read_rows(folder)
        if r.get("kind") == "client" and "eval_loss" in r
    }


def run_differences(first: Path, second: Path) -> RunDifferences:
    """Compare two runs of the same clients: every recorded (round, client) eval loss, and
    the final adapters in ``adapters/`` where both folders have them.

    A check that two settings compute the same thing: ``server.step = 0`` against ``local``,
    a resumed run against an uninterrupted one, two machines. Raises CompareError when the
    runs do not cover the same rounds and clients, or their adapters hold different tensors.
    """
    from safetensors.numpy import load_file

    first, second = Path(first), Path(second)
    losses_a, losses_b = _client_losses(first), _client_losses(second)
    if losses_a.keys() != losses_b.keys():
        only_a = sorted(losses_a.keys() - losses_b.keys())[:3]
        only_b = sorted(losses_b.keys() - losses_a.keys())[:3]
        raise CompareError(
            f"the runs record different (round, client) pairs: only in {first}: {only_a}; "
            f"only in {second}: {only_b}"
        )
    eval_loss = max((abs(losses_a[k] - losses_b[k]) for k in losses_a), default=0.0)
    clients_a = {p.parent.name for p in (first / "adapters").glob("*/adapter_model.safetensors")}
    clients_b = {p.parent.name for p in (second / "adapters").glob("*/adapter_model.safetensors")}
    if not clients_a or not clients_b:
        return RunDifferences(len(losses_a), eval_loss, 0, None)
    if clients_a != clients_b:
        raise CompareError(
            f"the runs saved adapters for different clients: {sorted(clients_a ^ clients_b)}"
        )
    worst = 0.0
    for client in sorted(clients_a):
        a = load_file(str(first / "adapters" / client / "adapter_model.safetensors"))
        b = load_file(str(second / "adapters" / client / "adapter_model.safetensors"))
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise CompareError(f"client {client}: the two adapters hold different tensors")
        for key in a:
            difference = np.abs(a[key].astype(np.float64) - b[key].astype(np.float64))
            worst = max(worst, float(difference.max(initial=0.0)))
    return RunDifferences(len(losses_a), eval_loss, len(clients_a), worst)
