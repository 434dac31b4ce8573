"""Count the mix choices of `server.step = "auto"` runs: how often each client left its
equal-share point n/(n + 1), and how many clients end away from it; with ``--by-task``, per
task how many choices took the equal share, their own adapter (0), all of the mean (1) or a
weight between.

    python benchmarks/mix_choices.py docs/results/archive/auto-{iid,skew,shared}
    python benchmarks/mix_choices.py --by-task docs/results/{iid,skew,shared}

Reads the `alpha_choice` and `mix_weight` of every client row in
`DIR/runs/mira/seed-*/metrics.jsonl` (the table "Why (a) misses" of docs/results.md). The
equal share is 2/3 in those settings: every client there has two neighbours.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mira.results.rundir import read_metrics
from mira.results.schema import ComparisonLayout

EQUAL_SHARE = 2 / 3
RULE = "mira"


def count(run: Path) -> tuple[int, int, int, int, int]:
    """Choices, departures from the equal share, choices of 0, of 1, and clients whose final
    applied mix is more than 0.02 from the equal share."""
    chosen = [r for r in read_metrics(run).clients if r.alpha_choice is not None]
    last = max(r.round for r in chosen)
    final = [r for r in chosen if r.round == last]
    return (
        len(chosen),
        sum(abs(r.alpha_choice - EQUAL_SHARE) > 1e-3 for r in chosen if r.alpha_choice is not None),
        sum(r.alpha_choice == 0 for r in chosen),
        sum(r.alpha_choice == 1 for r in chosen),
        sum(abs((r.mix_weight or 0.0) - EQUAL_SHARE) > 0.02 for r in final),
    )


def by_task(run: Path) -> dict[str, tuple[int, int, int, int, int]]:
    """Per task: choices, and of them the equal share, 0, 1 and a weight between."""
    kinds: dict[str, list[int]] = {}
    for r in read_metrics(run).clients:
        if r.alpha_choice is None:
            continue
        row = kinds.setdefault(r.task, [0, 0, 0, 0, 0])
        row[0] += 1
        if abs(r.alpha_choice - EQUAL_SHARE) <= 1e-3:
            row[1] += 1
        elif r.alpha_choice == 0:
            row[2] += 1
        elif r.alpha_choice == 1:
            row[3] += 1
        else:
            row[4] += 1
    return {task: (a, b, c, d, e) for task, (a, b, c, d, e) in kinds.items()}


def main(args: list[str]) -> None:
    tasks = "--by-task" in args
    folders = [a for a in args if a != "--by-task"]
    if tasks:
        print("folder | seed | task | choices | equal share | 0 | 1 | between")
    else:
        print("folder | seed | choices | departures | of which 0 | of which 1 | final mix off")
    for folder in folders:
        found = ComparisonLayout(Path(folder)).run_folders()
        runs = sorted((seed, run) for method, seed, run in found if method == RULE)
        for _, run in runs:
            if not run.metrics.is_file():
                continue
            if tasks:
                for task, numbers in by_task(run.dir).items():
                    cells = " | ".join(str(n) for n in numbers)
                    print(f"{folder} | {run.dir.name} | {task} | {cells}")
                continue
            numbers = " | ".join(str(n) for n in count(run.dir))
            print(f"{folder} | {run.dir.name} | {numbers}")


if __name__ == "__main__":
    main(sys.argv[1:])
