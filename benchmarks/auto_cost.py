"""What `server.step = "auto"` costs next to a fixed step: wall time per round and bytes down
per client-round, and how often its shortened search chooses as a full one would.

The same federation runs with a fixed step (`server.step = 0.1`) and with auto, back to back
in pairs (fixed, auto, fixed, auto, ...), so both meet the same machine load; only
`server.step` differs (and, with `--every 1,3`, each pair runs auto once per
`server.auto.every` listed: fixed, auto every 1, auto every 3). A round's wall time is its
row's `seconds` in metrics.jsonl (the start-up is in no round), averaged over the run's
rounds; its ratio auto / fixed is taken pair by pair. Bytes down per client-round are the
client rows' `bytes_down` averaged over every round but the last (whose row also counts the
final evaluation's message), in bytes and in adapters (a client's `bytes_up`: one trained
adapter).

    .venv/bin/python benchmarks/auto_cost.py --out docs/auto_cost.md

runs configs/headline.toml (the real model); `--rounds`, `--clients` (per task), `--pairs`
and `--set section.key=value` make it small, e.g. with the tiny model of the tests. With
`--out`, the measured block replaces the one between the file's `auto-cost` markers.

`--fit DIR ...` measures the search instead, on runs already made: for every recorded choice
whose client evaluated every candidate (`server.auto.evaluations = 0`, or a run made before the
key), the choice 3 or 4 evaluations would have made, the other candidates' losses read off the
curve through those (`mira.core.rules.interpolate_losses`), against the recorded one. The
standard errors of the interpolated candidates are taken as recorded (the measured ones), so the
tolerant choices compare the effect of the interpolated losses alone.

    .venv/bin/python benchmarks/auto_cost.py --fit docs/results/archive/auto-{iid,skew,shared}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

FIXED_STEP = "server.step=0.1"
AUTO_STEP = "server.step='auto'"
DEFAULT_CONFIG = "configs/headline.toml"


def run_once(config: str, overrides: list[str], out: Path) -> tuple[float, float, float]:
    """One federation: mean seconds per round, mean bytes down per client-round (all rounds
    but the last) and the same in adapters."""
    from mira.config import load_config
    from mira.federation.simulation import run_simulation
    from mira.results.rundir import read_metrics

    cfg = load_config(config, overrides)
    run_simulation(cfg, out)
    rows = read_metrics(out)
    seconds = statistics.mean(r.seconds for r in rows.rounds)
    last = cfg.federation.rounds
    down = [r for r in rows.clients if r.round < last or last == 1]
    bytes_down = statistics.mean(r.bytes_down for r in down)
    adapters = statistics.mean(r.bytes_down / r.bytes_up for r in down if r.bytes_up)
    return seconds, bytes_down, adapters


def arms(every: list[int]) -> list[tuple[str, list[str]]]:
    """(name, overrides) of each kind of run of a pair: the fixed step, then auto with each
    ``server.auto.every``."""
    return [("fixed step", [FIXED_STEP])] + [
        (f"auto, every {n}", [AUTO_STEP, f"server.auto.every={n}"]) for n in every
    ]


def cost(args: argparse.Namespace) -> str:
    """Run the pairs; the markdown table of what they measured."""
    from mira.config import load_config

    overrides = list(args.set)
    if args.rounds:
        overrides.append(f"federation.rounds={args.rounds}")
    if args.clients:
        tasks = load_config(args.config, overrides).tasks
        overrides += [f"tasks.{i}.clients={args.clients}" for i in range(len(tasks))]
    cfg = load_config(args.config, [*overrides, AUTO_STEP])
    kinds = arms([int(n) for n in args.every.split(",")])
    load_before = os.getloadavg()
    measured: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in kinds}
    with tempfile.TemporaryDirectory(prefix="mira-auto-cost-") as tmp:
        for pair in range(args.pairs):
            for number, (name, step) in enumerate(kinds):
                out = Path(tmp) / f"{number}-{pair}"
                started = time.monotonic()
                measured[name].append(run_once(args.config, [*overrides, *step], out))
                print(f"pair {pair + 1} {name}: {time.monotonic() - started:.0f} s", flush=True)
    load_after = os.getloadavg()
    fixed = measured[kinds[0][0]]
    names = [name for name, _ in kinds]
    lines = [
        "| pair | "
        + " | ".join(f"{n}: s per round" for n in names)
        + " | "
        + " | ".join(f"{n} / fixed" for n in names[1:])
        + " |",
        "| --- |" + " ---: |" * (2 * len(names) - 1),
    ]
    for pair in range(args.pairs):
        seconds = [measured[n][pair][0] for n in names]
        ratios = [f"{s / seconds[0]:.2f}" for s in seconds[1:]]
        lines.append(
            f"| {pair + 1} | "
            + " | ".join(f"{s:.1f}" for s in seconds)
            + " | "
            + " | ".join(ratios)
            + " |"
        )
    means = [
        statistics.mean(a[0] / f[0] for f, a in zip(fixed, measured[n], strict=True))
        for n in names[1:]
    ]
    lines.append(
        "| **mean** |" + " |" * len(names) + " " + " | ".join(f"**{m:.2f}**" for m in means) + " |"
    )
    lines += [
        "",
        "| | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
        "| bytes down per client-round | "
        + " | ".join(f"{statistics.mean(m[1] for m in measured[n]):,.0f}" for n in names)
        + " |",
        "| the same in adapters | "
        + " | ".join(f"{statistics.mean(m[2] for m in measured[n]):.2f}" for n in names)
        + " |",
        "",
        f"{cfg.num_clients} clients x {cfg.federation.rounds} rounds x "
        f"{cfg.federation.local_steps} local steps, {cfg.model.name}; auto evaluates "
        f"{cfg.server.auto.evaluations or 'every'} candidates of a client each time it chooses. "
        f"{os.cpu_count()} cores ({platform.machine()}), load average (1 min) "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after.",
    ]
    return "\n".join(lines)


def fit(folders: list[str]) -> str:
    """The table of what 3 and 4 evaluations would have chosen in runs that evaluated every
    candidate."""
    import numpy as np

    from mira.core import rules
    from mira.results.rundir import read_metrics
    from mira.results.schema import RunLayout

    lines = [
        "| runs | evaluations | choices | same candidate | mean abs. difference of the "
        "chosen weight | median / 95th percentile relative error of an interpolated loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for folder in folders:
        rows = []  # (row, the client's equal-share point)
        for metrics in sorted(Path(folder).rglob("metrics.jsonl")):
            graph = json.loads(RunLayout(metrics.parent).graph.read_text())
            neighbours = {
                client: int(np.count_nonzero(weights))
                for client, weights in zip(graph["clients"], graph["adjacency"], strict=True)
            }
            rows += [
                (row, rules.sharing_anchor(neighbours[row.client]))
                for row in read_metrics(metrics.parent).clients
                if row.candidates and row.val_losses and len(row.candidates) > 4
            ]
        for evaluations in (3, 4):
            same, moved, errors = 0, [], []
            for row, anchor in rows:
                candidates = row.candidates or []
                losses = np.array(row.val_losses, dtype=float)
                spread = row.val_standard_errors
                points = rules.search_points(candidates, anchor, evaluations)
                fitted = rules.interpolate_losses(losses[points], candidates, points)
                others = [j for j in range(len(candidates)) if j not in points]
                errors += list(np.abs(fitted[others] - losses[others]) / losses[others])
                tolerance = 1.0 if spread else 0.0
                full = rules.choose_within(losses, spread, candidates, tolerance, anchor)
                short = rules.choose_within(fitted, spread, candidates, tolerance, anchor)
                same += full == short
                moved.append(abs(candidates[full] - candidates[short]))
            if not rows:
                continue
            lines.append(
                f"| {folder} | {evaluations} | {len(rows)} | {same / len(rows):.1%} | "
                f"{statistics.mean(moved):.3f} | {np.median(errors):.2%} / "
                f"{np.percentile(errors, 95):.1%} |"
            )
    return "\n".join(lines)


START, END = "<!-- auto-cost:start -->", "<!-- auto-cost:end -->"


def write_block(path: Path, block: str) -> None:
    """Put ``block`` between the file's generated-block markers (the text around them is
    kept), or write a new file of the module's description and the block."""
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + START + "\n" + block + END + rest.split(END, 1)[1]
    else:
        intro = __doc__.split("\n\n")[1]
        text = f"# What the learned mix costs\n\n{intro}\n\n{START}\n{block}{END}\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="mira config (default: %(default)s)"
    )
    parser.add_argument("--set", action="append", default=[], help="section.key=value override")
    parser.add_argument("--rounds", type=int, default=0, help="federation.rounds (0: the config's)")
    parser.add_argument("--clients", type=int, default=0, help="clients per task (0: the config's)")
    parser.add_argument("--pairs", type=int, default=2, help="fixed-then-auto pairs to run")
    parser.add_argument(
        "--every", default="1", help="server.auto.every of each auto run of a pair, e.g. 1,3"
    )
    parser.add_argument("--out", type=Path, help="markdown file to write")
    parser.add_argument("--fit", nargs="+", metavar="DIR", help="measure the search on these runs")
    args = parser.parse_args()
    if args.fit:
        print(fit(args.fit))
        return 0
    table = cost(args)
    print(table)
    if args.out:
        command = shlex.join(["python", "benchmarks/auto_cost.py", *sys.argv[1:]])
        block = f"Measured with:\n\n    .venv/bin/{command}\n\n{table}\n"
        write_block(args.out, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
