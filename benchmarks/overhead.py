"""What Flower costs: the same federation through `mira run` and through a bare loop.

Both do exactly the same work on the real model: the same clients, rounds, local steps,
evaluations (the eval loss of every client after every round, task metrics after the last) and
server rule, with the same seeds. `mira run`'s side is the Simulation Engine (Ray) with one
client process, messages through Flower, checkpoints, adapters and metrics written every
round, and the report at the end is left out of the timing. The bare side is one process that
loads the model once, calls the same peft training and evaluation functions and the same
server rule directly, and writes nothing. Both take the machine's cores. The ratio of the two
wall times, from one run of each, is written to docs/overhead.md together with the largest
difference of their final eval losses (the two must compute the same thing).

    .venv/bin/python benchmarks/overhead.py --out docs/overhead.md

Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

CONFIG = [
    "federation.rounds=4",
    "federation.local_steps=4",
    "federation.workers=1",
    "federation.metrics_every=4",
    "server.method=mira",
    "server.step=0.3",
    "server.graph=tasks",
    "data.train_size=32",
    "data.eval_size=12",
]


def bare_loop(cfg, threads: int | None = None) -> tuple[float, list[float]]:
    """The federation in one process without Flower: seconds and the final eval losses.

    ``threads``: torch's intra-op threads (default: the machine's cores)."""
    import torch

    from mira.client import learner
    from mira.client.model import lora_model
    from mira.client.ranks import client_rank
    from mira.core import rules
    from mira.core.adapters import lora_scale
    from mira.data import load_client_data
    from mira.federation.client_app import training_seed
    from mira.graph.build import static_graph

    started = time.monotonic()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    model = lora_model(cfg.model)
    tok = model.tokenizer
    ranks = [client_rank(cfg, p) for p in range(cfg.num_clients)]
    inits = {r: model.shared_init(cfg.lora, r, cfg.federation.seed) for r in set(ranks)}
    data = [load_client_data(cfg, p) for p in range(cfg.num_clients)]
    train = [[learner.encode(tok, e, cfg.model.max_length) for e in d.train] for d in data]
    evals = [[learner.encode(tok, e, cfg.model.max_length) for e in d.eval] for d in data]
    graph = static_graph(cfg)
    assert graph is not None
    adapters = [dict(inits[r]) for r in ranks]
    losses: list[float] = []
    for server_round in range(1, cfg.federation.rounds + 1):
        trained = []
        for p in range(cfg.num_clients):
            name = model.activate(cfg.lora, ranks[p])
            model.set_adapter(name, adapters[p])
            learner.train_steps(
                model.peft,
                model.lora_parameters(name),
                train[p],
                cfg,
                pad_id=tok.pad_token_id,
                seed=training_seed(cfg.federation.seed, p, server_round),
                server_round=server_round,
            )
            trained.append(model.get_adapter(name))
        adapters = rules.apply_rule(
            cfg.server.method,
            trained,
            adjacency=graph.adjacency,
            step=float(cfg.server.step),
            clusters=graph.clusters,
            weights=[len(d.train) for d in data],
            active=[True] * cfg.num_clients,
            ranks=ranks,
            scales=[lora_scale(cfg.lora.alpha, r, cfg.lora.rslora) for r in ranks],
            pull_space=cfg.server.pull_space,
        )
        losses = []
        for p in range(cfg.num_clients):
            name = model.activate(cfg.lora, ranks[p])
            model.set_adapter(name, adapters[p])
            losses.append(
                learner.eval_loss(model.peft, evals[p], cfg.train.eval_batch_size, tok.pad_token_id)
            )
            if server_round == cfg.federation.rounds:
                learner.task_metrics(model.peft, tok, data[p].task, data[p].eval, cfg)
    return time.monotonic() - started, losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="markdown file to write")
    parser.add_argument("--config", default=None, help="mira config (default: the quickstart)")
    args = parser.parse_args()
    from mira.config import load_config
    from mira.federation.simulation import run_simulation
    from mira.results.rundir import read_metrics

    cfg = load_config(args.config, CONFIG)
    with tempfile.TemporaryDirectory(prefix="mira-overhead-") as tmp:
        out = Path(tmp) / "run"
        load_before = os.getloadavg()
        started = time.monotonic()
        run_simulation(cfg, out)
        flower_seconds = time.monotonic() - started
        flower_losses = [r.eval_loss for r in read_metrics(out).clients_of(cfg.federation.rounds)]
    bare_seconds, bare_losses = bare_loop(cfg)
    load_after = os.getloadavg()
    ratio = flower_seconds / bare_seconds
    difference = max(abs(a - b) for a, b in zip(flower_losses, bare_losses, strict=True))
    table = "\n".join(
        [
            "| what | value |",
            "| --- | --- |",
            f"| clients x rounds x local steps | {cfg.num_clients} x {cfg.federation.rounds} x "
            f"{cfg.federation.local_steps} ({cfg.model.name}) |",
            f"| `mira run` (Flower Simulation Engine) | {flower_seconds:.1f} s |",
            f"| bare loop (one process, no Flower) | {bare_seconds:.1f} s |",
            f"| **ratio** | **{ratio:.3f}** |",
            f"| largest difference of the final eval losses | {difference:.2g} |",
            f"| cores | {os.cpu_count()} ({platform.machine()}) |",
            f"| load average before / after (1 min) | {load_before[0]:.2f} / {load_after[0]:.2f} |",
        ]
    )
    print(table)
    if args.out:
        args.out.write_text(
            "# Framework overhead\n\n"
            + __doc__.split("\n\n")[1]
            + "\n\nMeasured with:\n\n    .venv/bin/python benchmarks/overhead.py "
            "--out docs/overhead.md\n\nSettings: "
            + ", ".join(f"`{c}`" for c in CONFIG)
            + ", on the quickstart's clients.\n\n"
            + table
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
