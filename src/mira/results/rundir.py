"""Everything a run writes into its output directory, and nothing else.

Layout of ``DIR``::

    config.toml         the resolved config (every default filled in)
    metrics.jsonl       one object per client per round (``"kind": "client"``) and one
                        aggregate per round (``"kind": "round"``)
    graph.json          client ids, tasks, clusters and the adjacency the server used
    graph.png           heatmap of the adjacency, clients ordered by cluster
    adapters/<client>/  that client's personalised PEFT adapter (rewritten every round)

Every file is written to a temporary name and renamed, and metrics are appended and
flushed per round, so a run that stops part-way keeps all it had written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from mira.config import TASK_METRICS, Config, ConfigError
from mira.core.adapters import Adapter
from mira.results import stats
from mira.results.plots import plot_adjacency


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def round_aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, worst and std over clients of the personalised eval loss (and train loss)."""
    eval_losses = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    train_losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
    out: dict[str, Any] = {
        "personalised_eval_loss_mean": float(np.mean(eval_losses)) if eval_losses else None,
        "personalised_eval_loss_worst": float(np.max(eval_losses)) if eval_losses else None,
        "personalised_eval_loss_std": float(np.std(eval_losses)) if eval_losses else None,
        "train_loss_mean": float(np.mean(train_losses)) if train_losses else None,
        "clients_trained": len(train_losses),
        "bytes_up": int(sum(r["bytes_up"] for r in rows)),
        "bytes_down": int(sum(r["bytes_down"] for r in rows)),
        "peak_memory_mb": max((r.get("peak_memory_mb") or 0.0) for r in rows),
    }
    per_metric = {
        name: [r.get(name, math.nan) for r in rows]
        for name in TASK_METRICS
        if any(name in r for r in rows)
    }
    for name, summary in stats.summarise(per_metric).items():
        out[f"{name}_mean"] = summary["mean"]
        out[f"{name}_worst"] = summary["worst"]
        out[f"{name}_worst_client"] = rows[int(summary["worst_index"])]["client"]
    return out


class RunWriter:
    """Owns the output directory of one run."""

    def __init__(self, out_dir: Path, cfg: Config):
        self.out = Path(out_dir)
        self.cfg = cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "adapters").mkdir(exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self._tensorboard: Any = None
        if cfg.output.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError(
                    "output.tensorboard = true needs the tensorboard package: "
                    "pip install 'mira[tensorboard]'"
                ) from err
            self._tensorboard = SummaryWriter(str(self.out / "tensorboard"))

    def write_config(self) -> None:
        write_atomic(self.out / "config.toml", tomli_w.dumps(self.cfg.to_dict()))

    def write_graph(self, clients: Sequence[Any], graph: Any, step: Any, built_after: int) -> None:
        """graph.json and graph.png: the task graph the rule uses from round ``built_after`` + 1.

        ``clients`` have ``client_id`` and ``task``; ``graph`` has ``adjacency``, ``clusters``,
        ``source`` and ``info`` (:class:`mira.graph.build.TaskGraph`).
        """
        ids = [c.client_id for c in clients]
        adjacency = np.asarray(graph.adjacency, dtype=np.float64)
        payload = {
            "source": graph.source,
            "clients": ids,
            "tasks": [c.task for c in clients],
            "clusters": [int(c) for c in graph.clusters],
            "adjacency": adjacency.tolist(),
            "degree": adjacency.sum(axis=1).tolist(),
            "step": step,
            **graph.info,
            "built_after_round": built_after,
        }
        write_atomic(self.out / "graph.json", json.dumps(payload, indent=1))
        plot_adjacency(adjacency, ids, list(graph.clusters), self.out / "graph.png")

    def write_checkpoint(self, checkpoint: Checkpoint) -> None:
        write_checkpoint(self.out, checkpoint)

    def append_round(
        self, seconds: float, server_round: int, rows: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Append the per-client rows and the round aggregate; return the aggregate."""
        aggregate = {
            "kind": "round",
            "round": server_round,
            "method": self.cfg.server.method,
            "seconds": round(seconds, 3),
            **round_aggregate(rows),
        }
        lines = []
        for row in rows:
            clean = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in row.items()}
            lines.append(json.dumps({"kind": "client", **clean}))
        lines.append(json.dumps(aggregate))
        with self.metrics_path.open("a") as handle:
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self._tensorboard is not None:
            self._write_tensorboard(server_round, rows, aggregate)
        return aggregate

    def _write_tensorboard(
        self, server_round: int, rows: list[dict[str, Any]], aggregate: dict[str, Any]
    ) -> None:
        """The same scalars as metrics.jsonl: the round aggregate and every client's row."""
        for key, value in aggregate.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
                self._tensorboard.add_scalar(f"round/{key}", value, server_round)
        for row in rows:
            for key in ("train_loss", "eval_loss", *TASK_METRICS):
                value = row.get(key)
                if isinstance(value, float) and math.isfinite(value):
                    self._tensorboard.add_scalar(f"{row['client']}/{key}", value, server_round)
        self._tensorboard.flush()

    def adapter_dir(self, client_id: str) -> Path:
        return self.out / "adapters" / client_id

    def write_adapter(self, client_id: str, adapter: Adapter, rank: int, base_source: str) -> Path:
        from mira.client.model import save_adapter_dir  # peft writes the adapter config

        path = self.adapter_dir(client_id)
        save_adapter_dir(path, adapter, self.cfg.lora, rank, base_source)
        return path


@dataclass
class Checkpoint:
    """Server state after a complete exchange: enough to continue as if never stopped.

    Sampling and local training draw their randomness from (federation.seed, round,
    client) alone, so the round number is the whole random state. ``adapters`` are named
    (every client's stored adapter under its id, plus what the server state keeps besides);
    ``server`` is the server state's own JSON (open rows, choices, evaluations).
    """

    round: int
    client_ids: list[str]
    ranks: list[int]
    adapters: dict[str, Adapter]
    adjacency: np.ndarray
    clusters: list[int]
    graph_source: str
    graph_info: dict[str, Any]
    server: dict[str, Any]


def write_checkpoint(out_dir: Path, checkpoint: Checkpoint) -> None:
    """Write the checkpoint of a complete exchange, crash-safely.

    The adapters go to ``checkpoint/adapters-r<round>.safetensors`` (temporary name, fsync,
    rename), then ``checkpoint/state.json`` naming that file is replaced the same way: the
    state file is the commit point, so a crash at any moment leaves the previous complete
    checkpoint readable. Older adapter files are removed afterwards.
    """
    from safetensors.numpy import save_file

    folder = Path(out_dir) / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"adapters-r{checkpoint.round}.safetensors"
    tensors = {
        f"{owner}/{key}": np.ascontiguousarray(value)
        for owner, adapter in checkpoint.adapters.items()
        for key, value in adapter.items()
    }
    tmp = folder / (name + ".partial")
    save_file(tensors, str(tmp))
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, folder / name)
    state = {
        "round": checkpoint.round,
        "clients": checkpoint.client_ids,
        "ranks": checkpoint.ranks,
        "adapters_file": name,
        "adjacency": checkpoint.adjacency.tolist(),
        "clusters": checkpoint.clusters,
        "graph_source": checkpoint.graph_source,
        "graph_info": checkpoint.graph_info,
        "server": checkpoint.server,
        "random_state": "stateless: numpy default_rng([seed, round]) for sampling, "
        "SeedSequence([seed, client, round]) for local training",
    }
    write_atomic(folder / "state.json", json.dumps(state))
    for old in folder.glob("adapters-r*.safetensors"):
        if old.name != name:
            old.unlink()


def read_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The last complete exchange's checkpoint in ``out_dir``, or None if there is none."""
    from safetensors.numpy import load_file

    state_path = Path(out_dir) / "checkpoint" / "state.json"
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text())
    tensors = load_file(str(state_path.parent / state["adapters_file"]))
    adapters: dict[str, Adapter] = {}
    for name, value in tensors.items():
        owner, key = name.split("/", 1)
        adapters.setdefault(owner, {})[key] = value
    return Checkpoint(
        round=int(state["round"]),
        client_ids=list(state["clients"]),
        ranks=[int(r) for r in state["ranks"]],
        adapters=adapters,
        adjacency=np.array(state["adjacency"], dtype=np.float64),
        clusters=[int(c) for c in state["clusters"]],
        graph_source=str(state["graph_source"]),
        graph_info=dict(state["graph_info"]),
        server=dict(state["server"]),
    )


def truncate_metrics(out_dir: Path, last_round: int) -> None:
    """Drop metric rows of rounds after ``last_round`` (written before a crash, but not
    covered by the checkpoint), so a resumed run appends each round exactly once."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = [row for row in read_metrics(out_dir) if row["round"] <= last_round]
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in keep))


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_table(out_dir: Path) -> str:
    """Per-client personalised eval loss of the last round, with each adapter's path."""
    rows = read_metrics(out_dir)
    clients = [r for r in rows if r["kind"] == "client"]
    if not clients:
        return "no rounds completed"
    last = max(r["round"] for r in clients)
    final = [r for r in clients if r["round"] == last]
    first = {r["client"]: r for r in clients if r["round"] == min(c["round"] for c in clients)}
    width = max(len(r["client"]) for r in final)
    lines = [
        f"Personalised eval loss after round {last} "
        "(each client's own adapter on its own held-out split)",
        f"{'client':<{width}}  {'task':<14} {'round 1':>8} {'final':>8}  "
        f"{'task metric (final)':<26} adapter",
    ]
    for r in final:
        start = first[r["client"]].get("eval_loss")
        scores = " ".join(f"{m} {_fmt(r[m])}" for m in TASK_METRICS if m in r)
        lines.append(
            f"{r['client']:<{width}}  {r['task']:<14} {_fmt(start):>8} {_fmt(r['eval_loss']):>8}"
            f"  {scores:<26} {Path(out_dir) / 'adapters' / r['client']}"
        )
    aggregate = next(r for r in rows if r["kind"] == "round" and r["round"] == last)
    lines.append(
        f"mean {_fmt(aggregate['personalised_eval_loss_mean'])}  "
        f"worst {_fmt(aggregate['personalised_eval_loss_worst'])}  "
        f"std {_fmt(aggregate['personalised_eval_loss_std'])}  (method {aggregate['method']})"
    )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
