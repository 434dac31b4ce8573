"""Faults injected by the tests into a real ClientApp, never by switches in the product.

``faulty_app`` is mira's own ClientApp (the same handlers and deadline mod) with one more mod
that misbehaves for chosen clients in chosen rounds, as told by the environment variable
``MIRA_TEST_FAULTS`` (JSON: a list of {"client", "round", "kind"[, "seconds"]}; round 0 is
every client's identify query, whatever "client" says). The variable is read in the client
process, so the Simulation Engine's workers see what the test set.

Kinds: ``raise`` (the client's code raises), ``hang`` (it sleeps ``seconds`` before working),
``nan`` / ``huge`` (its trained adapter is NaN / multiplied by 1e30), ``shape`` (a tensor of
its trained adapter loses a row), ``nan_eval`` (its evaluation reports a NaN loss),
``nan_loss`` (it reports a NaN train loss with a finite adapter).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from mira.federation import client_app, protocol

FAULTS = "MIRA_TEST_FAULTS"


def _fault_for(msg: Message) -> dict | None:
    settings = msg.content.config_records[protocol.SETTINGS]
    if msg.metadata.message_type == "query":
        # Round 0 is first contact: the identify query that sends a client its config view.
        if protocol.CONFIG_JSON not in settings:
            return None
        first = [f for f in json.loads(os.environ.get(FAULTS, "[]")) if f["round"] == 0]
        return first[0] if first else None
    client, server_round = str(settings[protocol.CLIENT]), int(str(settings[protocol.ROUND]))
    for fault in json.loads(os.environ.get(FAULTS, "[]")):
        if fault["client"] == client and fault["round"] == server_round:
            return fault
    return None


def _mapped(record: ArrayRecord, change: Callable[[np.ndarray], np.ndarray]) -> ArrayRecord:
    changed = {k: Array(np.ascontiguousarray(change(v.numpy()))) for k, v in record.items()}
    return ArrayRecord(changed)


def inject(msg: Message, context: Context, call_next) -> Message:
    fault = _fault_for(msg)
    if fault is None:
        return call_next(msg, context)
    kind = fault["kind"]
    if kind == "raise":
        raise RuntimeError("injected fault: the client's code raised")
    if kind == "hang":
        time.sleep(float(fault["seconds"]))
        return call_next(msg, context)
    reply = call_next(msg, context)
    arrays = reply.content.array_records
    if kind == "nan" and protocol.ADAPTER in arrays:
        arrays[protocol.ADAPTER] = _mapped(arrays[protocol.ADAPTER], lambda v: v * np.nan)
    elif kind == "huge" and protocol.ADAPTER in arrays:
        arrays[protocol.ADAPTER] = _mapped(arrays[protocol.ADAPTER], lambda v: v * 1e30)
    elif kind == "shape" and protocol.ADAPTER in arrays:
        first = sorted(arrays[protocol.ADAPTER])[0]
        values = {k: v.numpy() for k, v in arrays[protocol.ADAPTER].items()}
        values[first] = values[first][1:]
        arrays[protocol.ADAPTER] = ArrayRecord({k: Array(v) for k, v in values.items()})
    elif kind == "nan_loss" and protocol.TRAINING in reply.content.metric_records:
        metrics = dict(reply.content.metric_records[protocol.TRAINING])
        metrics["train_loss"] = float("nan")
        reply.content.metric_records[protocol.TRAINING] = MetricRecord(metrics)
    elif kind == "nan_eval" and protocol.EVALUATION in reply.content.metric_records:
        metrics = dict(reply.content.metric_records[protocol.EVALUATION])
        metrics["eval_loss"] = float("nan")
        reply.content.metric_records[protocol.EVALUATION] = MetricRecord(metrics)
    return reply


faulty_app = ClientApp(mods=[client_app.deadline_mod, inject])
faulty_app.query()(client_app.identify)
faulty_app.train()(client_app.train)
faulty_app.evaluate()(client_app.evaluate)


def own_task_only(msg: Message, context: Context, call_next) -> Message:
    """Fail the client if anything the server sent it names another client's task or path."""
    settings = msg.content.config_records[protocol.SETTINGS]
    if protocol.CONFIG_JSON in settings:
        view = json.loads(str(settings[protocol.CONFIG_JSON]))
        own = int(str(settings[protocol.PARTITION]))
        if len(view["tasks"]) != 1 or view["lora"]["ranks"]:
            raise RuntimeError(f"client {own} was sent {len(view['tasks'])} tasks")
        others = json.loads(os.environ[OTHER_TASKS])[str(own)]
        text = str(settings[protocol.CONFIG_JSON])
        leaked = [word for word in others if word in text]
        if leaked:
            raise RuntimeError(f"client {own} was sent other clients' settings: {leaked}")
    return call_next(msg, context)


OTHER_TASKS = "MIRA_TEST_OTHER_TASKS"
view_checking_app = ClientApp(mods=[client_app.deadline_mod, own_task_only])
view_checking_app.query()(client_app.identify)
view_checking_app.train()(client_app.train)
view_checking_app.evaluate()(client_app.evaluate)
