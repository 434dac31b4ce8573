"""The mira ClientApp: peft LoRA training and evaluation on one client's private data.

Every message from the server carries the resolved config (JSON) and, for train and
evaluate, this client's OWN adapter. The client identifies itself from its node config's
``partition-id`` (Flower node ids are not stable identities) and answers:

- ``query``: its identity (client id, task, rank, split sizes) and the shared LoRA init;
- ``train``: ``federation.local_steps`` AdamW steps from the adapter it was sent, then the
  trained adapter and its mean training loss;
- ``evaluate``: the eval loss of the adapter it was sent on its own held-out split.

The base model is loaded once per process and reused; data splits are cached per process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import resource
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mira import fingerprint, learner
from mira.config import Config, config_from_dict
from mira.data import ClientData, load_client_data
from mira.model import Adapter, LoraModel, lora_model
from mira.ranks import client_rank

CONFIG_KEY = "mira.config"

app = ClientApp()


@lru_cache(maxsize=4)
def _config(config_json: str) -> Config:
    import json

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
    mira.memory's estimate, which matches measured peaks only with the threshold pinned
    (docs/memory.md). No-op where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)


@lru_cache(maxsize=64)
def _client_data(config_json: str, partition: int) -> tuple[ClientData, Any, Any]:
    cfg = _config(config_json)
    data = load_client_data(cfg, partition)
    tokenizer = _lora_model(cfg).tokenizer
    train = [learner.encode(tokenizer, e, cfg.model.max_length) for e in data.train]
    evaluation = [learner.encode(tokenizer, e, cfg.model.max_length) for e in data.eval]
    return data, train, evaluation


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


def to_record(adapter: Adapter) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in sorted(adapter.items())})


def from_record(record: ArrayRecord) -> Adapter:
    return {k: v.numpy() for k, v in record.items()}


def _identity(cfg: Config, partition: int) -> ConfigRecord:
    return ConfigRecord(
        {
            "client": cfg.client_ids[partition],
            "task": cfg.client_tasks[partition],
            "rank": client_rank(cfg, partition),
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
def query(msg: Message, context: Context) -> Message:
    """Identify this client; on request, also send its fingerprint."""
    settings = msg.content.config_records["config"]
    config_json = str(settings[CONFIG_KEY])
    cfg = _config(config_json)
    if int(str(context.node_config.get("partition-id", -1))) >= cfg.num_clients:
        # More SuperNodes than clients (e.g. a default local federation): this one idles.
        return Message(RecordDict({"identity": ConfigRecord({"client": ""})}), reply_to=msg)
    partition = _partition(context, cfg)
    data, encoded_train, _ = _client_data(config_json, partition)
    rank = client_rank(cfg, partition)
    model = _lora_model(cfg)
    content = RecordDict({"identity": _identity(cfg, partition)})
    content.config_records["identity"]["num_train"] = len(data.train)
    content.config_records["identity"]["num_eval"] = len(data.eval)
    own = None
    if "adapter" in msg.content.array_records:
        _, _, model, own = _prepare(msg, context)
    else:
        init = model.shared_init(cfg.lora, rank, cfg.federation.seed)
        content.array_records["init"] = to_record(init)
    if bool(settings.get("fingerprint", False)):
        vector = client_fingerprint(cfg, partition, model, encoded_train, own)
        content.array_records["fingerprint"] = ArrayRecord([vector.astype(np.float64)])
    return Message(content, reply_to=msg)


def _prepare(msg: Message, context: Context) -> tuple[Config, int, LoraModel, str]:
    config_json = str(msg.content.config_records["config"][CONFIG_KEY])
    cfg = _config(config_json)
    partition = _partition(context, cfg)
    expected = str(msg.content.config_records["config"]["client"])
    if expected != cfg.client_ids[partition]:
        raise ValueError(f"server sent client {expected}'s adapter to {cfg.client_ids[partition]}")
    model = _lora_model(cfg)
    name = model.activate(cfg.lora, client_rank(cfg, partition))
    model.set_adapter(name, from_record(msg.content.array_records["adapter"]))
    return cfg, partition, model, name


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, partition, model, name = _prepare(msg, context)
    config_json = str(msg.content.config_records["config"][CONFIG_KEY])
    data, encoded_train, _ = _client_data(config_json, partition)
    server_round = int(str(msg.content.config_records["config"]["round"]))
    seed = training_seed(cfg.federation.seed, partition, server_round)
    loss = learner.train_steps(
        model.peft,
        model.lora_parameters(name),
        encoded_train,
        cfg,
        pad_id=model.tokenizer.pad_token_id,
        seed=seed,
    )
    metrics = MetricRecord({"train_loss": loss, "num_examples": len(data.train)})
    return Message(
        RecordDict(
            {
                "adapter": to_record(model.get_adapter(name)),
                "metrics": metrics,
                "identity": _identity(cfg, partition),
            }
        ),
        reply_to=msg,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, partition, model, _name = _prepare(msg, context)
    config_json = str(msg.content.config_records["config"][CONFIG_KEY])
    data, _, encoded_eval = _client_data(config_json, partition)
    loss = learner.eval_loss(
        model.peft, encoded_eval, cfg.train.eval_batch_size, model.tokenizer.pad_token_id
    )
    scores = {}
    if bool(msg.content.config_records["config"].get("task_metrics", True)):
        scores = learner.task_metrics(model.peft, model.tokenizer, data.task, data.eval, cfg)
    metrics = MetricRecord(
        {
            "eval_loss": loss,
            "num_examples": len(data.eval),
            "peak_memory_mb": peak_memory_mb(),
            **scores,
        }
    )
    return Message(
        RecordDict({"metrics": metrics, "identity": _identity(cfg, partition)}),
        reply_to=msg,
    )
