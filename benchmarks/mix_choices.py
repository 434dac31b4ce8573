"""Count the mix choices of `server.step = "auto"` runs: how often each client left its
equal-share point n/(n + 1), and how many clients end away from it.

    python benchmarks/mix_choices.py docs/results/archive/auto-{iid,skew,shared}

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


def main(folders: list[str]) -> None:
    print("folder | seed | choices | departures | of which 0 | of which 1 | final mix off")
    for folder in folders:
        found = ComparisonLayout(Path(folder)).run_folders()
        runs = sorted((seed, run) for method, seed, run in found if method == RULE)
        for _, run in runs:
            if not run.metrics.is_file():
                continue
            numbers = " | ".join(str(n) for n in count(run.dir))
            print(f"{folder} | {run.dir.name} | {numbers}")


if __name__ == "__main__":
    main(sys.argv[1:])
