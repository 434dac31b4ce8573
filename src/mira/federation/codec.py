"""The Flower messages of :mod:`mira.federation.messages`: every encode and decode, on both
sides, and every key a message carries, named once here.

The server encodes the "who" query (:func:`encode_who`), the :class:`IdentifyRequest` and each
:class:`Instruction`, and decodes the answers; the ClientApp decodes what it is sent and
encodes its :class:`Identity` and :class:`Reply`. A client that gives up on a message at its
deadline answers with :func:`encode_abandoned`, which the server tells from any other error by
its code (:func:`was_abandoned`), not by its text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from mira.core.adapters import Adapter
from mira.core.rules import ValidationSums
from mira.federation.messages import Evaluation, IdentifyRequest, Identity, Instruction, Reply

# Records of a message (RecordDict keys).
SETTINGS = "config"  # ConfigRecord: what to do (keys below)
ADAPTER = "adapter"  # ArrayRecord: the adapter to start from (server -> client), trained (back)
MEAN = "neighbour_mean"  # ArrayRecord: M_k, the neighbours' weighted mean (auto)
INIT = "init"  # ArrayRecord: the shared LoRA initialisation (identify reply)
FINGERPRINT = "fingerprint"  # ArrayRecord: one float64 vector
IDENTITY = "identity"  # ConfigRecord: who answered
TRAINING = "metrics"  # MetricRecord: TRAIN_LOSS
EVALUATION = "evaluation"  # MetricRecord: the Evaluation's entries (Evaluation.as_dict)
CHOICE = "choice"  # ConfigRecord: the alpha applied, the validation loss of every candidate
HOLDING = "holding"  # ConfigRecord: which adapter the client holds (auto; keys below)
KEPT = "mira.adapter"  # ArrayRecord of a ClientApp's Context.state: the adapter it holds (auto)

# Keys of the SETTINGS record.
CONFIG_JSON = "mira.config"  # the client's view of the config, as JSON
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
HELD = "held"  # with no ADAPTER record: the digest of the adapter the client holds and starts from
APPLY = "apply_alpha"  # auto pooled by cluster: the mix weight the server decided

# Keys of the IDENTITY record.
ID_PARTITION = "partition"  # the node's partition-id (answer to "who")
ID_CLIENT = "client"
ID_TASK = "task"
ID_RANK = "rank"
ID_NUM_TRAIN = "num_train"
ID_NUM_EVAL = "num_eval"

# Key of the TRAINING record.
TRAIN_LOSS = "train_loss"

# Keys of the CHOICE record.
ALPHA = "alpha"
VAL_LOSSES = "val_losses"
VAL_STANDARD_ERRORS = "val_standard_errors"
VAL_NLL = "val_nll"  # pooled by cluster: rules.ValidationSums, entry by entry
VAL_MOMENTS = "val_moments"  # row after row
VAL_EXAMPLES = "val_examples"
VAL_TOKENS = "val_tokens"

# Keys of the HOLDING record.
HOLDS = "digest"  # the adapter the client holds after the exchange (messages.adapter_digest)
LACKS = "lacks_adapter"  # the client did not hold the adapter the message left out

ABANDONED_CODE = 1000
"""The error code of a reply whose client gave up on the message at its deadline (Flower's
own codes are below 100)."""


# ------------------------------------------------------------------------------ adapters
def to_record(adapter: Adapter) -> ArrayRecord:
    """An adapter as a Flower ArrayRecord (keys sorted, arrays contiguous)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in sorted(adapter.items())})


def from_record(record: ArrayRecord) -> Adapter:
    return {k: v.numpy() for k, v in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays a record carries (what travels, framework overhead aside)."""
    return int(sum(len(a.data) for a in record.values()))


def _number(value: Any) -> float:
    return float(value)


# ------------------------------------------------------------------------------ first contact
def encode_who(node_id: int) -> Message:
    """Ask a node which partition-id it holds (nothing of the config is sent yet)."""
    settings = ConfigRecord({ROUND: 0})
    return Message(
        RecordDict({SETTINGS: settings}), dst_node_id=node_id, message_type=MessageType.QUERY
    )


def encode_who_reply(request: Message, partition: int) -> Message:
    """A node's answer to "who": the partition-id it holds (-1: none)."""
    return Message(
        RecordDict({IDENTITY: ConfigRecord({ID_PARTITION: partition})}), reply_to=request
    )


def decode_who(message: Message) -> int:
    """The partition-id a node holds (-1: none)."""
    return int(str(message.content.config_records[IDENTITY][ID_PARTITION]))


def encode_identify(node_id: int, request: IdentifyRequest) -> Message:
    """Send a node its client's view of the config; ask for its identity, the shared LoRA
    init and, on request, a fingerprint."""
    settings = ConfigRecord(
        {
            CONFIG_JSON: request.config_json,
            ROUND: 0,
            PARTITION: request.partition,
            SHARD: request.shard,
            WANT_FINGERPRINT: request.fingerprint,
        }
    )
    return Message(
        RecordDict({SETTINGS: settings}), dst_node_id=node_id, message_type=MessageType.QUERY
    )


def decode_identify(message: Message) -> IdentifyRequest | None:
    """The identify request a query carries; None for the "who" query."""
    settings = message.content.config_records[SETTINGS]
    if CONFIG_JSON not in settings:
        return None
    return IdentifyRequest(
        config_json=str(settings[CONFIG_JSON]),
        partition=int(str(settings[PARTITION])),
        shard=int(str(settings[SHARD])),
        fingerprint=bool(settings.get(WANT_FINGERPRINT, False)),
    )


def _identity_record(identity: Identity) -> ConfigRecord:
    return ConfigRecord(
        {ID_CLIENT: identity.client_id, ID_TASK: identity.task, ID_RANK: identity.rank}
    )


def encode_identity(request: Message, identity: Identity) -> Message:
    """A client's answer to identify: who it is, its split sizes, the shared LoRA init and,
    when asked, its fingerprint."""
    record = _identity_record(identity)
    record[ID_NUM_TRAIN] = identity.num_train
    record[ID_NUM_EVAL] = identity.num_eval
    content = RecordDict({IDENTITY: record})
    if identity.init is not None:
        content.array_records[INIT] = to_record(identity.init)
    if identity.fingerprint is not None:
        content.array_records[FINGERPRINT] = ArrayRecord([identity.fingerprint.astype(np.float64)])
    return Message(content, reply_to=request)


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


# ------------------------------------------------------------------------------ a round
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
    content = RecordDict({SETTINGS: settings})
    if instruction.adapter is not None:
        content.array_records[ADAPTER] = to_record(instruction.adapter)
    else:
        settings[HELD] = instruction.held
    if instruction.alpha is not None:
        settings[APPLY] = float(instruction.alpha)
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
    apply = settings.get(APPLY)
    instruction = Instruction(
        client_id=str(settings[CLIENT]),
        node_id=message.metadata.dst_node_id,
        round=int(str(settings[ROUND])),
        adapter=from_record(arrays[ADAPTER]) if ADAPTER in arrays else None,
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
        held=str(settings.get(HELD, "")),
        alpha=None if apply is None else _number(apply),
    )
    return instruction, str(settings[CONFIG_JSON])


def request_view(message: Message) -> tuple[str, int] | None:
    """The config view a request carries and the partition it addresses (identify and
    every round's message); None for the "who" query, which carries none."""
    settings = message.content.config_records.get(SETTINGS)
    if settings is None or CONFIG_JSON not in settings:
        return None
    return str(settings[CONFIG_JSON]), int(str(settings[PARTITION]))


def _reply_content(reply: Reply, identity: ConfigRecord) -> RecordDict:
    content = RecordDict({IDENTITY: identity})
    if reply.trained is not None:
        content.array_records[ADAPTER] = to_record(reply.trained)
        content.metric_records[TRAINING] = MetricRecord(
            {TRAIN_LOSS: float(reply.train_loss or 0.0)}
        )
    if reply.evaluation is not None:
        entries: dict[str, int | float | list[int] | list[float]] = {}
        entries.update(reply.evaluation.as_dict())
        content.metric_records[EVALUATION] = MetricRecord(entries)
    if reply.alpha is not None:
        choice = ConfigRecord(
            {ALPHA: float(reply.alpha), VAL_LOSSES: [float(v) for v in reply.val_losses or []]}
        )
        if reply.val_standard_errors is not None:
            choice[VAL_STANDARD_ERRORS] = [float(v) for v in reply.val_standard_errors]
        if reply.val_sums is not None:
            choice[VAL_NLL] = list(reply.val_sums.nll)
            choice[VAL_MOMENTS] = [v for row in reply.val_sums.moments for v in row]
            choice[VAL_EXAMPLES] = reply.val_sums.examples
            choice[VAL_TOKENS] = reply.val_sums.tokens
        content.config_records[CHOICE] = choice
    if reply.fingerprint is not None:
        content.array_records[FINGERPRINT] = ArrayRecord([reply.fingerprint.astype(np.float64)])
    if reply.holds or reply.lacks_adapter:
        content.config_records[HOLDING] = ConfigRecord(
            {HOLDS: reply.holds, LACKS: reply.lacks_adapter}
        )
    return content


def encode_reply(reply: Reply, request: Message, identity: Identity) -> Message:
    """A client's answer to a round's message (``identity``: its client id, task and rank)."""
    return Message(_reply_content(reply, _identity_record(identity)), reply_to=request)


def decode_reply(message: Message) -> Reply:
    """A client's reply as plain Python (adapters as numpy arrays)."""
    content = message.content
    identity = content.config_records[IDENTITY]
    reply = Reply(client_id=str(identity[ID_CLIENT]), node_id=message.metadata.src_node_id)
    if ADAPTER in content.array_records:
        record = content.array_records[ADAPTER]
        reply.trained = from_record(record)
        reply.bytes_up += record_bytes(record)
        reply.train_loss = _number(content.metric_records[TRAINING][TRAIN_LOSS])
    if EVALUATION in content.metric_records:
        entries = {k: _number(v) for k, v in content.metric_records[EVALUATION].items()}
        reply.evaluation = Evaluation.from_dict(entries)
    if CHOICE in content.config_records:
        choice = content.config_records[CHOICE]
        reply.alpha = _number(choice[ALPHA])
        reply.val_losses = [_number(v) for v in choice[VAL_LOSSES]]  # type: ignore[union-attr]
        if VAL_STANDARD_ERRORS in choice:
            errors = choice[VAL_STANDARD_ERRORS]
            reply.val_standard_errors = [_number(v) for v in errors]  # type: ignore[union-attr]
        if VAL_NLL in choice:
            nll = [_number(v) for v in choice[VAL_NLL]]  # type: ignore[union-attr]
            flat = [_number(v) for v in choice[VAL_MOMENTS]]  # type: ignore[union-attr]
            reply.val_sums = ValidationSums(
                nll=tuple(nll),
                moments=tuple(tuple(flat[i : i + len(nll)]) for i in range(0, len(flat), len(nll))),
                examples=int(str(choice[VAL_EXAMPLES])),
                tokens=_number(choice[VAL_TOKENS]),
            )
    if FINGERPRINT in content.array_records:
        reply.fingerprint = content.array_records[FINGERPRINT].to_numpy_ndarrays()[0]
    if HOLDING in content.config_records:
        holding = content.config_records[HOLDING]
        reply.holds = str(holding.get(HOLDS, ""))
        reply.lacks_adapter = bool(holding.get(LACKS, False))
    return reply


# ------------------------------------------------------------------------------ client state
def keep_adapter(state: RecordDict, adapter: Adapter) -> None:
    """Keep the adapter a client holds in its node's ``Context.state``, which Flower keeps for
    the run, so the server need not send it again (docs/design.md, "Engine")."""
    state.array_records[KEPT] = to_record(adapter)


def kept_adapter(state: RecordDict) -> Adapter | None:
    """The adapter :func:`keep_adapter` kept (None: none, e.g. a restarted client process)."""
    record = state.array_records.get(KEPT)
    return None if record is None else from_record(record)


def rewrite_reply(message: Message, change: Callable[[Reply], None]) -> Message:
    """``message``, a client's reply, with ``change`` applied to what it carries (for mods
    that alter an upload: the tests' fault injection, the privacy benchmark's audit)."""
    reply = decode_reply(message)
    change(reply)
    message.content = _reply_content(reply, message.content.config_records[IDENTITY])
    return message


def train_loss_of(message: Message) -> float | None:
    """A reply's train loss for the live display (None when absent or not finite)."""
    if message.has_error() or TRAINING not in message.content.metric_records:
        return None
    loss = _number(message.content.metric_records[TRAINING][TRAIN_LOSS])
    return loss if np.isfinite(loss) else None


# ------------------------------------------------------------------------------ errors
def encode_abandoned(request: Message, reason: str) -> Message:
    """The answer of a client that gave up on ``request`` at its deadline."""
    return Message(Error(code=ABANDONED_CODE, reason=reason), reply_to=request)


def was_abandoned(message: Message) -> bool:
    """Whether an error reply is a client's :func:`encode_abandoned` (a timeout, not a
    failure)."""
    return message.has_error() and message.error.code == ABANDONED_CODE


def error_reason(message: Message) -> str:
    """The reason an error reply gives, as Flower carries it."""
    return str(message.error.reason)
