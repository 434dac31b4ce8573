"""How time and memory grow with the number of clients: the headline setting at 12 to 192.

Each row is one `mira run` (Flower's Simulation Engine, as `mira run` starts it) of the
headline setting (configs/headline.toml: four tasks, `server.step = "auto"`, the fingerprint
graph, two client processes) with `federation.fraction = 0.25` and fewer rounds, on the tiny
random model at 12, 48, 96 and 192 clients and on the real model (smollm2-135m-instruct) at 12
and 48. The clients are spread evenly over the four tasks while a task has rows for them
(`data.train_size` + `data.eval_size` each, disjoint); qa holds 14 clients at most, and the
others take the rest. Every client does the same work in every row: the same local steps,
batch, validation and evaluation split.

What each row records:

* time per client-round: each steady round (2 to the last: round 1 evaluates nothing) from
  the ServerApp's own clock, divided by the clients it trained, the median over those rounds
  (a busy machine's bursts hit some rounds only); split into the exchange (messages out, the
  clients' work, replies in) and the server's own part (the rule, the rows, the adapter
  folders, the checkpoint);
* the fixed start-up apart: preflight, starting the engine, waiting for the nodes, first
  contact (identify and fingerprints of every client), the graph build;
* server peak memory: the peak resident set (`getrusage`) of the process that runs the
  ServerApp (Flower's `flwr-simulation`, which also drives the Simulation Engine), and the
  bytes of the adapters it holds (the checkpoint's adapters file);
* client peak memory per process: the largest `peak_memory_mb` of the client rows;
* bytes per round: `bytes_up + bytes_down` of the client rows, per round and per client
  trained;
* the seconds of `mira report` on the finished run.

The ServerApp runs in Flower's simulation process, not in this one: its hot functions are
timed there by a `sitecustomize` hook that this script puts on that process's PYTHONPATH
(:func:`install_server_hooks`; mira itself is unchanged), each call with its start on the
system's monotonic clock and the process's peak memory after it.

    .venv/bin/python benchmarks/scale.py --out docs/scale.md
    .venv/bin/python benchmarks/scale.py --tiny-only --clients 12,48 --rounds 4 --out docs/scale.md
    .venv/bin/python benchmarks/scale.py --real-only --clients 12,48 --rounds 4 --out docs/scale.md

With `--out`, the measured rows replace those of the same model and client count in the file's
data (kept in it as a JSON comment), so rows measured at different times make one table; the
text outside the generated block is left as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import importlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HEADLINE = ROOT / "configs" / "headline.toml"
TINY, REAL = "tiny-random-llama", "smollm2-135m-instruct"
TINY_CLIENTS, REAL_CLIENTS = (12, 48, 96, 192), (12, 48)
FRACTION = 0.25
ROUNDS = 8
BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"
DATA = "<!-- scale-data"
FLAT = 1.2  # the target: per client-round time and per-client memory within this factor

TIMINGS_ENV = "MIRA_SCALE_TIMINGS"
"""Where the hook in the ServerApp's process writes its timings (unset: no hook)."""
HOOKED = (
    ("mira.federation.server", "Link.wait_for_nodes"),
    ("mira.federation.server", "discover"),
    ("mira.federation.server", "identify"),
    ("mira.federation.server", "graph_from_fingerprints"),
    ("mira.federation.server", "rejoin"),
    ("mira.federation.server", "_exchange"),
    ("mira.federation.server", "_write_closed"),
    ("mira.federation.server", "_checkpoint"),
    ("mira.federation.state", "ServerState.plan"),
    ("mira.federation.state", "ServerState.close_round"),
    ("mira.federation.state", "ServerState.screen_norms"),
    ("mira.federation.state", "ServerState.apply_rule"),
    ("mira.federation.state", "ServerState.snapshot_state"),
    ("mira.federation.codec", "encode_instruction"),
    ("mira.federation.codec", "decode_reply"),
    ("mira.results.rundir", "RunWriter.write_graph"),
    ("mira.results.rundir", "RunWriter.write_adapter"),
    ("mira.results.rundir", "RunWriter.append_round"),
    ("mira.results.rundir", "RunWriter._write_cards"),
    ("mira.results.rundir", "write_checkpoint"),
)
"""(module, attribute) of the ServerApp's functions the hook times."""

# What a steady round's table shows, in order: (timed function, what it is).
ROUND_PARTS = (
    ("_exchange", "exchange: messages out, clients' work, replies in"),
    ("encode_instruction", "  of which encoding the instructions"),
    ("decode_reply", "  of which decoding the replies"),
    ("close_round", "close the open round (auto choices, evaluations)"),
    ("screen_norms", "screen update norms"),
    ("_write_closed", "write the closed round"),
    ("write_adapter", "  of which every client's adapter folder"),
    ("append_round", "  of which the metrics rows"),
    ("_write_cards", "    of which every client's model card"),
    ("apply_rule", "the rule (neighbour means under auto)"),
    ("_checkpoint", "checkpoint"),
    ("snapshot_state", "  of which the state snapshot"),
    ("write_checkpoint", "  of which writing it (every adapter, state.json)"),
    ("plan", "plan the next exchange"),
)


# ------------------------------------------------------------------------------ the hook
def install_server_hooks() -> None:
    """Time the ServerApp's hot functions in Flower's simulation process.

    Runs from the ``sitecustomize`` this script writes (:func:`server_hooks`), so in every
    Python process the run starts; it acts only in ``flwr-simulation``, the process that runs
    the ServerApp, and only with :data:`TIMINGS_ENV` set. Every call of a function of
    :data:`HOOKED` is recorded as (name, start on the monotonic clock, seconds, the process's
    peak resident MB after it); the records are written to the file that :data:`TIMINGS_ENV`
    names when ``run_federation`` returns or raises. A name that mira no longer has is listed
    as missing.
    """
    path = os.environ.get(TIMINGS_ENV)
    if not path or Path(sys.argv[0]).name != "flwr-simulation":
        return
    calls: list[tuple[str, float, float, float, float, float]] = []

    def record(name: str, started: float) -> None:
        seconds = time.monotonic() - started
        calls.append((name, started, seconds, peak_rss_mb(), rss_mb(), os.getloadavg()[0]))

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return function(*args, **kwargs)
            finally:
                record(name, started)

        return wrapper

    missing = []
    for module_name, attribute in HOOKED:
        owner: Any = importlib.import_module(module_name)
        *parents, name = attribute.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        function = getattr(owner, name, None)
        if function is None:
            missing.append(f"{module_name}.{attribute}")
            continue
        setattr(owner, name, timed(name, function))
    server = importlib.import_module("mira.federation.server")
    run_federation = server.run_federation

    @functools.wraps(run_federation)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return run_federation(*args, **kwargs)
        finally:
            record("run_federation", started)
            Path(path).write_text(json.dumps({"calls": calls, "missing": missing}))

    server.run_federation = recorded  # before server_app imports it by name


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


SETTLE_SECONDS = 180  # the longest a row waits for the machine to settle before it starts


def settled_load(limit: float = SETTLE_SECONDS) -> float:
    """The machine's load average (1 min) once it is below half the cores, waiting up to
    ``limit`` seconds for the previous row's own load to decay; the last value if it is not."""
    cores = os.cpu_count() or 1
    deadline = time.monotonic() + limit
    load = os.getloadavg()[0]
    while load >= 0.5 * cores and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


def rss_mb() -> float:
    """This process's resident memory now."""
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


@contextlib.contextmanager
def process_hook(
    folder: Path, script: Path, function: str, env: str, value: Path
) -> Iterator[None]:
    """Processes started inside import ``script`` and call its ``function`` at start-up
    (a ``sitecustomize`` in ``folder``, put first on PYTHONPATH), with ``env`` = ``value``."""
    (folder / "sitecustomize.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('mira_{script.stem}', {str(script)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"module.{function}()\n"
    )
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", env)}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), *filter(None, [saved["PYTHONPATH"]])])
    os.environ[env] = str(value)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def server_hooks(folder: Path, timings: Path) -> contextlib.AbstractContextManager[None]:
    """Processes started inside load :func:`install_server_hooks` at start-up."""
    return process_hook(folder, Path(__file__), "install_server_hooks", TIMINGS_ENV, timings)


# ------------------------------------------------------------------------------ the config
def spread(clients: int, capacities: Sequence[int]) -> list[int]:
    """``clients`` over tasks as evenly as their capacities allow, the first tasks taking
    the remainder: spread(96, [491, 267, 186, 14]) == [28, 27, 27, 14]."""
    if clients > sum(capacities):
        raise ValueError(f"{clients} clients do not fit the tasks' rows ({sum(capacities)})")
    counts = [0] * len(capacities)
    left = clients
    while left:
        open_tasks = [i for i, c in enumerate(capacities) if counts[i] < c]
        share, extra = divmod(left, len(open_tasks))
        for rank, i in enumerate(open_tasks):
            take = min(share + (rank < extra), capacities[i] - counts[i])
            counts[i] += take
            left -= take
    return counts


def scale_config(model: str, clients: int, rounds: int, overrides: Sequence[str] = ()) -> Any:
    """The headline config on ``model`` with ``clients`` spread over its tasks,
    ``federation.fraction`` = 0.25, ``rounds`` rounds and ``overrides`` (as `mira run
    --set`)."""
    from mira.config import apply_overrides, config_from_dict
    from mira.data.clients import task_examples

    raw = apply_overrides(tomllib.loads(HEADLINE.read_text()), list(overrides))
    raw["model"]["name"] = model
    raw["federation"]["rounds"] = rounds
    raw["federation"]["fraction"] = FRACTION
    cfg = config_from_dict(raw)
    per_client = cfg.data.train_size + cfg.data.eval_size
    capacities = [len(task_examples(task, cfg)[1]) // per_client for task in cfg.tasks]
    for task, count in zip(raw["tasks"], spread(clients, capacities), strict=True):
        task["clients"] = count
    raw["tasks"] = [task for task in raw["tasks"] if task["clients"] > 0]
    return config_from_dict(raw)


# ------------------------------------------------------------------------------ one row
class Timeline:
    """The progress of a run, printed as plain lines, with the time of every note."""

    def __init__(self) -> None:
        from mira.federation.progress import Progress

        outer = self

        class Recording(Progress):
            def note(self, text: str) -> None:
                outer.notes.append((time.monotonic(), text))
                super().note(text)

        self.notes: list[tuple[float, str]] = []
        self.progress = Recording()

    def first(self, prefix: str) -> float | None:
        return next((t for t, text in self.notes if text.startswith(prefix)), None)


def _between(calls: list[list[Any]], name: str, start: float, end: float) -> float:
    return sum(c[2] for c in calls if c[0] == name and start <= c[1] < end)


def _load_at(calls: list[list[Any]], moment: float) -> float | None:
    """The machine's load average (1 min) the hook saw at the call that started at
    ``moment`` (None from a hook that did not record it)."""
    found = next((c for c in calls if c[1] == moment), None)
    return found[5] if found is not None and len(found) > 5 else None


def _only(calls: list[list[Any]], name: str) -> float:
    return sum(c[2] for c in calls if c[0] == name)


def measure(model: str, clients: int, rounds: int, keep: Path | None) -> dict[str, Any]:
    """Run one row and return its numbers."""
    from mira.federation.simulation import run_simulation
    from mira.results.report import write_report
    from mira.results.rundir import read_metrics
    from mira.results.schema import RunLayout

    if rounds < 3:
        raise SystemExit("--rounds must be at least 3 (rounds 2 to the last are timed)")
    cfg = scale_config(model, clients, rounds)
    with tempfile.TemporaryDirectory(prefix="mira-scale-") as tmp:
        folder = Path(tmp)
        out = (keep / f"{model}-{clients}") if keep else folder / "run"
        timings = (keep / f"{model}-{clients}.timings.json") if keep else folder / "timings.json"
        timeline = Timeline()
        load_before = settled_load()
        started = time.monotonic()
        with server_hooks(folder, timings):
            run_simulation(cfg, out, progress=timeline.progress)
        ended = time.monotonic()
        load_after = os.getloadavg()[0]
        report_started = time.monotonic()
        write_report(out)
        report_seconds = time.monotonic() - report_started
        recorded = json.loads(timings.read_text())
        rows = read_metrics(out)
        layout = RunLayout(out)
        held = sum(p.stat().st_size for p in layout.checkpoint_adapter_files())
    calls = recorded["calls"]
    plans = sorted(c[1] for c in calls if c[0] == "plan")  # one per exchange, in order
    if len(plans) != rounds + 1:
        raise RuntimeError(f"expected {rounds + 1} exchanges, the server timed {len(plans)}")
    federation = next(c for c in calls if c[0] == "run_federation")
    # Exchange t trains round t and closes round t - 1; from its start to the next one's.
    steady = [(plans[t - 1], plans[t]) for t in range(2, rounds + 1)]
    trained = {r.round: r.clients_trained for r in rows.rounds}
    cycles = [
        [end - start, trained[t], _load_at(calls, start)]
        for t, (start, end) in enumerate(steady, start=2)
    ]
    parts = {
        name: statistics.median(_between(calls, name, start, end) for start, end in steady)
        for name, _ in ROUND_PARTS
    }
    engine_at = timeline.first("starting the Simulation Engine") or started
    discover_at = min(c[1] for c in calls if c[0] == "discover")
    per_round = [r.bytes_up + r.bytes_down for r in rows.rounds]
    per_client = [
        (r.bytes_up + r.bytes_down) / r.clients_trained for r in rows.rounds if r.clients_trained
    ]
    peaks = [r.peak_memory_mb for r in rows.clients if r.peak_memory_mb is not None]
    return {
        "model": model,
        "clients": clients,
        "tasks": [[t.name, t.clients] for t in cfg.tasks],
        "sampled_per_round": max(1, round(FRACTION * clients)),
        "rounds": rounds,
        "seconds_total": ended - started,
        "startup": {
            "preflight": engine_at - started,
            "engine": discover_at - engine_at,
            "nodes": _only(calls, "wait_for_nodes"),
            "first_contact": _only(calls, "identify"),
            "graph": _only(calls, "graph_from_fingerprints"),
            "graph_files": _only(calls, "write_graph"),
            "to_first_round": plans[0] - started,
        },
        # medians over the steady rounds: a busy machine's bursts hit some rounds only
        "round_seconds": statistics.median(c[0] for c in cycles),
        "client_round_seconds": statistics.median(c[0] / c[1] for c in cycles),
        "cycles": cycles,
        "server_seconds": statistics.median(
            end - start - _between(calls, "_exchange", start, end) for start, end in steady
        ),
        "parts": parts,
        "final_seconds": federation[1] + federation[2] - plans[-1],
        "shutdown_seconds": ended - (federation[1] + federation[2]),
        "report_seconds": report_seconds,
        "server_peak_mb": max(c[3] for c in calls),
        "server_peak_startup_mb": max(c[3] for c in calls if c[1] + c[2] <= plans[0]),
        # resident now (not the peak) after start-up and after the last round's rule
        "server_rss_mb": [
            next((c[4] for c in reversed(calls) if c[1] + c[2] <= moment and len(c) > 4), None)
            for moment in (plans[0], plans[-1])
        ],
        "held_adapters_mb": held / 2**20,
        "client_peak_mb": max(peaks) if peaks else None,
        "bytes_per_round": sum(per_round) / len(per_round),
        "bytes_per_client_round": sum(per_client) / len(per_client),
        "missing_hooks": recorded["missing"],
        "load": [load_before, load_after],
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "date": dt.date.today().isoformat(),
    }


# ------------------------------------------------------------------------------ writes
def server_writes(model: str, clients: int, repeats: int = 2) -> dict[str, Any]:
    """What a round's writing costs the server with ``clients`` adapters of ``model``'s shape
    (rank 8 on q, k, v, o as in the headline), without training anything: every client's
    adapter folder (what a round writes now) against only the quarter of them a round trains,
    the checkpoint of every adapter (and the quarter's neighbour means, as under auto), and
    the peft ``adapter_config.json`` that each adapter folder builds. Best of ``repeats``."""
    import numpy as np

    from mira.client.base import prepare_model
    from mira.client.lora import lora_model
    from mira.client.sharing import PeftAdapterWriter
    from mira.results.rundir import Checkpoint, RunWriter, write_checkpoint
    from mira.results.schema import ClientRow

    cfg = scale_config(model, clients, ROUNDS)
    base_source = prepare_model(cfg.model)
    rank = cfg.lora.rank
    init = lora_model(cfg.model).shared_init(cfg.lora, rank, cfg.federation.seed)
    rng = np.random.default_rng(0)
    adapters = {
        c: {k: (v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype) for k, v in init.items()}
        for c in cfg.client_ids
    }
    trained = cfg.client_ids[: max(1, round(FRACTION * clients))]
    rows = [
        ClientRow(1, c, t, "mira", rank, c in trained, 1.0, 1.0, 1, 1, 0.0).to_dict()
        for c, t in zip(cfg.client_ids, cfg.client_tasks, strict=True)
    ]
    labels = [cfg.client_tasks.index(t) for t in cfg.client_tasks]
    adjacency = np.array([[float(a == b) for b in labels] for a in labels])
    np.fill_diagonal(adjacency, 0.0)
    checkpoint = Checkpoint(
        round=1,
        client_ids=cfg.client_ids,
        ranks=[rank] * clients,
        adapters={**adapters, **{f"mean:{c}": adapters[c] for c in trained}},
        adjacency=adjacency,
        clusters=labels,
        graph_source="clusters",
        graph_info={},
        server={"open_rows": rows},
        config=cfg.to_dict(),
    )
    best: dict[str, float] = {}

    def timed(name: str, work: Callable[[], Any]) -> None:
        started = time.perf_counter()
        work()
        best[name] = min(best.get(name, math.inf), time.perf_counter() - started)

    with tempfile.TemporaryDirectory(prefix="mira-scale-writes-") as tmp:
        out = Path(tmp)
        peft_side = PeftAdapterWriter(cfg.model.name, cfg.lora, base_source)
        with RunWriter(out, cfg, peft_side) as writer:
            for _ in range(repeats):
                timed(
                    "every_adapter",
                    lambda: [writer.write_adapter(c, adapters[c], rank) for c in cfg.client_ids],
                )
                timed(
                    "trained_adapters",
                    lambda: [writer.write_adapter(c, adapters[c], rank) for c in trained],
                )
                timed(
                    "adapter_configs",
                    lambda: [peft_side.adapter_config(rank) for _ in cfg.client_ids],
                )
                timed("checkpoint", lambda: write_checkpoint(out, checkpoint, 0))
        held = sum(v.nbytes for a in checkpoint.adapters.values() for v in a.values())
    return {
        "model": model,
        "clients": clients,
        "trained": len(trained),
        "adapter_mb": sum(v.nbytes for v in init.values()) / 2**20,
        "checkpoint_mb": held / 2**20,
        **best,
    }


RAY_START = "timed out during startup"
"""Ray's words when its node does not register within its fixed 30 s: on a machine this
busy, a start-up failure of the engine, not of the run, so the row is tried again."""


def measure_retrying(
    model: str, clients: int, rounds: int, keep: Path | None, tries: int = 6
) -> dict[str, Any]:
    """:func:`measure`, tried again (up to ``tries`` in all) when Ray fails to start."""
    from mira.federation.server import FederationError

    for attempt in range(1, tries + 1):
        try:
            return measure(model, clients, rounds, keep)
        except FederationError as err:
            if RAY_START not in str(err) or attempt == tries:
                raise
            print(f"Ray did not start ({RAY_START}); trying again in 60 s", flush=True)
            if keep:
                import shutil

                shutil.rmtree(keep / f"{model}-{clients}", ignore_errors=True)
            time.sleep(60)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------ the doc
def quiet(row: dict[str, Any]) -> bool:
    """Started on a quiet machine: the load before the row, settled, was below half the cores.

    The load after a row is mostly the row's own (its two client processes keep two cores
    busy), so it is recorded but not judged.
    """
    return row["load"][0] < 0.5 * row["cores"]


def _server_part(row: dict[str, Any]) -> float:
    """Seconds of a steady round the server spends outside the exchange."""
    return float(row.get("server_seconds", row["round_seconds"] - row["parts"]["_exchange"]))


def _spread(tasks: Any) -> str:
    pairs = tasks.items() if isinstance(tasks, dict) else tasks
    return ", ".join(f"{name} {count}" for name, count in pairs)


def _resident(row: dict[str, Any]) -> str:
    start, end = row.get("server_rss_mb") or (None, None)
    return "-" if start is None or end is None else f"{start:.0f} to {end:.0f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def tables(rows: dict[str, dict[str, Any]], wanted: Sequence[tuple[str, int]]) -> str:
    """The markdown of the generated block: the main table, growth from the smallest row,
    the start-up, and the server's part of a steady round."""
    ordered = [rows.get(f"{m}/{k}") for m, k in wanted]
    lines = [
        "| model | clients (per task) | trained / round | rounds | start-up (s) "
        "| s / round | s / client-round | server part of a round (s) "
        "| server peak (MB) | server resident, start-up to end (MB) | adapters held (MB) "
        "| client peak (MB) | MB / round "
        "| KB / client-round | report (s) | measured |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | --- |",
    ]
    for (model, clients), row in zip(wanted, ordered, strict=True):
        if row is None:
            lines.append(
                f"| {model} | {clients} | {max(1, round(FRACTION * clients))} | - "
                + "| - " * 11
                + "| to be measured |"
            )
            continue
        server = _server_part(row)
        where = (
            f"{row['date']}, {row['cores']} cores, load {row['load'][0]:.1f} / "
            f"{row['load'][1]:.1f}"
            + ("" if quiet(row) else ": busy before it started, to measure on quiet cores")
        )
        lines.append(
            f"| {model} | {clients} ({_spread(row['tasks'])}) "
            f"| {row['sampled_per_round']} | {row['rounds']} "
            f"| {row['startup']['to_first_round']:.0f} | {row['round_seconds']:.1f} "
            f"| {row['client_round_seconds']:.2f} | {server:.2f} "
            f"| {row['server_peak_mb']:.0f} | {_resident(row)} | {row['held_adapters_mb']:.1f} "
            f"| {row['client_peak_mb']:.0f} | {row['bytes_per_round'] / 1e6:.2f} "
            f"| {row['bytes_per_client_round'] / 1e3:.0f} | {row['report_seconds']:.1f} "
            f"| {where} |"
        )
    out = ["\n".join(lines)]
    for model in dict.fromkeys(m for m, _ in wanted):
        measured = [rows[f"{m}/{k}"] for m, k in wanted if m == model and f"{m}/{k}" in rows]
        if len(measured) < 2:
            continue
        base = measured[0]
        growth = [
            f"Growth from {base['clients']} clients, {model} (target: within {FLAT}x for time "
            "per client-round and client memory; the server's memory by the adapters it "
            "holds):",
            "",
            "| clients | s / client-round | server part per client trained | client peak "
            "| server peak | server peak - adapters held | KB / client-round "
            "| start-up per client |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]

        def server_share(row: dict[str, Any]) -> float:
            return _server_part(row) / row["sampled_per_round"]

        for row in measured:
            growth.append(
                f"| {row['clients']} "
                f"| {_ratio(row['client_round_seconds'], base['client_round_seconds'])} "
                f"| {_ratio(server_share(row), server_share(base))} "
                f"| {_ratio(row['client_peak_mb'], base['client_peak_mb'])} "
                f"| {_ratio(row['server_peak_mb'], base['server_peak_mb'])} "
                f"| {_ratio(row['server_peak_mb'] - row['held_adapters_mb'], base['server_peak_mb'] - base['held_adapters_mb'])} "  # noqa: E501
                f"| {_ratio(row['bytes_per_client_round'], base['bytes_per_client_round'])} "
                f"| {_ratio(row['startup']['to_first_round'] / row['clients'], base['startup']['to_first_round'] / base['clients'])} |"  # noqa: E501
            )
        out.append("\n".join(growth))
        startup = [
            f"Start-up, {model} (seconds): preflight (every client's data, the model), the "
            "engine (SuperLink, Ray, the ServerApp), waiting for the nodes, first contact "
            "(identify and fingerprint every client), the graph build, graph.json and "
            "graph.png:",
            "",
            "| clients | preflight | engine | nodes | first contact | per client | graph "
            "| graph files | to round 1 |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in measured:
            s = row["startup"]
            startup.append(
                f"| {row['clients']} | {s['preflight']:.1f} | {s['engine']:.1f} "
                f"| {s['nodes']:.1f} | {s['first_contact']:.1f} "
                f"| {s['first_contact'] / row['clients']:.2f} | {s['graph']:.2f} "
                f"| {s['graph_files']:.2f} | {s['to_first_round']:.1f} |"
            )
        out.append("\n".join(startup))
        parts = [
            f"A steady round, {model}: seconds per round of each timed function of the "
            "ServerApp (nested ones indented; the exchange includes the clients' work)",
            "",
            "| part | " + " | ".join(f"{r['clients']} clients" for r in measured) + " |",
            "| --- | " + " | ".join("---:" for _ in measured) + " |",
        ]
        for name, label in ROUND_PARTS:
            cells = " | ".join(f"{r['parts'][name]:.3f}" for r in measured)
            parts.append(f"| {label.replace('  ', '&nbsp;&nbsp;')} (`{name}`) | {cells} |")
        parts.append(
            "| final evaluation (every client, task metrics) | "
            + " | ".join(f"{r['final_seconds']:.1f}" for r in measured)
            + " |"
        )
        out.append("\n".join(parts))
    return "\n\n".join(out)


def read_data(path: Path) -> dict[str, dict[str, Any]]:
    """The rows kept in ``path``'s data comment ({} when there is none)."""
    if not path.is_file() or DATA not in (text := path.read_text()):
        return {}
    body = text.split(DATA, 1)[1].split("-->", 1)[0]
    return dict(json.loads(body))


def write_doc(path: Path, rows: dict[str, dict[str, Any]], wanted: list[tuple[str, int]]) -> None:
    """Put the generated block (tables and the data comment) into ``path``, between
    :data:`BEGIN` and :data:`END`, keeping the text around it."""
    block = (
        f"{BEGIN}\n{tables(rows, wanted)}\n\n{writes_table(rows)}\n\n"
        f"{DATA}\n{json.dumps(rows, indent=1, sort_keys=True)}\n-->\n{END}"
    )
    if path.is_file() and BEGIN in (old := path.read_text()) and END in old:
        head, rest = old.split(BEGIN, 1)
        path.write_text(head + block + rest.split(END, 1)[1])
    else:
        path.write_text(f"# Scale\n\n{block}\n")


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give client counts as 12,48") from None
    if not counts or min(counts) < 4:
        raise argparse.ArgumentTypeError(f"{text!r}: every client count must be at least 4")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--tiny-only", action="store_true", help="skip the real model's rows")
    only.add_argument("--real-only", action="store_true", help="skip the tiny model's rows")
    parser.add_argument(
        "--clients",
        type=_counts,
        help="client counts for both models (default: 12,48,96,192 tiny and 12,48 real)",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"default {ROUNDS}")
    parser.add_argument("--out", type=Path, help="markdown file to write (docs/scale.md)")
    parser.add_argument("--keep", type=Path, help="keep the run directories in this folder")
    parser.add_argument(
        "--writes",
        action="store_true",
        help="measure only what a round's writing costs the server, for both models at every "
        "client count (no training)",
    )
    args = parser.parse_args()
    if args.writes:
        return measure_writes(args)
    todo = [] if args.real_only else [(TINY, k) for k in args.clients or TINY_CLIENTS]
    if not args.tiny_only:
        todo += [(REAL, k) for k in args.clients or REAL_CLIENTS]
    rows = read_data(args.out) if args.out else {}
    for model, clients in todo:
        print(f"== {model}, {clients} clients, {args.rounds} rounds", flush=True)
        row = measure_retrying(model, clients, args.rounds, args.keep)
        rows[f"{model}/{clients}"] = row
        print(json.dumps(row, indent=1), flush=True)
        if args.out:  # after every row: a long series keeps what it measured
            write_doc(args.out, rows, table_rows(rows, todo))
    if not args.out:
        print(tables(rows, todo))
    return 0


def measure_writes(args: argparse.Namespace) -> int:
    """``--writes``: :func:`server_writes` for each model and client count."""
    models = [TINY] if args.tiny_only else [REAL] if args.real_only else [TINY, REAL]
    rows = read_data(args.out) if args.out else {}
    for model in models:
        for clients in args.clients or TINY_CLIENTS:
            print(f"== writes, {model}, {clients} clients", flush=True)
            rows[f"writes/{model}/{clients}"] = server_writes(model, clients)
            print(json.dumps(rows[f"writes/{model}/{clients}"], indent=1), flush=True)
            if args.out:
                write_doc(args.out, rows, table_rows(rows, []))
    if not args.out:
        print(writes_table(rows))
    return 0


def writes_table(rows: dict[str, dict[str, Any]]) -> str:
    """The measured :func:`server_writes` rows, by model then clients."""
    found = sorted(
        (r for key, r in rows.items() if key.startswith("writes/")),
        key=lambda r: (r["model"] != TINY, r["model"], r["clients"]),
    )
    if not found:
        return ""
    lines = [
        "What a round's writing costs the server (seconds, best of two; no training): every "
        "client's adapter folder, as a round writes now, against only the adapters the round "
        "trained; the peft adapter_config.json that every adapter folder builds, for all "
        "clients; the checkpoint of every adapter and the trained clients' neighbour means:",
        "",
        "| model | clients | trained | adapter (MB) | every adapter folder | trained ones "
        "only | adapter_config.json x clients | checkpoint (MB) | checkpoint |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in found:
        lines.append(
            f"| {r['model']} | {r['clients']} | {r['trained']} | {r['adapter_mb']:.2f} "
            f"| {r['every_adapter']:.2f} | {r['trained_adapters']:.2f} "
            f"| {r['adapter_configs']:.2f} | {r['checkpoint_mb']:.0f} | {r['checkpoint']:.2f} |"
        )
    return "\n".join(lines)


def table_rows(rows: dict[str, Any], todo: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Every default row, every measured one, and this call's, by model then clients."""
    keys = {(TINY, k) for k in TINY_CLIENTS} | {(REAL, k) for k in REAL_CLIENTS} | set(todo)
    for key in rows:
        if not key.startswith("writes/"):
            model, clients = key.rsplit("/", 1)
            keys.add((model, int(clients)))
    order = {TINY: 0, REAL: 1}
    return sorted(keys, key=lambda mk: (order.get(mk[0], 2), mk[0], mk[1]))


if __name__ == "__main__":
    sys.exit(main())
