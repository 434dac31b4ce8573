"""What the mira server and its clients say to each other: every message key, named once, and
the codecs between Flower records and plain Python.

One exchange per client per round (docs/design.md, "Engine"). The server sends a client an
:class:`Instruction`: the adapter it starts from (and, under ``server.step = "auto"``, its
neighbours' mean and the mix weights to try), whether to evaluate that adapter (the
personalised evaluation of the previous round), whether to compute a fingerprint, and whether
to train. The client answers with a :class:`Reply`. The server side (:mod:`mira.federation.state`)
works with these dataclasses only; only this module and the Flower plumbing touch Flower types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from mira.config import GRAPH_SOURCES, Config
from mira.core.adapters import Adapter

# Records of a message (RecordDict keys).
SETTINGS = "config"  # ConfigRecord: what to do (keys below)
ADAPTER = "adapter"  # ArrayRecord: the adapter to start from (server -> client), trained (back)
MEAN = "neighbour_mean"  # ArrayRecord: M_k, the neighbours' weighted mean (auto)
INIT = "init"  # ArrayRecord: the shared LoRA initialisation (identify reply)
FINGERPRINT = "fingerprint"  # ArrayRecord: one float64 vector
IDENTITY = "identity"  # ConfigRecord: who answered
TRAINING = "metrics"  # MetricRecord: train_loss, num_examples
EVALUATION = "evaluation"  # MetricRecord: eval_loss, task metrics, num_examples, peak_memory_mb
CHOICE = "choice"  # ConfigRecord: the alpha applied, the validation loss of every candidate

# Keys of the SETTINGS record.
CONFIG_JSON = "mira.config"  # the resolved config, as JSON
ROUND = "round"
CLIENT = "client"  # the client id the message is meant for
TRAIN = "train"
EVALUATE = "evaluate"
TASK_METRICS = "task_metrics"
WANT_FINGERPRINT = "fingerprint"
CANDIDATES = "candidates"
PRIOR = "prior"
ANCHOR = "anchor"
SPACE = "space"  # 'factor' or 'product': where the mix with the mean is formed
PARTITION = "partition"  # the client's index in the config's client order (its partition-id)
SHARD = "shard"  # the client's index among its own task's clients

# Keys of the IDENTITY record.
ID_PARTITION = "partition"  # the node's partition-id (answer to "who")
ID_CLIENT = "client"
ID_TASK = "task"
ID_RANK = "rank"
ID_NUM_TRAIN = "num_train"
ID_NUM_EVAL = "num_eval"

# Keys of the CHOICE record.
ALPHA = "alpha"
VAL_LOSSES = "val_losses"
VAL_STANDARD_ERRORS = "val_standard_errors"


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
    return json.dumps(raw, sort_keys=True)


def task_of(cfg: Config, partition: int) -> tuple[int, int]:
    """(index of the client's [[tasks]] entry, its index among that task's clients)."""
    offset = partition
    for index, task in enumerate(cfg.tasks):
        if offset < task.clients:
            return index, offset
        offset -= task.clients
    raise ValueError(f"partition {partition} is outside the {cfg.num_clients} clients")


def to_record(adapter: Adapter) -> ArrayRecord:
    """An adapter as a Flower ArrayRecord (keys sorted, arrays contiguous)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in sorted(adapter.items())})


def from_record(record: ArrayRecord) -> Adapter:
    return {k: v.numpy() for k, v in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays a record carries (what travels, framework overhead aside)."""
    return int(sum(len(a.data) for a in record.values()))


@dataclass
class Instruction:
    """What the server asks of one client in one exchange."""

    client_id: str
    node_id: int
    round: int  # the round this exchange trains (rounds + 1 for the final evaluation)
    adapter: Adapter  # the adapter to start from
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


@dataclass
class Reply:
    """What one client answered."""

    client_id: str
    node_id: int
    trained: Adapter | None = None
    train_loss: float | None = None
    evaluation: dict[str, float] | None = None
    alpha: float | None = None
    val_losses: list[float] | None = None
    val_standard_errors: list[float] | None = None  # auto with a tolerance: SE of L_j - L_best
    fingerprint: np.ndarray | None = None
    bytes_up: int = 0


def encode_instruction(instruction: Instruction, config_json: str) -> tuple[Message, int]:
    """The Flower message of an instruction, and the bytes of the arrays it carries."""
    settings = ConfigRecord(
        {
            CONFIG_JSON: config_json,
            ROUND: instruction.round,
            CLIENT: instruction.client_id,
            TRAIN: instruction.train,
            EVALUATE: instruction.evaluate,
            TASK_METRICS: instruction.task_metrics,
            WANT_FINGERPRINT: instruction.fingerprint,
            PARTITION: instruction.partition,
            SHARD: instruction.shard,
        }
    )
    content = RecordDict({SETTINGS: settings, ADAPTER: to_record(instruction.adapter)})
    if instruction.mean is not None:
        content.array_records[MEAN] = to_record(instruction.mean)
        settings[CANDIDATES] = [float(a) for a in instruction.candidates]
        settings[SPACE] = instruction.space
        settings[ANCHOR] = float(instruction.anchor)
        if instruction.prior is not None:
            settings[PRIOR] = [float(v) for v in instruction.prior]
    sent = sum(record_bytes(r) for r in content.array_records.values())
    kind = MessageType.TRAIN if instruction.train else MessageType.EVALUATE
    return Message(content, dst_node_id=instruction.node_id, message_type=kind), sent


def decode_instruction(message: Message) -> tuple[Instruction, str]:
    """The instruction a message carries, and the config JSON."""
    settings = message.content.config_records[SETTINGS]
    arrays = message.content.array_records
    mean = from_record(arrays[MEAN]) if MEAN in arrays else None
    prior = settings.get(PRIOR)
    instruction = Instruction(
        client_id=str(settings[CLIENT]),
        node_id=message.metadata.dst_node_id,
        round=int(str(settings[ROUND])),
        adapter=from_record(arrays[ADAPTER]),
        train=bool(settings[TRAIN]),
        evaluate=bool(settings[EVALUATE]),
        task_metrics=bool(settings[TASK_METRICS]),
        fingerprint=bool(settings.get(WANT_FINGERPRINT, False)),
        mean=mean,
        candidates=[float(a) for a in settings.get(CANDIDATES, [])],  # type: ignore[union-attr]
        prior=None if prior is None else [float(v) for v in prior],  # type: ignore[union-attr]
        space=str(settings.get(SPACE, "factor")),
        anchor=float(settings.get(ANCHOR, 0.0)),  # type: ignore[arg-type]
        partition=int(str(settings[PARTITION])),
        shard=int(str(settings[SHARD])),
    )
    return instruction, str(settings[CONFIG_JSON])


def encode_reply(reply: Reply, request: Message, identity: ConfigRecord) -> Message:
    content = RecordDict({IDENTITY: identity})
    if reply.trained is not None:
        content.array_records[ADAPTER] = to_record(reply.trained)
        content.metric_records[TRAINING] = MetricRecord(
            {"train_loss": float(reply.train_loss or 0.0)}
        )
    if reply.evaluation is not None:
        content.metric_records[EVALUATION] = MetricRecord(dict(reply.evaluation))
    if reply.alpha is not None:
        choice = ConfigRecord(
            {ALPHA: float(reply.alpha), VAL_LOSSES: [float(v) for v in reply.val_losses or []]}
        )
        if reply.val_standard_errors is not None:
            choice[VAL_STANDARD_ERRORS] = [float(v) for v in reply.val_standard_errors]
        content.config_records[CHOICE] = choice
    if reply.fingerprint is not None:
        content.array_records[FINGERPRINT] = ArrayRecord([reply.fingerprint.astype(np.float64)])
    return Message(content, reply_to=request)


def decode_reply(message: Message) -> Reply:
    """A client's reply as plain Python (adapters as numpy arrays)."""
    content = message.content
    identity = content.config_records[IDENTITY]
    reply = Reply(client_id=str(identity[ID_CLIENT]), node_id=message.metadata.src_node_id)
    if ADAPTER in content.array_records:
        record = content.array_records[ADAPTER]
        reply.trained = from_record(record)
        reply.bytes_up += record_bytes(record)
        reply.train_loss = _number(content.metric_records[TRAINING]["train_loss"])
    if EVALUATION in content.metric_records:
        reply.evaluation = {k: _number(v) for k, v in content.metric_records[EVALUATION].items()}
    if CHOICE in content.config_records:
        choice = content.config_records[CHOICE]
        reply.alpha = _number(choice[ALPHA])
        reply.val_losses = [_number(v) for v in choice[VAL_LOSSES]]  # type: ignore[union-attr]
        if VAL_STANDARD_ERRORS in choice:
            errors = choice[VAL_STANDARD_ERRORS]
            reply.val_standard_errors = [_number(v) for v in errors]  # type: ignore[union-attr]
    if FINGERPRINT in content.array_records:
        reply.fingerprint = content.array_records[FINGERPRINT].to_numpy_ndarrays()[0]
    return reply


def _number(value: Any) -> float:
    return float(value)


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


def encode_who(node_id: int) -> Message:
    """Ask a node which partition-id it holds (nothing of the config is sent yet)."""
    settings = ConfigRecord({ROUND: 0})
    return Message(
        RecordDict({SETTINGS: settings}), dst_node_id=node_id, message_type=MessageType.QUERY
    )


def decode_who(message: Message) -> int:
    """The partition-id a node holds (-1: none)."""
    return int(str(message.content.config_records[IDENTITY][ID_PARTITION]))


def encode_identify(
    node_id: int, view_json: str, partition: int, shard: int, fingerprint: bool
) -> Message:
    """Send a node its client's view of the config; ask for its identity, the shared LoRA
    init and, on request, a fingerprint."""
    settings = ConfigRecord(
        {
            CONFIG_JSON: view_json,
            ROUND: 0,
            PARTITION: partition,
            SHARD: shard,
            WANT_FINGERPRINT: fingerprint,
        }
    )
    return Message(
        RecordDict({SETTINGS: settings}), dst_node_id=node_id, message_type=MessageType.QUERY
    )


def decode_identity(message: Message) -> Identity:
    content = message.content
    identity = content.config_records[IDENTITY]
    found = Identity(client_id=str(identity[ID_CLIENT]), node_id=message.metadata.src_node_id)
    if not found.client_id:
        return found
    found.task = str(identity[ID_TASK])
    found.rank = int(str(identity[ID_RANK]))
    found.num_train = int(str(identity[ID_NUM_TRAIN]))
    found.num_eval = int(str(identity.get(ID_NUM_EVAL, 0)))
    if INIT in content.array_records:
        found.init = from_record(content.array_records[INIT])
    if FINGERPRINT in content.array_records:
        found.fingerprint = content.array_records[FINGERPRINT].to_numpy_ndarrays()[0]
    return found
