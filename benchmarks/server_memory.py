"""What the server's process holds, and for whom: a census of its memory at every exchange.

docs/scale.md measures the peak resident memory of the process that runs the ServerApp
(Flower's `flwr-simulation`, which also drives the Simulation Engine) and finds it growing by
several adapters per added client on the real model. This script says which objects those
bytes are. It runs the same rows as benchmarks/scale.py (the headline setting, `server.step =
"auto"`, `federation.fraction = 0.25`, the tiny random model by default) with Python's
`tracemalloc` started in that process, and when each exchange has all its replies in (the
moment the messages out, the replies and the state are all alive) it adds up every live
allocation by where it was made: the innermost function of mira's and of Flower's code on
the allocation's stack. numpy reports its arrays to `tracemalloc`, so adapters count.

The sums are written in units of one client's adapter (the checkpoint's adapters file divided
by the clients), per client, so the rows of different client counts and models compare
directly; what grows with the clients shows as the same number of adapters per client in every
row. `tracemalloc` slows the process several times over: the seconds of these runs mean
nothing.

    .venv/bin/python benchmarks/server_memory.py --clients 12,48 --out docs/server_memory.md
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import functools
import importlib
import itertools
import json
import os
import platform
import sys
import tempfile
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # benchmarks/scale.py: the rows' config

CENSUS_ENV = "MIRA_SERVER_CENSUS"
"""Where the hook in the ServerApp's process writes its census (unset: no hook)."""
FRAMES = 40  # stack depth kept per allocation: deep enough to reach mira's frame
PACKAGES = ("mira", "flwr", "ray")
TOTALS = {
    "all traced memory": "all traced memory",
    "resident": "the process's resident memory at that moment (traced or not)",
    "peak_resident": "the process's peak resident memory so far",
}
BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"


# ------------------------------------------------------------------------------ the hook
@functools.cache
def _functions(filename: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function defined in ``filename``."""
    try:
        tree = ast.parse(Path(filename).read_text())
    except (OSError, SyntaxError, ValueError):
        return []
    found: list[tuple[int, int, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found.append((child.lineno, child.end_lineno or child.lineno, name))
                visit(child, f"{name}.")

    visit(tree, "")
    return found


@functools.cache
def where(filename: str, lineno: int) -> str | None:
    """``package.module:function`` of a frame in one of :data:`PACKAGES`, else None."""
    parts = Path(filename).with_suffix("").parts
    roots = [i + 1 for i, p in enumerate(parts[:-1]) if p in ("site-packages", "src")]
    top = next((i for i in reversed(roots) if parts[i] in PACKAGES), None)
    if top is None:
        return None
    inner = [f for f in _functions(filename) if f[0] <= lineno <= f[1]]
    function = max(inner, key=lambda f: f[0])[2] if inner else "<module>"
    return f"{'.'.join(parts[top:])}:{function}"


@functools.cache
def site(traceback: tracemalloc.Traceback) -> str:
    """Who made an allocation: the two innermost mira frames (caller > callee), and the
    innermost frame of Flower or Ray below them when that is nearer the allocation (e.g. a
    message Flower decoded)."""
    mira: list[str] = []
    other = None
    for frame in reversed(traceback):  # the most recent frame first
        found = where(frame.filename, frame.lineno)
        if found is None:
            continue
        if found.startswith("mira."):
            name = found.removeprefix("mira.")
            if mira and mira[0] == name:  # a comprehension's frame inside the same function
                continue
            mira.insert(0, name)
            if len(mira) == 2:
                break
        elif not mira:
            other = other or found
    named = " > ".join(mira + ([other] if other else []))
    return named or "elsewhere (Python, numpy, torch at import)"


def install_census() -> None:
    """Take the census in Flower's simulation process (run from the ``sitecustomize`` that
    :func:`main` writes). After each :meth:`Link.exchange` returns, every live allocation is
    summed by :func:`site` (traced from the ServerApp's start); around each checkpoint, the
    traced memory before it and at its peak. Written to :data:`CENSUS_ENV` when the
    ServerApp ends."""
    path = os.environ.get(CENSUS_ENV)
    if not path or Path(sys.argv[0]).name != "flwr-simulation":
        return
    exchanges: list[dict[str, Any]] = []
    writes: list[dict[str, Any]] = []  # around each checkpoint
    server = importlib.import_module("mira.federation.server")
    exchange = server.Link.exchange

    @functools.wraps(exchange)
    def counted(self: Any, messages: list[Any], what: str, *args: Any, **kwargs: Any) -> Any:
        result = exchange(self, messages, what, *args, **kwargs)
        sums: dict[str, int] = defaultdict(int)
        for stat in tracemalloc.take_snapshot().statistics("traceback"):
            sums[site(stat.traceback)] += stat.size
        current = tracemalloc.get_traced_memory()[0]
        exchanges.append(
            {
                "what": what,
                "messages": len(messages),
                "traced": current,
                "sites": dict(sums),
                "resident": scale.rss_mb() * 2**20,
                "peak_resident": scale.peak_rss_mb() * 2**20,
            }
        )
        tracemalloc.reset_peak()
        return result

    server.Link.exchange = counted
    checkpoint = server._checkpoint

    @functools.wraps(checkpoint)
    def measured(*args: Any, **kwargs: Any) -> Any:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        try:
            return checkpoint(*args, **kwargs)
        finally:
            writes.append(
                {
                    "traced": before,
                    "traced_peak": tracemalloc.get_traced_memory()[1],
                    "peak_resident": scale.peak_rss_mb() * 2**20,
                }
            )

    server._checkpoint = measured
    run_federation = server.run_federation

    @functools.wraps(run_federation)
    def written(*args: Any, **kwargs: Any) -> Any:
        tracemalloc.start(FRAMES)  # from here: the imports before are nobody's in particular
        try:
            return run_federation(*args, **kwargs)
        finally:
            Path(path).write_text(json.dumps({"exchanges": exchanges, "checkpoints": writes}))

    server.run_federation = written  # before server_app imports it by name


# ------------------------------------------------------------------------------ one row
def census(model: str, clients: int, rounds: int, overrides: list[str]) -> dict[str, Any]:
    """One run of ``clients`` clients of ``model`` (the headline's config with ``overrides``,
    as `mira run --set`); the census of its last round's exchange and of first contact."""
    from mira.federation.simulation import run_simulation
    from mira.results.schema import RunLayout

    cfg = scale.scale_config(model, clients, rounds, overrides)
    with tempfile.TemporaryDirectory(prefix="mira-census-") as tmp:
        folder = Path(tmp)
        hook = scale.process_hook(
            folder, Path(__file__), "install_census", CENSUS_ENV, folder / "census.json"
        )
        with hook:
            run_simulation(cfg, folder / "run")
        found = json.loads((folder / "census.json").read_text())
        held = sum(p.stat().st_size for p in RunLayout(folder / "run").checkpoint_adapter_files())
    rounds_seen = [e for e in found["exchanges"] if e["what"].startswith("round ")]
    contact = [e for e in found["exchanges"] if e["what"].startswith("identify")]
    return {
        "model": model,
        "clients": clients,
        "rank": cfg.lora.rank,
        "step": str(cfg.server.step),
        "overrides": overrides,
        "rounds": rounds,
        "adapter_bytes": held / clients,
        "last_round": rounds_seen[-1],
        "first_contact": contact[-1],  # the second of identify's two exchanges
        "checkpoint": found["checkpoints"][-2],  # the last round's (the last: the final one's)
        "machine": platform.machine(),
        "date": dt.date.today().isoformat(),
    }


# ------------------------------------------------------------------------------ the doc
def growth(small: dict[str, Any], large: dict[str, Any], key: str) -> dict[str, float]:
    """Per site, what one more client adds between two rows, in adapters' worth."""
    unit = large["adapter_bytes"] * (large["clients"] - small["clients"])
    sites = set(small[key]["sites"]) | set(large[key]["sites"])
    added = {n: large[key]["sites"].get(n, 0) - small[key]["sites"].get(n, 0) for n in sites}
    added = {n: v / unit for n, v in added.items()}
    added["all traced memory"] = (large[key]["traced"] - small[key]["traced"]) / unit
    for name in ("resident", "peak_resident"):
        if name in large[key] and name in small[key]:
            added[name] = (large[key][name] - small[key][name]) / unit
    return added


def table(rows: list[dict[str, Any]], key: str, title: str) -> str:
    """Per site, what one more client adds from each row to the next, in adapters' worth;
    sites that add less than 0.05 of an adapter in every step are summed into one line."""
    steps = [growth(a, b, key) for a, b in itertools.pairwise(rows)]
    shown = sorted(
        {n for step in steps for n, v in step.items() if abs(v) >= 0.05} - set(TOTALS),
        key=lambda n: -max(step.get(n, 0.0) for step in steps),
    )
    head = " | ".join(f"{a['clients']} to {b['clients']}" for a, b in itertools.pairwise(rows))
    unit = ", ".join(sorted({f"{r['adapter_bytes'] / 1024:.1f} KiB" for r in rows}))
    lines = [
        f"{title}: what one more client adds, in adapters' worth (one adapter = {unit}; "
        f"{rows[0]['model']}, LoRA rank {rows[0]['rank']}, server.step = {rows[0]['step']}"
        + (f"; {rows[0]['label']}" if rows[0].get("label") else "")
        + "):",
        "",
        f"| held by (mira caller > mira function > Flower or Ray function) | {head} |",
        "| --- |" + " ---: |" * len(steps),
    ]
    for name in shown:
        lines.append(f"| `{name}` | " + " | ".join(f"{s.get(name, 0):.2f}" for s in steps) + " |")
    rest = [sum(v for n, v in s.items() if n not in shown and n not in TOTALS) for s in steps]
    lines.append("| everything else | " + " | ".join(f"{v:.2f}" for v in rest) + " |")
    for name, label in TOTALS.items():
        cells = " | ".join(f"{s[name]:.2f}" if name in s else "" for s in steps)
        lines.append(f"| **{label}** | {cells} |")
    return "\n".join(lines)


def checkpoint_table(rows: list[dict[str, Any]]) -> str:
    """What writing the last round's checkpoint adds, per added client, at its peak."""
    head = " | ".join(f"{a['clients']} to {b['clients']}" for a, b in itertools.pairwise(rows))
    lines = [
        "While the last round's checkpoint is written: what one more client adds, in adapters' "
        "worth" + (f" ({rows[0]['label']})" if rows[0].get("label") else "") + ":",
        "",
        f"| | {head} |",
        "| --- |" + " ---: |" * (len(rows) - 1),
    ]
    measures = (
        ("copies made while writing (traced peak minus traced before)", "copies"),
        ("the process's peak resident memory after it", "peak_resident"),
    )
    for label, name in measures:
        cells = []
        for a, b in itertools.pairwise(rows):
            unit = b["adapter_bytes"] * (b["clients"] - a["clients"])

            def value(row: dict[str, Any], name: str = name) -> float:
                c = row["checkpoint"]
                return float(c["traced_peak"] - c["traced"] if name == "copies" else c[name])

            cells.append(f"{(value(b) - value(a)) / unit:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DATA = "<!-- server-memory-data"


def read_series(out: Path) -> list[list[dict[str, Any]]]:
    """The series of rows kept in ``out``'s data comment (none when there is no file)."""
    if not out.exists() or DATA not in out.read_text():
        return []
    return list(json.loads(out.read_text().split(DATA, 1)[1].split("-->", 1)[0]))


def _series_key(row: dict[str, Any]) -> tuple[str, list[str], str]:
    return row["model"], row["overrides"], row.get("label", "")


def write_doc(out: Path, rows: list[dict[str, Any]]) -> None:
    """Both tables of every series of rows between the markers of ``out``: ``rows`` replaces
    a series measured before with the same model and overrides, and joins the others. Text
    outside the markers is kept."""
    series = [old for old in read_series(out) if _series_key(old[0]) != _series_key(rows[0])]
    series.append(rows)
    parts = []
    for one in series:
        parts.append(table(one, "last_round", "At the end of the last round's exchange"))
        parts.append(table(one, "first_contact", "At the end of first contact (identify)"))
        parts.append(checkpoint_table(one))
    parts.append(f"{DATA}\n{json.dumps(series)}\n-->")
    text = out.read_text() if out.exists() else f"# Server memory\n\n{BEGIN}\n{END}\n"
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    out.write_text(f"{before}{BEGIN}\n" + "\n\n".join(parts) + f"\n{END}{after}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=scale.TINY, help=f"default {scale.TINY}")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override, as mira run --set (e.g. lora.rank=256 for larger adapters)",
    )
    parser.add_argument(
        "--label",
        default="",
        help="names the series in the doc's titles; a series replaces the one measured before "
        "with the same model, overrides and label",
    )
    parser.add_argument("--clients", type=scale._counts, default=[12, 48], help="default 12,48")
    parser.add_argument("--rounds", type=int, default=3, help="default 3")
    parser.add_argument("--out", type=Path, help="markdown file to write (docs/server_memory.md)")
    args = parser.parse_args()
    if len(args.clients) < 2:
        parser.error("--clients needs two counts or more: the growth between them is measured")
    rows = []
    for clients in args.clients:
        print(f"== {args.model}, {clients} clients, {args.rounds} rounds", flush=True)
        rows.append(census(args.model, clients, args.rounds, args.set) | {"label": args.label})
    if args.out:
        write_doc(args.out, rows)
    else:
        print(table(rows, "last_round", "At the end of the last round's exchange"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
