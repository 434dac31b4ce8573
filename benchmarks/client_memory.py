"""What a client process holds: peak memory under `mira run` against the same work in one thread.

`mira run` serves its clients from `federation.workers` client processes of the Simulation
Engine; each reports its peak resident memory with every evaluation (`peak_memory_mb` in
metrics.jsonl, the process's ru_maxrss). The reference is the same federation (the same
clients, rounds, steps, evaluations and server rule; benchmarks/overhead.py's bare loop) in
one fresh process with one torch thread, which is what each client process runs: one model,
its clients one after another. Their ratio shows what the engine and mira's message handling
add to a client's memory. Memory does not depend on how busy the machine is, so this can run
beside other work (not beside work that leaves it short of memory).

    .venv/bin/python benchmarks/client_memory.py --out docs/client_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = [
    "federation.rounds=2",
    "federation.local_steps=3",
    "federation.workers=2",
    "federation.metrics_every=2",
    "server.method=mira",
    "server.step=0.3",
    "server.graph=tasks",
    "data.train_size=32",
    "data.eval_size=12",
]


def bare_peak_mb() -> tuple[float, list[float]]:
    """Peak resident memory (MiB) and final eval losses of the bare loop in a fresh process."""
    script = (
        "import json, resource, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from overhead import bare_loop\n"
        "from mira.config import load_config\n"
        f"cfg = load_config(None, {CONFIG!r})\n"
        "_, losses = bare_loop(cfg, threads=1)\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(json.dumps({'peak_mb': peak, 'losses': losses}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["peak_mb"]), [float(v) for v in result["losses"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="markdown file to write")
    args = parser.parse_args()
    from mira.config import load_config
    from mira.federation.simulation import run_simulation
    from mira.results.rundir import read_metrics

    cfg = load_config(None, CONFIG)
    with tempfile.TemporaryDirectory(prefix="mira-client-memory-") as tmp:
        out = Path(tmp) / "run"
        run_simulation(cfg, out)
        rows = read_metrics(out)
    peaks = {
        server_round: max(
            float(r.peak_memory_mb)
            for r in rows.clients_of(server_round)
            if r.peak_memory_mb is not None
        )
        for server_round in range(1, cfg.federation.rounds + 1)
    }
    losses = [r.eval_loss for r in rows.clients_of(cfg.federation.rounds)]
    bare_mb, bare_losses = bare_peak_mb()
    flower_mb = max(peaks.values())
    difference = max(abs(a - b) for a, b in zip(losses, bare_losses, strict=True))
    by_round = ", ".join(f"{peaks[r]:.0f}" for r in sorted(peaks))
    table = "\n".join(
        [
            "| what | value |",
            "| --- | --- |",
            f"| clients x rounds x local steps | {cfg.num_clients} x {cfg.federation.rounds} x "
            f"{cfg.federation.local_steps} ({cfg.model.name}), "
            f"{cfg.federation.workers} client processes |",
            f"| `mira run`: largest client-process peak, by round (MiB) | {by_round} |",
            f"| bare loop, one process, one thread: peak (MiB) | {bare_mb:.0f} |",
            f"| **ratio** (`mira run` / bare loop) | **{flower_mb / bare_mb:.2f}** |",
            f"| largest difference of the final eval losses | {difference:.2g} |",
            f"| cores | {os.cpu_count()} ({platform.machine()}) |",
        ]
    )
    print(table)
    if args.out:
        args.out.write_text(
            "# Client memory\n\n"
            + __doc__.split("\n\n")[1]
            + "\n\nMeasured with:\n\n    .venv/bin/python benchmarks/client_memory.py "
            "--out docs/client_memory.md\n\nSettings: "
            + ", ".join(f"`{c}`" for c in CONFIG)
            + ", on the quickstart's clients.\n\n"
            + table
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
