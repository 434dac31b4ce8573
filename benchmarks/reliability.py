"""docs/reliability.md: every fault and bad input mira is tested against, and what happened.

Runs the fault tests (tests/e2e/test_faults.py, tests/unit/results/test_rundir.py,
tests/unit/federation/test_preflight.py, tests/unit/data/test_data.py, the SIGKILL-and-resume
test and the deployment tests: refused SuperNodes, a registered SuperNode claiming another
node's partition-id against a client table, a SuperNode killed mid-round) with
MIRA_RELIABILITY_LOG set: each test records the fault it injected, what the run did, how many
rounds it completed and how many clients' adapters were lost (missing, unreadable or not
finite). This script writes those records as a table. A test that fails writes no record, and
the script says so and exits 1.

    .venv/bin/python benchmarks/reliability.py --out docs/reliability.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/e2e/test_faults.py",
    "tests/unit/results/test_rundir.py",
    "tests/unit/federation/test_preflight.py",
    "tests/unit/data/test_data.py",
    "tests/e2e/test_resume.py",
    "tests/e2e/test_deployment.py",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("tests", nargs="*", default=TESTS, help="test files to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "records.jsonl"
        env = {**os.environ, "MIRA_RELIABILITY_LOG": str(log)}
        existing = [t for t in args.tests if (ROOT / t).is_file()]
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *existing],
            cwd=ROOT,
            env=env,
        )
        records = (
            [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        )
    lines = [
        "# Reliability: faults and bad inputs",
        "",
        "Every fault and bad input below was injected by a test (faults live in tests/, never "
        "behind switches in the product) into a real run of the tiny model, and the row says "
        "what the run did. Written by:",
        "",
        "    .venv/bin/python benchmarks/reliability.py --out docs/reliability.md",
        "",
        "Adapters lost counts the clients whose saved adapter is missing, unreadable or not "
        "finite at the end.",
        "",
        "| fault or bad input | what happened | rounds completed | adapters lost | test |",
        "| --- | --- | --- | ---: | --- |",
    ]
    for r in records:
        lines.append(
            f"| {r['fault']} | {r['happened']} | {r['rounds']} | {r['adapters_lost']} | "
            f"`{r['test']}` |"
        )
    if done.returncode != 0:
        lines += ["", f"pytest exited with {done.returncode}: some tests failed and left no row."]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} ({len(records)} rows)")
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
