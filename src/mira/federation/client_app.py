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

import os
import resource
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mira import learner
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
    return lora_model(cfg.model)


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


@app.query()
def query(msg: Message, context: Context) -> Message:
    config_json = str(msg.content.config_records["config"][CONFIG_KEY])
    cfg = _config(config_json)
    partition = _partition(context, cfg)
    data, _, _ = _client_data(config_json, partition)
    rank = client_rank(cfg, partition)
    init = _lora_model(cfg).shared_init(cfg.lora, rank, cfg.federation.seed)
    identity = _identity(cfg, partition)
    identity["num_train"] = len(data.train)
    identity["num_eval"] = len(data.eval)
    return Message(
        RecordDict({"identity": identity, "init": to_record(init)}),
        reply_to=msg,
    )


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
