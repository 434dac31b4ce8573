"""docs/privacy.md's measurement: how exactly a client reconstructs what its neighbours trained
from the adapter it receives, without DP and at two noise levels, against what the noise
costs in personalised eval loss; mira (fixed step) and fedit.

Each run is a real simulation (:func:`mira.federation.simulation.run_simulation`) whose
ClientApp is mira's own plus one mod, ``audit`` (the same pattern as tests/faults.py: the
benchmark adds nothing to the product). For every message the mod saves, per client and
exchange, the adapter the server sent (``sent``: the start of round r, and the adapter pulled
after round r - 1); for every trained reply, the adapter the client trained (``trained``) and
the one it uploads (``uploaded``): with DP, :func:`mira.client.privacy.privatise_update` of
``trained`` from ``sent`` (clip ``clip_norm``, noise multiplier z), exactly what the client
app does with ``privacy.clip_norm`` > 0; without, ``trained`` itself.

The attack (one honest-but-curious client k, fixed-step rules, factor space, every client
training every round): the server mixes the uploads with the row m_k of the rule's mixing
matrix (:func:`mira.core.rules.mixing_for`, from the run's graph.json), so client k receives
W_recv = m_kk W_k^up + sum_{l != k} m_kl W_l^up. It knows its own upload and m_kk (the config
it is sent names the method, step and tasks), hence

    reconstruction_k = (W_recv - m_kk W_k^up) / (1 - m_kk) = sum_{l != k} m_kl W_l^up / (1 - m_kk)

the weighted mean of what the others uploaded: under mira with one neighbour (graph "tasks",
two clients per task) that neighbour's adapter, under fedit the mean of all others. The
error is measured against the same mean of what they TRAINED, relative to the size of their
updates: ||reconstruction - T|| / ||T - S||, T and S the m-weighted means of the others'
trained and sent adapters. 0 means the client holds its neighbours' work exactly; 1 means it is
off by as much as the whole update. Reported with the final personalised eval loss and the
epsilon each client spent (:func:`mira.core.accounting.client_epsilon`, every round trained).

Without ``--clip``, C is the median update norm of the run without DP (so clipping bites about
half the updates). Example (about an hour on 2 CPU cores; --model tiny-random-llama for a
smoke run):

    .venv/bin/python benchmarks/privacy.py --out docs/privacy_table.md
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mira.core import rules
from mira.core.accounting import client_epsilon
from mira.core.adapters import Adapter
from mira.results.schema import RunLayout

ROOT = Path(__file__).resolve().parents[1]
AUDIT = "MIRA_PRIVACY_AUDIT"  # JSON {"dir", "clip_norm", "noise_multiplier", "seed"}
SENT, TRAINED, UPLOADED = "sent", "trained", "uploaded"

# The real-model setting: two tasks of different kinds, two clients each, so that under
# graph "tasks" every client has exactly one neighbour.
DEFAULT_OVERRIDES = [
    "model.name=smollm2-135m-instruct",
    "model.max_length=64",
    "lora.rank=8",
    "lora.alpha=16",
    "federation.rounds=4",
    "federation.local_steps=3",
    "federation.workers=2",
    "federation.metrics_every=4",
    "server.step=0.3",
    "server.graph=tasks",
    "data.train_size=48",
    "data.val_size=0",
    "data.eval_size=12",
]
DEFAULT_TASKS = ["sentiment", "topic"]


# ---------------------------------------------------------------------------- the ClientApp mod


def _save(folder: Path, name: str, adapter: Adapter) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in adapter.items()}, str(folder / name))


def audit(msg, context, call_next):
    """Record what a client was sent, trained and uploaded; apply DP to the upload when the
    audit asks for it (as the client app does with ``privacy.clip_norm`` > 0)."""
    from mira.client.privacy import privatise_update
    from mira.federation import codec

    settings = os.environ.get(AUDIT)
    if settings is None or msg.metadata.message_type == "query":
        return call_next(msg, context)
    audit_cfg = json.loads(settings)
    instruction, _ = codec.decode_instruction(msg)
    client, exchange = instruction.client_id, instruction.round
    folder = Path(audit_cfg["dir"]) / f"{exchange:03d}" / client
    sent = instruction.adapter
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    _save(folder, f"{SENT}.safetensors", sent)
    trained = codec.decode_reply(reply).trained
    if trained is None:
        return reply
    uploaded = trained
    if audit_cfg["clip_norm"] > 0:
        partition = int(context.node_config.get("partition-id", 0))
        rng = np.random.default_rng([audit_cfg["seed"], partition, exchange])
        uploaded, _ = privatise_update(
            sent, trained, audit_cfg["clip_norm"], audit_cfg["noise_multiplier"], rng
        )
        reply = codec.rewrite_reply(reply, lambda r: setattr(r, "trained", uploaded))
    _save(folder, f"{TRAINED}.safetensors", trained)
    _save(folder, f"{UPLOADED}.safetensors", uploaded)
    return reply


def audited_app():
    """mira's ClientApp with :func:`audit` inside its deadline mod."""
    from flwr.clientapp import ClientApp

    from mira.federation import client_app

    app = ClientApp(mods=[client_app.deadline_mod, audit])
    app.query()(client_app.identify)
    app.train()(client_app.train)
    app.evaluate()(client_app.evaluate)
    return app


# Bound at the top level: Flower's simulation processes import it by name (privacy:AUDITED).
AUDITED = audited_app()


# ---------------------------------------------------------------------------- the attack


def _norm(adapter: Adapter) -> float:
    return float(
        np.sqrt(sum(float(np.sum(np.square(v.astype(np.float64)))) for v in adapter.values()))
    )


def _combine(terms: list[tuple[float, Adapter]]) -> Adapter:
    """sum_i w_i A_i, tensor by tensor, in float64."""
    out: Adapter = {}
    for key in sorted(terms[0][1]):
        total = np.zeros(terms[0][1][key].shape, dtype=np.float64)
        for weight, adapter in terms:
            total += weight * adapter[key].astype(np.float64)
        out[key] = total
    return out


def reconstruct_others(received: Adapter, own_upload: Adapter, self_weight: float) -> Adapter:
    """What client k learns of the others from W_recv = m_kk W_k^up + sum_{l != k} m_kl W_l^up:
    their weighted mean sum_{l != k} m_kl W_l^up / (1 - m_kk)."""
    if not 0.0 <= self_weight < 1.0:
        raise ValueError(f"self weight must be in [0, 1), got {self_weight!r}")
    rest = 1.0 - self_weight
    return _combine([(1.0 / rest, received), (-self_weight / rest, own_upload)])


def others_mean(row: np.ndarray, k: int, adapters: list[Adapter]) -> Adapter:
    """sum_{l != k} m_kl W_l / (1 - m_kk)."""
    rest = 1.0 - float(row[k])
    return _combine([(float(row[j]) / rest, a) for j, a in enumerate(adapters) if j != k])


def relative_error(estimate: Adapter, target: Adapter, start: Adapter) -> float:
    """||estimate - target|| / ||target - start||."""
    diff = {k: estimate[k] - target[k] for k in target}
    update = {k: target[k].astype(np.float64) - start[k] for k in target}
    return _norm(diff) / max(_norm(update), 1e-30)


def load_audit(folder: Path) -> dict[int, dict[str, dict[str, Adapter]]]:
    """{exchange: {client: {kind: adapter}}} from an audit folder."""
    from safetensors.numpy import load_file

    found: dict[int, dict[str, dict[str, Adapter]]] = {}
    for path in sorted(folder.glob("*/*/*.safetensors")):
        exchange, client, kind = int(path.parent.parent.name), path.parent.name, path.stem
        found.setdefault(exchange, {}).setdefault(client, {})[kind] = load_file(str(path))
    return found


def attack(cfg, run_dir: Path, audit_dir: Path) -> dict[str, Any]:
    """Per round, every client's reconstruction error of the others' trained adapters, and
    the update norms (trained - sent)."""
    graph = json.loads(RunLayout(run_dir).graph.read_text())
    clients = list(graph["clients"])
    mixing = rules.mixing_for(
        cfg.server.method,
        adjacency=np.asarray(graph["adjacency"], dtype=np.float64),
        step=float(cfg.server.step),
        clusters=graph["clusters"],
        weights=[cfg.data.train_size - cfg.data.val_size] * len(clients),
        active=[True] * len(clients),
    )
    records = load_audit(audit_dir)
    errors: dict[int, list[float]] = {}
    exact: dict[int, list[float]] = {}
    norms: list[float] = []
    for server_round in range(1, cfg.federation.rounds + 1):
        now, after = records.get(server_round, {}), records.get(server_round + 1, {})
        if not all(c in now and UPLOADED in now[c] and c in after for c in clients):
            continue  # a client missed the round: its neighbours' rows mixed a stale upload
        uploads = [now[c][UPLOADED] for c in clients]
        trained = [now[c][TRAINED] for c in clients]
        sent = [now[c][SENT] for c in clients]
        norms += [
            _norm({k: t[k].astype(np.float64) - s[k] for k in t})
            for t, s in zip(trained, sent, strict=True)
        ]
        for k, client in enumerate(clients):
            row = mixing[k]
            if row[k] >= 1.0:
                continue  # no neighbour: nothing to reconstruct
            estimate = reconstruct_others(after[client][SENT], uploads[k], float(row[k]))
            target = others_mean(row, k, trained)
            start = others_mean(row, k, sent)
            errors.setdefault(server_round, []).append(relative_error(estimate, target, start))
            released = others_mean(row, k, uploads)
            exact.setdefault(server_round, []).append(relative_error(estimate, released, start))
    return {"errors": errors, "exact": exact, "update_norms": norms}


# ---------------------------------------------------------------------------- the runs


def _by_name(folder: str):
    """This file as the module ``privacy``, the name the Simulation Engine's workers import."""
    if "privacy" in sys.modules:
        return sys.modules["privacy"]
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("privacy")
    finally:
        sys.path.remove(folder)


@dataclass
class Level:
    name: str
    clip_norm: float
    noise_multiplier: float


def run_one(cfg, out: Path, level: Level, seed: int) -> dict[str, Any]:
    """One simulation with the audit mod; its attack results and final eval loss."""
    from mira.federation import simulation
    from mira.results.rundir import read_metrics

    audit_dir = out / "audit"
    os.environ[AUDIT] = json.dumps(
        {
            "dir": str(audit_dir),
            "clip_norm": level.clip_norm,
            "noise_multiplier": level.noise_multiplier,
            "seed": seed,
        }
    )
    # The Simulation Engine's workers import this file by name to find the mod.
    here = str(Path(__file__).resolve().parent)
    python_path = os.environ.get("PYTHONPATH")
    paths = [here, *filter(None, (python_path or "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    _by_name(here)  # the simulation's processes import this file as ``privacy``
    started = time.monotonic()
    try:
        simulation.run_simulation(cfg, out / "run", clients="privacy:AUDITED")
    finally:
        del os.environ[AUDIT]
        if python_path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = python_path
    seconds = time.monotonic() - started
    rounds = read_metrics(out / "run").rounds
    result = attack(cfg, out / "run", audit_dir)
    last = max(result["errors"]) if result["errors"] else None
    return {
        "method": cfg.server.method,
        "level": level.name,
        "clip_norm": level.clip_norm,
        "noise_multiplier": level.noise_multiplier,
        "loss": rounds[-1].personalised_eval_loss_mean if rounds else None,
        "error_last": float(np.mean(result["errors"][last])) if last else None,
        "error_mean": float(np.mean([e for v in result["errors"].values() for e in v]))
        if result["errors"]
        else None,
        "exact_max": max((e for v in result["exact"].values() for e in v), default=None),
        "update_norm_median": float(np.median(result["update_norms"]))
        if result["update_norms"]
        else None,
        "seconds": seconds,
    }


def build_config(model: str, tasks: list[str], clients: int, overrides: list[str]):
    from mira.config import LearnedMix, apply_overrides, config_from_dict

    raw: dict[str, Any] = {"tasks": [{"name": t, "clients": clients} for t in tasks]}
    settings = [*DEFAULT_OVERRIDES, f"model.name={model}", *overrides]
    cfg = config_from_dict(apply_overrides(raw, settings))
    if isinstance(cfg.server.policy, LearnedMix) or cfg.federation.fraction < 1.0:
        raise SystemExit("the attack needs a fixed server.step and federation.fraction = 1")
    return cfg


def table(results: list[dict[str, Any]], delta: float, rounds: int) -> list[str]:
    lines = [
        "| method | DP | clip C | noise z | epsilon | reconstruction error, last round "
        "| mean over rounds | personalised eval loss | vs no DP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = {r["method"]: r["loss"] for r in results if r["clip_norm"] == 0}

    def fmt(value: float | None, spec: str = ".4f") -> str:
        return "-" if value is None else format(value, spec)

    for r in results:
        dp = r["clip_norm"] > 0
        eps = client_epsilon(r["noise_multiplier"], rounds, delta) if dp else None
        cost = (
            None
            if r["loss"] is None or base.get(r["method"]) is None
            else r["loss"] - base[r["method"]]
        )
        lines.append(
            f"| {r['method']} | {r['level']} | {fmt(r['clip_norm'], '.3g') if dp else '-'} "
            f"| {fmt(r['noise_multiplier'], '.3g') if dp else '-'} "
            f"| {('inf' if eps == float('inf') else fmt(eps, '.3g')) if dp else 'none'} "
            f"| {fmt(r['error_last'])} | {fmt(r['error_mean'])} | {fmt(r['loss'])} "
            f"| {fmt(cost, '+.4f') if dp else '-'} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--clients", type=int, default=2, help="clients per task")
    parser.add_argument("--methods", default="mira,fedit")
    parser.add_argument(
        "--noise", default="0.05,1.0", help="two (or more) noise multipliers z, comma-separated"
    )
    parser.add_argument("--clip", type=float, default=0.0, help="C; 0 = median norm without DP")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=1, help="federation.seed and the noise's")
    parser.add_argument("--override", action="append", default=[], help="section.key=value")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "privacy")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write")
    args = parser.parse_args(argv)
    cfg_overrides = [f"federation.seed={args.seed}", *args.override]
    tasks = [t for t in args.tasks.split(",") if t]
    noise = [float(z) for z in args.noise.split(",") if z]
    results: list[dict[str, Any]] = []
    rounds = 0
    for method in [m for m in args.methods.split(",") if m]:
        cfg = build_config(
            args.model, tasks, args.clients, [*cfg_overrides, f"server.method={method}"]
        )
        rounds = cfg.federation.rounds
        folder = args.work / method
        plain = run_one(cfg, folder / "none", Level("none", 0.0, 0.0), args.seed)
        results.append(plain)
        clip = args.clip or float(plain["update_norm_median"] or 1.0)
        for z in noise:
            level = Level(f"z={z:g}", clip, z)
            results.append(run_one(cfg, folder / f"z{z:g}", level, args.seed))
        print(json.dumps(results[-1 - len(noise) :], indent=1), flush=True)
    lines = [
        f"<!-- generated by benchmarks/privacy.py: {shlex.join(sys.argv)} -->",
        f"{args.model}, tasks {', '.join(tasks)} x {args.clients} clients, {rounds} rounds, "
        f"seed {args.seed}, delta {args.delta:g}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores.",
        "",
        *table(results, args.delta, rounds),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
