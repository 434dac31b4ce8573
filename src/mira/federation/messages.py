"""What the mira server and its clients say to each other, as plain Python: no Flower types.

One exchange per client per round (docs/design.md, "Engine"). First contact is a query that
asks a node which partition-id it holds, then an :class:`IdentifyRequest` that sends it its
client's view of the config (:func:`client_view`), which the node answers with its
:class:`Identity`. Every round, the server sends a client an :class:`Instruction`: the adapter
it starts from (under ``server.step = "auto"`` left out when its node holds it, named by
:func:`adapter_digest`, and its neighbours' mean and the mix weights to try), whether to
evaluate that adapter (the personalised evaluation of the previous round),
whether to compute a fingerprint, and whether to train. The client answers with a
:class:`Reply`, its :class:`Evaluation` included. The server state
(:mod:`mira.federation.state`) works with these dataclasses only; :mod:`mira.federation.codec`
turns them into Flower messages and back, on both sides, and names every key they travel under.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mira.config import GRAPH_SOURCES, Config
from mira.core.adapters import Adapter
from mira.core.rules import ValidationSums


def client_view(cfg: Config, partition: int) -> str:
    """The config one client receives, as JSON: the shared settings and its OWN task only.

    Other clients' tasks, data paths and counts never reach it. Its task entry keeps its own
    client count (its shard of the task depends on it) and carries the client's LoRA rank when
    ``lora.ranks`` gives one per client; a matrix file behind ``server.graph`` is a path on the
    server and is not sent.
    """
    index, _shard = task_of(cfg, partition)
    raw = cfg.to_dict()
    task = dict(raw["tasks"][index])
    if cfg.lora.ranks:
        task["rank"], task["memory_mb"] = cfg.lora.ranks[partition], 0.0
    raw["tasks"] = [task]
    raw["lora"]["ranks"] = []
    if raw["server"]["graph"] not in GRAPH_SOURCES:
        raw["server"]["graph"] = "tasks"
    raw["federation"]["node_keys"] = ""  # the client table is a path on the server too
    return json.dumps(raw, sort_keys=True)


def task_of(cfg: Config, partition: int) -> tuple[int, int]:
    """(index of the client's [[tasks]] entry, its index among that task's clients)."""
    offset = partition
    for index, task in enumerate(cfg.tasks):
        if offset < task.clients:
            return index, offset
        offset -= task.clients
    raise ValueError(f"partition {partition} is outside the {cfg.num_clients} clients")


@dataclass
class IdentifyRequest:
    """The second step of first contact: a node's client's view of the config."""

    config_json: str  # :func:`client_view`
    partition: int  # the partition-id the node said it holds
    shard: int  # its index among its task's clients (the view holds only its task)
    fingerprint: bool  # also send a fingerprint


@dataclass
class Identity:
    """A node's answer to ``identify``: which client it holds, and that client's start."""

    client_id: str  # '' for a node that holds no client of this config
    node_id: int
    task: str = ""
    rank: int = 0
    num_train: int = 0
    num_eval: int = 0
    init: Adapter | None = None
    fingerprint: np.ndarray | None = None


@dataclass
class Instruction:
    """What the server asks of one client in one exchange."""

    client_id: str
    node_id: int
    round: int  # the round this exchange trains (rounds + 1 for the final evaluation)
    adapter: Adapter | None  # the adapter to start from; None: the client holds it (``held``)
    train: bool
    evaluate: bool  # evaluate the start adapter (after the auto choice) on the eval split
    task_metrics: bool
    fingerprint: bool = False
    mean: Adapter | None = None  # auto: the neighbours' weighted mean M_k
    candidates: list[float] = field(default_factory=list)  # auto: mix weights to try
    prior: list[float] | None = None  # auto: [the mix weight it applied when it last chose]
    anchor: float = 0.0  # auto: the equal-share point a tolerant choice leans toward
    space: str = "factor"  # auto: the pull space the mix is formed in
    partition: int = 0  # the client's partition-id, which the node must hold
    shard: int = 0  # its index among its task's clients (the view holds only its task)
    held: str = ""  # with no adapter: the adapter_digest of the one it holds and starts from
    alpha: float | None = None  # auto, pooled by cluster: the mix weight to apply


EVAL_LOSS, NUM_EXAMPLES, PEAK_MEMORY_MB = "eval_loss", "num_examples", "peak_memory_mb"
"""The names of an evaluation's entries, as they travel and as a checkpoint keeps them."""


@dataclass
class Evaluation:
    """A client's personalised evaluation of the adapter it holds, on its eval split."""

    eval_loss: float | None  # mean over target tokens
    num_examples: float | None = None
    peak_memory_mb: float | None = None  # of the client process so far
    metrics: dict[str, float] = field(default_factory=dict)  # task metrics, when due

    def as_dict(self) -> dict[str, float]:
        """Every entry by name (those that are set), task metrics last."""
        named = {EVAL_LOSS: self.eval_loss, NUM_EXAMPLES: self.num_examples}
        named[PEAK_MEMORY_MB] = self.peak_memory_mb
        return {**{k: v for k, v in named.items() if v is not None}, **self.metrics}

    @classmethod
    def from_dict(cls, entries: dict[str, Any]) -> Evaluation:
        """The evaluation :meth:`as_dict` gave (values as they are)."""
        own = (EVAL_LOSS, NUM_EXAMPLES, PEAK_MEMORY_MB)
        return cls(
            eval_loss=entries.get(EVAL_LOSS),
            num_examples=entries.get(NUM_EXAMPLES),
            peak_memory_mb=entries.get(PEAK_MEMORY_MB),
            metrics={k: v for k, v in entries.items() if k not in own},
        )


@dataclass
class Reply:
    """What one client answered."""

    client_id: str
    node_id: int
    trained: Adapter | None = None
    train_loss: float | None = None
    evaluation: Evaluation | None = None
    alpha: float | None = None
    val_losses: list[float] | None = None
    val_standard_errors: list[float] | None = None  # auto with a tolerance: SE of L_j - L_best
    fingerprint: np.ndarray | None = None
    bytes_up: int = 0
    holds: str = ""  # auto: the adapter_digest of the adapter it holds after this exchange
    lacks_adapter: bool = False  # it does not hold the adapter the instruction left out
    val_sums: ValidationSums | None = None  # auto pooled by cluster: what the server adds up


def adapter_digest(adapter: Adapter) -> str:
    """A SHA-256 of an adapter's tensors (names, dtypes, shapes and bytes): how the server
    names the adapter it leaves out of a message to a client that holds it, and how the client
    checks that it holds that very one (docs/design.md, "Engine")."""
    digest = hashlib.sha256()
    for name in sorted(adapter):
        value = np.ascontiguousarray(adapter[name])
        digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
