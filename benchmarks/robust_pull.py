"""docs/robust_pull.md: what one sign-flipped client does to its neighbours, with and without
the robust pull (`server.robust`), under a fixed step, the learned mix and cluster-fedavg.

    .venv/bin/python benchmarks/robust_pull.py configs/headline.toml --seed 1 \\
        --out runs/robust --doc docs/robust_pull.md

Two comparisons of the same methods, each with and without `server.robust = MULTIPLE`:
`OUT/clean` (every client honest; the same runs `mira compare` makes) and `OUT/flipped`, where
one client (`--client`, default the first of the config) sends every round the update it
trained multiplied by -9 (tests/faults.py, kind "flip": inside the norm screen's 10x bound).
The table gives, for the final round, the personalised eval loss of the flipped client's
task-mates (its neighbours on the cluster graph), of every honest client, and the worst honest
client. Runs are resumed and finished runs skipped, like `mira compare`; a folder written with
another config is refused. Takes about 12 runs of the config's length.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULTY_APP = "tests.faults:faulty_app"
METHODS = ("mira@server.step=0.1", "mira", "cluster-fedavg")


def variants(methods: list[str], multiple: str) -> list[str]:
    """Every method without and with the robust pull."""
    return [v for m in methods for v in (m, f"{m}@server.robust={multiple}")]


def flip_runner(client: str, rounds: int):
    """A runner for run_comparison that runs with one client's update flipped every round."""
    from mira.federation.simulation import run_simulation

    faults = [{"client": client, "round": r, "kind": "flip"} for r in range(1, rounds + 1)]

    def run(cfg, folder: Path, resume: bool = False) -> None:
        os.environ["MIRA_TEST_FAULTS"] = json.dumps(faults)
        run_simulation(cfg, folder, resume=resume, clients=FAULTY_APP)

    return run


def final_losses(run: Path) -> dict[str, tuple[str, float]]:
    """{client: (task, personalised eval loss)} of the run's last round."""
    from mira.results.rundir import read_metrics

    rows = read_metrics(run).final_clients()
    return {r.client: (r.task, r.eval_loss) for r in rows if r.eval_loss is not None}


def accepted_updates(run: Path, client: str) -> str:
    """'accepted of trained' rounds of ``client`` (an update refused by the norm screen has no
    train loss)."""
    from mira.results.rundir import read_metrics

    rows = [r for r in read_metrics(run).clients if r.client == client and r.sampled]
    return f"{sum(r.train_loss is not None for r in rows)} of {len(rows)}"


def mates_mix_weight(run: Path, client: str) -> str:
    """The mean mix weight (the share taken from the neighbours, ``mix_weight``) of the rows of
    ``client``'s task-mates over every round they trained: what auto's validation choice and
    the robust pull left of the pull toward a poisoned neighbourhood."""
    from mira.results.rundir import read_metrics

    rows = read_metrics(run).clients
    task = next((r.task for r in rows if r.client == client), None)
    weights = [
        r.mix_weight
        for r in rows
        if r.task == task and r.client != client and r.mix_weight is not None
    ]
    return f"{statistics.fmean(weights):.3f}" if weights else "-"


def table(out: Path, methods: list[str], seed: int, client: str) -> list[str]:
    from mira.results.schema import ComparisonLayout

    lines = [
        "| method | clients | flipped client's task-mates | every honest client | worst honest "
        "| task-mates' mix weight | flipped client's updates accepted |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in methods:
        for setting in ("clean", "flipped"):
            run = ComparisonLayout(out / setting).run(method, seed)
            if not run.metrics.is_file():
                lines.append(f"| {method} | {setting} | not run | | | | |")
                continue
            losses = final_losses(run.dir)
            accepted = accepted_updates(run.dir, client)
            task = losses.get(client, ("", 0.0))[0]
            honest = {c: v for c, v in losses.items() if c != client}
            mates = [v for c, (t, v) in honest.items() if t == task]
            every = [v for _, v in honest.values()]
            lines.append(
                f"| {method} | {setting} | {statistics.fmean(mates):.4f} | "
                f"{statistics.fmean(every):.4f} | {max(every):.4f} | "
                f"{mates_mix_weight(run.dir, client)} | {accepted} |"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs" / "headline.toml"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--multiple", default="2", help="server.robust of the defended runs")
    parser.add_argument("--client", default=None, help="the flipped client (default: first)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--out", type=Path, default=Path("runs/robust"))
    parser.add_argument("--doc", type=Path, default=None, help="write the table here")
    args = parser.parse_args()
    # The Simulation Engine's client processes import the faulty ClientApp from tests/.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    sys.path.insert(0, str(ROOT))
    from mira.config import load_config
    from mira.experiments.compare import run_comparison

    # The undefended runs are explicit, whatever server.robust's default.
    overrides = ["server.robust=0", *args.overrides]
    cfg = load_config(args.config, overrides)
    client = args.client or cfg.client_ids[0]
    methods = variants(args.methods.split(","), args.multiple)
    run_comparison(args.config, overrides, methods, [args.seed], args.out / "clean")
    runner = flip_runner(client, cfg.federation.rounds)
    run_comparison(
        args.config,
        overrides,
        methods,
        [args.seed],
        args.out / "flipped",
        runner=runner,
        resume=lambda c, f: runner(c, f, resume=True),
    )
    command = " ".join(["python benchmarks/robust_pull.py", *sys.argv[1:]])
    lines = [
        "# The robust pull against a sign-flipped client",
        "",
        f"Client `{client}` sends, every round, its trained update multiplied by -9; "
        f"`server.robust = {args.multiple}` clips every neighbour's difference to "
        f"{args.multiple} times the round's median edge (docs/design.md, \"Faults and "
        "trust\"). Personalised eval loss after the last round (each honest client's own "
        f"adapter on its own eval split), seed {args.seed}. Written by:",
        "",
        f"    {command}",
        "",
        *table(args.out, methods, args.seed, client),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.doc is not None:
        notes = "<!-- notes: kept when the table above is measured again -->"
        old = args.doc.read_text() if args.doc.exists() else ""
        kept = "\n" + notes + old.split(notes, 1)[1] if notes in old else ""
        args.doc.write_text(text + kept)
    return 0


if __name__ == "__main__":
    sys.exit(main())
