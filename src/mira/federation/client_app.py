"""The mira ClientApp: peft LoRA training and evaluation on one client's private data.

Every message from the server carries the resolved config (JSON). The client identifies itself
from its node config's ``partition-id`` (Flower node ids are not stable identities) and answers:

- ``query`` (identify): its identity (client id, task, rank, split sizes), the shared LoRA
  init and, on request, its fingerprint;
- ``train`` / ``evaluate`` (one exchange of a round, :mod:`mira.federation.protocol`): from the
  adapter it was sent, (auto) choose its mix with its neighbours' mean on its validation
  split, evaluate the result on its eval split, compute a fingerprint if asked, then train
  ``federation.local_steps`` AdamW steps if asked; send back what it did.

The base model is loaded once per process and reused; data splits are cached per process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import resource
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from mira.client import learner
from mira.client.model import LoraModel, lora_model
from mira.client.ranks import client_rank
from mira.config import Config, config_from_dict
from mira.core import rules
from mira.core.adapters import Adapter, lora_scale
from mira.data import ClientData, load_client_data
from mira.federation import protocol
from mira.federation.protocol import Instruction, Reply
from mira.graph import fingerprint

app = ClientApp()


@lru_cache(maxsize=4)
def _config(config_json: str) -> Config:
    return config_from_dict(json.loads(config_json))


def _lora_model(cfg: Config) -> LoraModel:
    # Workers share the machine's cores: each takes its slice for torch's intra-op threads.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, cfg.federation.workers)))
    if any(task.memory_mb for task in cfg.tasks):
        bound_heap_growth()
    return lora_model(cfg.model)


def bound_heap_growth() -> None:
    """Serve large allocations from mmap so freed activations go back to the system.

    glibc raises its mmap threshold after large frees; then activations come from the heap,
    and freed heap memory stays resident. A client with a memory budget chose its rank from
    mira.client.memory's estimate, which matches measured peaks only with the threshold pinned
    (docs/memory.md). No-op where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One client's examples, tokenised once per process."""

    data: ClientData
    train: list[learner.Encoded]
    val: list[learner.Encoded]
    eval: list[learner.Encoded]


@lru_cache(maxsize=64)
def _client_data(config_json: str, partition: int) -> Encoded:
    cfg = _config(config_json)
    data = load_client_data(cfg, partition)
    tokenizer = _lora_model(cfg).tokenizer

    def encode(examples: list[Any]) -> list[learner.Encoded]:
        return [learner.encode(tokenizer, e, cfg.model.max_length) for e in examples]

    return Encoded(data, encode(data.train), encode(data.val), encode(data.eval))


def peak_memory_mb() -> float:
    """Peak resident memory of this client process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def training_seed(seed: int, partition: int, server_round: int) -> int:
    """Seed of one client's data order and dropout in one round."""
    return int(np.random.SeedSequence([seed, partition, server_round]).generate_state(1)[0])


def _partition(context: Context, cfg: Config) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no 'partition-id' in its node config")
    partition = int(context.node_config["partition-id"])
    if not 0 <= partition < cfg.num_clients:
        raise ValueError(
            f"partition-id {partition} is outside the {cfg.num_clients} clients of the config"
        )
    return partition


def _identity(cfg: Config, partition: int) -> ConfigRecord:
    return ConfigRecord(
        {
            protocol.ID_CLIENT: cfg.client_ids[partition],
            protocol.ID_TASK: cfg.client_tasks[partition],
            protocol.ID_RANK: client_rank(cfg, partition),
        }
    )


def client_fingerprint(
    cfg: Config, partition: int, model: LoraModel, encoded_train: Any, own: str | None
) -> np.ndarray:
    """This client's task fingerprint: a probe-LoRA signal on a few local batches, randomly
    projected to ``server.fingerprint_dim`` with the seed every client shares, unit norm.

    ``own`` names the client's current adapter to keep active (a refresh measures the
    client's personalised model); None measures the base model.
    """
    probe_lora = dataclasses.replace(cfg.lora, dropout=0.0)
    rank = cfg.server.fingerprint_rank
    model.shared_init(probe_lora, rank, cfg.federation.seed, purpose="probe")
    probe = model.activate(probe_lora, rank, purpose="probe")
    if own is not None:
        model.activate_together([own, probe])
    parameters = {n: p for n, p in model.peft.named_parameters() if f".{probe}." in n}
    signal = learner.fingerprint_signal(
        model.peft,
        parameters,
        encoded_train,
        cfg,
        pad_id=model.tokenizer.pad_token_id,
        seed=training_seed(cfg.federation.seed, partition, 0),
    )
    for parameter in model.peft.parameters():
        parameter.grad = None
    return fingerprint.project(signal, cfg.server.fingerprint_dim, seed=cfg.federation.seed)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Identify this client, with the shared LoRA init; on request, also its fingerprint."""
    settings = msg.content.config_records[protocol.SETTINGS]
    config_json = str(settings[protocol.CONFIG_JSON])
    cfg = _config(config_json)
    if int(str(context.node_config.get("partition-id", -1))) >= cfg.num_clients:
        # More SuperNodes than clients (e.g. a default local federation): this one idles.
        identity = ConfigRecord({protocol.ID_CLIENT: ""})
        return Message(RecordDict({protocol.IDENTITY: identity}), reply_to=msg)
    partition = _partition(context, cfg)
    encoded = _client_data(config_json, partition)
    rank = client_rank(cfg, partition)
    model = _lora_model(cfg)
    identity = _identity(cfg, partition)
    identity[protocol.ID_NUM_TRAIN] = len(encoded.data.train)
    identity[protocol.ID_NUM_EVAL] = len(encoded.data.eval)
    content = RecordDict({protocol.IDENTITY: identity})
    init = model.shared_init(cfg.lora, rank, cfg.federation.seed)
    content.array_records[protocol.INIT] = protocol.to_record(init)
    if bool(settings.get(protocol.WANT_FINGERPRINT, False)):
        vector = client_fingerprint(cfg, partition, model, encoded.train, None)
        content.array_records[protocol.FINGERPRINT] = ArrayRecord([vector.astype(np.float64)])
    return Message(content, reply_to=msg)


def choose_mix(
    cfg: Config, model: LoraModel, name: str, instruction: Instruction, rank: int, val: Any
) -> tuple[float, list[float], Adapter]:
    """``server.step = "auto"``: the validation loss of (1 - alpha) W_k + alpha M_k for every
    candidate alpha, the chosen alpha (:func:`mira.core.rules.choose_mix`) and its adapter.

    Only this client's validation split is used; the eval split never influences the choice.
    """
    assert instruction.mean is not None
    space = instruction.space
    scale = lora_scale(cfg.lora.alpha, rank, cfg.lora.rslora)
    candidates: list[Adapter] = []
    losses = []
    for alpha in instruction.candidates:
        mixed = rules.mix_toward(instruction.adapter, instruction.mean, alpha, space, scale)
        model.set_adapter(name, mixed)
        losses.append(
            learner.eval_loss(
                model.peft, val, cfg.train.eval_batch_size, model.tokenizer.pad_token_id
            )
        )
        candidates.append(mixed)
    chosen, _ = rules.choose_mix(losses, instruction.prior, cfg.server.auto_smoothing)
    model.set_adapter(name, candidates[chosen])
    return instruction.candidates[chosen], losses, candidates[chosen]


def evaluate_adapter(
    cfg: Config, model: LoraModel, encoded: Encoded, task_metrics: bool
) -> dict[str, float]:
    """Eval loss (and, when due, the task metrics) of the active adapter on the eval split."""
    loss = learner.eval_loss(
        model.peft, encoded.eval, cfg.train.eval_batch_size, model.tokenizer.pad_token_id
    )
    scores = {}
    if task_metrics:
        scores = learner.task_metrics(
            model.peft, model.tokenizer, encoded.data.task, encoded.data.eval, cfg
        )
    return {
        "eval_loss": loss,
        "num_examples": float(len(encoded.data.eval)),
        "peak_memory_mb": peak_memory_mb(),
        **scores,
    }


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _round_step(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _round_step(msg, context)


def _round_step(msg: Message, context: Context) -> Message:
    """One exchange: choose (auto), evaluate, fingerprint and train, as instructed."""
    instruction, config_json = protocol.decode_instruction(msg)
    cfg = _config(config_json)
    partition = _partition(context, cfg)
    if instruction.client_id != cfg.client_ids[partition]:
        raise ValueError(
            f"server sent client {instruction.client_id}'s adapter to {cfg.client_ids[partition]}"
        )
    encoded = _client_data(config_json, partition)
    rank = client_rank(cfg, partition)
    model = _lora_model(cfg)
    name = model.activate(cfg.lora, rank)
    model.set_adapter(name, instruction.adapter)
    reply = Reply(client_id=instruction.client_id, node_id=instruction.node_id)
    if instruction.mean is not None:
        reply.alpha, reply.val_losses, _ = choose_mix(
            cfg, model, name, instruction, rank, encoded.val
        )
    if instruction.evaluate:
        reply.evaluation = evaluate_adapter(cfg, model, encoded, instruction.task_metrics)
    if instruction.fingerprint:
        reply.fingerprint = client_fingerprint(cfg, partition, model, encoded.train, name)
        model.activate(cfg.lora, rank)
    if instruction.train:
        seed = training_seed(cfg.federation.seed, partition, instruction.round)
        reply.train_loss = learner.train_steps(
            model.peft,
            model.lora_parameters(name),
            encoded.train,
            cfg,
            pad_id=model.tokenizer.pad_token_id,
            seed=seed,
        )
        reply.trained = model.get_adapter(name)
    return protocol.encode_reply(reply, msg, _identity(cfg, partition))
