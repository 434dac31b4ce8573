"""What Flower costs: the same federation through `mira run` and through a bare loop, as a
fixed cost and a cost per round.

Both do exactly the same work: the same clients, rounds, local steps, evaluations (the eval
loss of every client after every round, task metrics after the last) and server rule, with
the same seeds. `mira run`'s side is the Simulation Engine (Ray) with one client process,
messages through Flower, checkpoints, adapters and metrics written every round; the report at
the end is left out of the timing. The bare side is one process that loads the model once,
calls the same peft training and evaluation functions and the same server rule directly, and
writes nothing. Both take the machine's cores, and each run is a new process, timed from its
start to its end. The sweep runs both for several numbers of rounds and fits a line to each,
wall time = fixed + rounds x per round: the intercept is the fixed cost (imports, model load,
for `mira run` also the engine's start and stop and the clients' first contact), the slope
the cost of one round, and their ratio is Flower's overhead per round. The largest difference
of their final eval losses is written beside them (the two must compute the same thing).

    .venv/bin/python benchmarks/overhead.py --out docs/overhead.md
    .venv/bin/python benchmarks/overhead.py --tiny --rounds 1,2,3   # the tiny random model

Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tomli_w

ROOT = Path(__file__).resolve().parents[1]

CONFIG = [
    "federation.local_steps=4",
    "federation.workers=1",
    "federation.metrics_every=4",
    "server.method=mira",
    "server.step=0.3",
    "server.graph=tasks",
    "data.train_size=32",
    "data.eval_size=12",
]
"""The quickstart's clients with these settings; ``--tiny``: tests/conftest.py's tiny config."""

# One side of the comparison in a process of its own: `python -c SIDE CONFIG ROUNDS OUT`
# prints the final eval losses as JSON.
MIRA_SIDE = (
    "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[4]); "
    "from overhead import run_mira; "
    "print(json.dumps(run_mira(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))))"
)
BARE_SIDE = (
    "import json, sys; sys.path.insert(0, sys.argv[4]); "
    "from overhead import run_bare; "
    "print(json.dumps(run_bare(sys.argv[1], int(sys.argv[2]))))"
)


def config_for(path: str, rounds: int):
    from mira.config import load_config

    return load_config(path, [f"federation.rounds={rounds}"])


def run_mira(path: str, rounds: int, out: Path) -> list[float]:
    """`mira run`'s federation without its report: the final eval losses."""
    from mira.federation.simulation import run_simulation
    from mira.results.rundir import read_metrics

    run_simulation(config_for(path, rounds), out)
    return [r.eval_loss for r in read_metrics(out).clients_of(rounds)]


def run_bare(path: str, rounds: int) -> list[float]:
    """The same federation in this process without Flower: the final eval losses."""
    return bare_loop(config_for(path, rounds))[1]


def bare_loop(cfg, threads: int | None = None) -> tuple[float, list[float]]:
    """The federation in one process without Flower: seconds and the final eval losses.

    ``threads``: torch's intra-op threads (default: the machine's cores)."""
    import torch

    from mira.client import learner
    from mira.client.chat import chat_format
    from mira.client.lora import lora_model
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
    chat = chat_format(tok, cfg.data.chat_template)  # as the clients encode their examples
    ranks = [client_rank(cfg, p) for p in range(cfg.num_clients)]
    inits = {r: model.shared_init(cfg.lora, r, cfg.federation.seed) for r in set(ranks)}
    data = [load_client_data(cfg, p) for p in range(cfg.num_clients)]
    train = [[learner.encode(tok, e, cfg.model.max_length, chat) for e in d.train] for d in data]
    evals = [[learner.encode(tok, e, cfg.model.max_length, chat) for e in d.eval] for d in data]
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


def timed_side(side: str, config: Path, rounds: int, out: Path) -> tuple[float, list[float]]:
    """One side in a new process: its wall time from start to end, and its final losses."""
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            side,
            str(config),
            str(rounds),
            str(out),
            str(Path(__file__).parent),
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{side[:60]}... failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def fit(rounds: list[int], seconds: list[float]) -> tuple[float, float]:
    """(fixed, per round): the least-squares line seconds = fixed + rounds x per round."""
    slope, intercept = np.polyfit(np.array(rounds, float), np.array(seconds, float), 1)
    return float(intercept), float(slope)


def write_config(folder: Path, tiny: bool, config: str | None) -> tuple[Path, str, list[str]]:
    """The config both sides run, as a file; its description and the overrides shown."""
    from mira.config import load_config, to_toml

    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import tiny_raw, write_tiny_tasks

        raw = tiny_raw(write_tiny_tasks(folder), folder / "cache")
        path = folder / "tiny.toml"
        path.write_text(tomli_w.dumps(raw))
        return path, "tests/conftest.py's tiny config", []
    cfg = load_config(config, CONFIG)
    path = folder / "config.toml"
    path.write_text(to_toml(cfg))
    return path, f"{config or 'the quickstart'}'s clients", CONFIG


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="markdown file to write")
    parser.add_argument("--config", default=None, help="mira config (default: the quickstart)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model instead")
    parser.add_argument("--rounds", default="1,2,4", help="rounds swept (default: %(default)s)")
    args = parser.parse_args()
    sweep = sorted({int(r) for r in args.rounds.split(",")})
    if len(sweep) < 2:
        parser.error("--rounds needs two numbers of rounds at least, to tell fixed from per round")
    with tempfile.TemporaryDirectory(prefix="mira-overhead-") as tmp:
        folder = Path(tmp)
        config, described, overrides = write_config(folder, args.tiny, args.config)
        cfg = config_for(str(config), sweep[-1])
        from mira.client.base import prepare_model

        prepare_model(cfg.model)  # built or converted once, before anything is timed
        load_before = os.getloadavg()
        walls: dict[str, list[float]] = {"mira": [], "bare": []}
        losses: dict[str, list[float]] = {}
        for rounds in sweep:
            for name, side in (("mira", MIRA_SIDE), ("bare", BARE_SIDE)):
                seconds, losses[name] = timed_side(side, config, rounds, folder / f"run-{rounds}")
                walls[name].append(seconds)
                print(f"{name} {rounds} round(s): {seconds:.1f} s", flush=True)
        load_after = os.getloadavg()
    (mira_fixed, mira_round), (bare_fixed, bare_round) = (fit(sweep, walls[k]) for k in walls)
    difference = max(abs(a - b) for a, b in zip(losses["mira"], losses["bare"], strict=True))

    def row(values: list[float]) -> str:
        return ", ".join(f"{v:.1f}" for v in values) + " s"

    table = "\n".join(
        [
            "| what | value |",
            "| --- | --- |",
            f"| clients x local steps | {cfg.num_clients} x {cfg.federation.local_steps} "
            f"({cfg.model.name}) |",
            f"| rounds swept | {', '.join(map(str, sweep))} |",
            f"| `mira run` (Flower Simulation Engine), by rounds | {row(walls['mira'])} |",
            f"| bare loop (one process, no Flower), by rounds | {row(walls['bare'])} |",
            f"| `mira run` fixed cost (intercept) | {mira_fixed:.1f} s |",
            f"| bare loop fixed cost (intercept) | {bare_fixed:.1f} s |",
            f"| `mira run` per round (slope) | {mira_round:.2f} s |",
            f"| bare loop per round (slope) | {bare_round:.2f} s |",
            f"| **per-round ratio** | **{mira_round / bare_round:.3f}** |",
            f"| **fixed cost beyond the bare loop's** | **{mira_fixed - bare_fixed:.1f} s** |",
            f"| largest difference of the final eval losses ({sweep[-1]} rounds) | "
            f"{difference:.2g} |",
            f"| cores | {os.cpu_count()} ({platform.machine()}) |",
            f"| load average before / after (1 min) | {load_before[0]:.2f} / {load_after[0]:.2f} |",
        ]
    )
    print(table)
    if args.out:
        command = "    .venv/bin/python benchmarks/overhead.py" + (" --tiny" if args.tiny else "")
        command += f" --rounds {','.join(map(str, sweep))} --out {args.out}"
        settings = (", ".join(f"`{c}`" for c in overrides) + ", on " if overrides else "") + (
            described
        )
        args.out.write_text(
            "# Framework overhead\n\n"
            + __doc__.split("\n\n")[1]
            + "\n\nMeasured with:\n\n"
            + command
            + f"\n\nSettings: {settings}.\n\n"
            + table
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
