"""Faults injected by the tests into a real ClientApp, never by switches in the product.

``faulty_app`` is mira's own ClientApp (the same handlers and deadline mod) with one more mod
that misbehaves for chosen clients in chosen rounds, as told by the environment variable
``MIRA_TEST_FAULTS`` (JSON: a list of {"client", "round", "kind"[, "seconds"]}; round 0 is
every client's identify query, whatever "client" says). The variable is read in the client
process, so the Simulation Engine's workers see what the test set.

Kinds: ``raise`` (the client's code raises), ``hang`` (it sleeps ``seconds`` before working),
``nan`` / ``huge`` (its trained adapter is NaN / multiplied by 1e30), ``shape`` (a tensor of
its trained adapter loses a row), ``nan_eval`` (its evaluation reports a NaN loss),
``nan_loss`` (it reports a NaN train loss with a finite adapter), ``flip`` (its update, the
trained adapter minus the one it started training from, is multiplied by ``factor``, -9 unless
given: a sign-flipped update inside the norm screen's bound), ``forget`` (what its node kept in
its Context.state is gone, as after a restarted client process).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from mira.client import learner
from mira.federation import client_app, codec
from mira.federation.messages import Reply

FAULTS = "MIRA_TEST_FAULTS"
FLIP_FACTOR = -9.0

# The factor of the ``flip`` fault for the client whose message is being handled (None: none).
_flip_factor: float | None = None
_train_steps = learner.train_steps


def _flipping_train_steps(model, parameters, *args, **kwargs) -> float:
    """learner.train_steps, then (under a ``flip`` fault) start + factor * (trained - start)."""
    parameters = list(parameters)
    start = [p.detach().clone() for p in parameters]
    loss = _train_steps(model, parameters, *args, **kwargs)
    if _flip_factor is not None:
        with torch.no_grad():
            for p, s in zip(parameters, start, strict=True):
                p.copy_(s + _flip_factor * (p - s))
    return loss


learner.train_steps = _flipping_train_steps  # the ClientApp calls learner.train_steps


def _fault_for(msg: Message) -> dict | None:
    if msg.metadata.message_type == "query":
        # Round 0 is first contact: the identify query that sends a client its config view.
        if codec.decode_identify(msg) is None:
            return None
        first = [f for f in json.loads(os.environ.get(FAULTS, "[]")) if f["round"] == 0]
        return first[0] if first else None
    instruction, _ = codec.decode_instruction(msg)
    for fault in json.loads(os.environ.get(FAULTS, "[]")):
        if fault["client"] == instruction.client_id and fault["round"] == instruction.round:
            return fault
    return None


def _mapped(reply: Reply, change: Callable[[np.ndarray], np.ndarray]) -> None:
    if reply.trained is not None:
        reply.trained = {k: np.ascontiguousarray(change(v)) for k, v in reply.trained.items()}


def _shape(reply: Reply) -> None:
    if reply.trained is not None:
        first = sorted(reply.trained)[0]
        reply.trained[first] = reply.trained[first][1:]


def _nan_loss(reply: Reply) -> None:
    if reply.trained is not None:
        reply.train_loss = float("nan")


def _nan_eval(reply: Reply) -> None:
    if reply.evaluation is not None:
        reply.evaluation.eval_loss = float("nan")


CHANGES: dict[str, Callable[[Reply], None]] = {
    "nan": lambda reply: _mapped(reply, lambda v: v * np.nan),
    "huge": lambda reply: _mapped(reply, lambda v: v * 1e30),
    "shape": _shape,
    "nan_loss": _nan_loss,
    "nan_eval": _nan_eval,
}


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
    if kind == "forget":
        context.state.array_records.clear()
        return call_next(msg, context)
    if kind == "flip":
        global _flip_factor
        _flip_factor = float(fault.get("factor", FLIP_FACTOR))
        try:
            return call_next(msg, context)
        finally:
            _flip_factor = None
    reply = call_next(msg, context)
    if reply.has_error() or kind not in CHANGES:
        return reply
    return codec.rewrite_reply(reply, CHANGES[kind])


faulty_app = ClientApp(mods=[client_app.deadline_mod, inject])
faulty_app.query()(client_app.identify)
faulty_app.train()(client_app.train)
faulty_app.evaluate()(client_app.evaluate)


def own_task_only(msg: Message, context: Context, call_next) -> Message:
    """Fail the client if anything the server sent it names another client's task or path."""
    sent = codec.request_view(msg)
    if sent is not None:
        text, own = sent
        view = json.loads(text)
        if len(view["tasks"]) != 1 or view["lora"]["ranks"]:
            raise RuntimeError(f"client {own} was sent {len(view['tasks'])} tasks")
        others = json.loads(os.environ[OTHER_TASKS])[str(own)]
        leaked = [word for word in others if word in text]
        if leaked:
            raise RuntimeError(f"client {own} was sent other clients' settings: {leaked}")
    return call_next(msg, context)


OTHER_TASKS = "MIRA_TEST_OTHER_TASKS"
view_checking_app = ClientApp(mods=[client_app.deadline_mod, own_task_only])
view_checking_app.query()(client_app.identify)
view_checking_app.train()(client_app.train)
view_checking_app.evaluate()(client_app.evaluate)
