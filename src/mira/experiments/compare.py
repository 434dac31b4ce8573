"""Plan and run the method x seed grid of ``mira compare``.

``mira compare`` is the harness behind the claims in docs/design.md: every method (mira, fedit,
cluster-fedavg, cluster-merge, local) runs from the SAME config, so clients, data splits, the
shared LoRA initialisation and the data order are identical; they are all functions of the
config and ``federation.seed``. Only ``server.method``, ``federation.seed`` and a variant's own
overrides (``mira@server.step=0.1``) vary.

This module decides what to run, runs what is missing into ``DIR/runs/<method>/seed-<s>/``
(skipping complete runs, resuming or restarting interrupted ones) and records what was asked
in ``DIR/comparison.json``. Reading the runs back and tabulating them is
:mod:`mira.results` (the directory layout is described in :mod:`mira.results.runs`).
"""

from __future__ import annotations

import datetime as dt
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mira.config import (
    METHODS,
    OPERATIONAL_KEYS,
    Config,
    ConfigError,
    LearnedMix,
    differing_keys,
    load_config,
    load_run_config,
)
from mira.errors import MiraError
from mira.results.files import write_atomic, write_json
from mira.results.report import write_comparison
from mira.results.rundir import read_metrics
from mira.results.runs import read_manifest, run_folder, update_run_info
from mira.results.schema import ComparisonLayout, RunLayout
from mira.results.stats import unique

# Set by --methods and --seeds; an override of either would silently lose to them.
OWNED_KEYS = ("server.method", "federation.seed")

Runner = Callable[[Config, Path], None]
"""Runs one federation of a config into a directory (``run_simulation`` or a test fake)."""
Resume = Callable[[Config, Path], None]
"""Finishes an interrupted run in place from what its directory holds."""


class CompareError(MiraError, ValueError):
    """A comparison cannot start or its directory holds something inconsistent."""


# ------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class PlannedRun:
    """One (method, seed) cell of the comparison, its validated config and its folder."""

    method: str
    seed: int
    cfg: Config
    folder: Path


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
    for entry in unique(methods):
        method, extra = split_variant(entry)
        for seed in unique(seeds):
            cfg = load_config(
                config_source,
                [*overrides, *extra, f"server.method={method}", f"federation.seed={seed}"],
            )
            planned.append(PlannedRun(entry, seed, cfg, run_folder(out_dir, entry, seed)))
    return planned


AUTO_KEYS = LearnedMix.keys()
"""Keys read only by mira's learned mix (the ``[server.auto]`` table): a run whose policy is
not :class:`LearnedMix` (another rule, or a fixed step) computes the same whatever they hold."""


def _comparable(cfg: Config) -> dict[str, Any]:
    """``cfg`` as a dict without the keys that cannot change what the run computes."""
    out = cfg.to_dict()
    ignored = OPERATIONAL_KEYS
    if not isinstance(cfg.server.policy, LearnedMix):
        ignored += AUTO_KEYS
    for key in ignored:
        *path, name = key.split(".")
        table = out
        for part in path:
            table = table.get(part, {})
        table.pop(name, None)
    return out


def config_differences(folder: Path, cfg: Config) -> list[str]:
    """Keys whose value in ``folder/config.toml`` differs from ``cfg`` (empty: same run).

    A folder without config.toml has nothing to compare and counts as the same run.
    """
    path = RunLayout(folder).config
    if not path.is_file():
        return []
    try:
        stored = load_run_config(path)
    except ConfigError as err:
        return [f"{path.name} unreadable ({err})"]
    old, new = _comparable(stored), _comparable(cfg)
    return [f"{key}: {a!r} -> {b!r}" for key, a, b in differing_keys(old, new)]


def has_final_round(folder: Path, rounds: int) -> bool:
    """metrics.jsonl holds the aggregate ("round") row of round ``rounds``."""
    if not RunLayout(folder).metrics.is_file():
        return False
    return rounds in read_metrics(folder).recorded_rounds()


def is_complete(folder: Path, rounds: int) -> bool:
    """Complete = the last configured round is recorded AND the DONE marker exists.

    Both are needed: the marker alone could outlive a metrics file rewritten by hand, and the
    final round alone could belong to a runner that crashed before returning.
    """
    return RunLayout(folder).done.is_file() and has_final_round(folder, rounds)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


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
    manifest = read_manifest(out_dir)
    manifest["methods"] = unique([*manifest["methods"], *entry["methods"]])
    manifest["seeds"] = unique([*manifest["seeds"], *entry["seeds"]])
    manifest["commands"] = [*manifest["commands"], entry]
    write_json(ComparisonLayout(out_dir).manifest, manifest)


def _execute(
    run: PlannedRun, runner: Runner, resume: Resume | None, where: str, log: Callable[[str], None]
) -> None:
    """Run (or resume) one cell, check it reached its last round, then record and mark it."""
    rounds = run.cfg.federation.rounds
    resuming = resume is not None and run.folder.exists()
    if run.folder.exists() and not resuming:
        shutil.rmtree(run.folder)  # incomplete and no resume hook: start again from nothing
    layout = RunLayout(run.folder)
    run.folder.mkdir(parents=True, exist_ok=True)
    layout.done.unlink(missing_ok=True)
    log(f"{where}: {'resuming' if resuming else 'running'} -> {run.folder}")
    started_at, started = _now(), time.monotonic()
    (resume if resume is not None and resuming else runner)(run.cfg, run.folder)
    seconds = time.monotonic() - started
    if not has_final_round(run.folder, rounds):
        raise CompareError(
            f"{where}: the run returned without recording round {rounds} in {layout.metrics}"
        )
    update_run_info(
        run.folder,
        {
            "method": run.method,
            "seed": run.seed,
            "start": started_at,
            "end": _now(),
            "seconds": round(seconds, 3),
            "resumed": resuming,
        },
    )
    write_atomic(layout.done, _now() + "\n")
    log(f"{where}: done in {seconds:.0f}s")


def run_comparison(
    config_source: str | None,
    overrides: list[str],
    methods: list[str],
    seeds: list[int],
    out_dir: Path,
    runner: Runner | None = None,
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
        runner: runs one federation (default: Flower's Simulation Engine, imported only
            then, so that planning and the tables need neither flwr nor torch).
        resume: finishes an incomplete run in place; None = delete it and run from scratch.
        command: command line recorded in comparison.md (default: the canonical one).
        log: receives one progress line per run.

    Returns ``out_dir``. Completed runs (see :func:`is_complete`) are skipped, so an
    interrupted comparison is continued by repeating the command. A run folder written with a
    different config is refused rather than reused or deleted.
    """
    out_dir = Path(out_dir)
    planned = plan_comparison(config_source, overrides, methods, seeds, out_dir)
    if runner is None:
        from mira.federation.simulation import run_simulation

        runner = run_simulation
    for run in planned:
        diffs = config_differences(run.folder, run.cfg)
        if diffs:
            raise CompareError(
                f"{run.folder} was run with a different config ({'; '.join(diffs[:5])}); "
                "use another --out or delete that folder"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    used_methods = unique(methods)
    used_seeds = unique(seeds)
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
