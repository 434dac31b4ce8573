"""The mira ClientApp: peft LoRA training and evaluation on one client's private data.

Every message from the server carries the resolved config (JSON). The client identifies itself
from its node config's ``partition-id`` (Flower node ids are not stable identities) and answers:

- ``query`` (identify): its identity (client id, task, rank, split sizes), the shared LoRA
  init and, on request, its fingerprint;
- ``train`` / ``evaluate`` (one exchange of a round, :mod:`mira.federation.messages`): from the
  adapter it was sent (auto: or the one its node kept in ``Context.state``, when the message
  leaves it out), (auto) choose its mix with its neighbours' mean on its validation split,
  evaluate the result on its eval split, compute a fingerprint if asked, then train
  ``federation.local_steps`` AdamW steps if asked; send back what it did (auto: and keep the
  adapter it now holds).

The base model is loaded once per process and reused; data splits are cached per process.
Unless the run config says ``verbose = true``, the libraries' warnings and progress bars are
dropped in this process (:func:`output_mod`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import queue
import resource
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from mira.client import learner
from mira.client.chat import chat_format
from mira.client.fingerprint_cache import cached_fingerprint, fingerprint_key
from mira.client.lora import LoraModel, lora_model
from mira.client.privacy import privatise_update
from mira.client.quiet import quiet_process
from mira.client.ranks import client_rank
from mira.config import Config, LearnedMix, config_from_dict
from mira.core import rules
from mira.core.adapters import Adapter, lora_scale
from mira.data import ClientData, load_client_data
from mira.federation import codec
from mira.federation.messages import (
    Evaluation,
    IdentifyRequest,
    Identity,
    Instruction,
    Reply,
    adapter_digest,
)
from mira.graph import fingerprint

# One piece of client work at a time in a process: a handler abandoned by deadline_mod may
# still be running, and the base model and its adapters are shared.
_WORK = threading.Lock()


class _Job:
    """One handler call run by a :class:`_Worker`: its outcome and its cancellation flag."""

    def __init__(self, call: Callable[[], Message]) -> None:
        self.call = call
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.reply: Message | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.reply = self.call()
        except BaseException as err:  # handed to the waiting thread
            self.error = err
        finally:
            self.done.set()


class _Worker:
    """A daemon thread that runs this process's handlers one after another.

    Every message is handled on the same thread, so torch's CPU tensors come from one glibc
    malloc arena. A new thread per message would spread the handlers over up to 8 arenas per
    core, each keeping its share of freed activations resident: client processes held 2 to 3
    times the memory of the same work on one thread (docs/memory.md, "Threads"). A worker
    whose job outlived its deadline is retired: it stops after that job, and the next message
    gets a fresh worker.
    """

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="mira-client-work", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            threading.current_thread().cancelled = job.cancelled  # type: ignore[attr-defined]
            job.run()

    def retire(self) -> None:
        self.jobs.put(None)


_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()


def _run_on_worker(call: Callable[[], Message], limit: float) -> _Job:
    """Run ``call`` on the process's worker thread and wait at most ``limit`` seconds.

    On time, the returned job is done. Past the deadline its ``cancelled`` flag is set (the
    handler stops at its next :func:`_check_not_cancelled`) and the worker is retired.
    """
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
        worker = _WORKER
    job = _Job(call)
    worker.jobs.put(job)
    if not job.done.wait(limit):
        job.cancelled.set()
        with _WORKER_LOCK:
            if _WORKER is worker:
                _WORKER = None
        worker.retire()
    return job


def deadline_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Answer within the server's deadline whatever the handler does: ``federation.round_timeout``
    for a round's train or evaluate message, ``federation.timeout`` for the identify query
    (which includes loading the base model, as the server's wait for it does).

    The handler runs on the process's worker thread (:class:`_Worker`); if it has not finished
    by the deadline the client answers with an error (the server has given up on it by then
    too) and the work is marked cancelled: it stops at its next check, and it never runs next
    to the client's next message (one piece of work at a time). Without this, a hung client
    would hold a worker of the Simulation Engine forever and the run could never end.
    """
    view = codec.request_view(msg)
    if view is None:
        return call_next(msg, context)
    federation = _config(view[0]).federation
    key, limit = (
        ("federation.timeout", federation.timeout)
        if msg.metadata.message_type == MessageType.QUERY
        else ("federation.round_timeout", federation.round_timeout)
    )
    job = _run_on_worker(lambda: call_next(msg, context), limit)
    if not job.done.is_set():
        return codec.encode_abandoned(msg, f"no answer within {key} = {limit:g}s; abandoned")
    if job.error is not None:
        raise job.error
    assert job.reply is not None
    return job.reply


def _check_not_cancelled() -> None:
    event = getattr(threading.current_thread(), "cancelled", None)
    if event is not None and event.is_set():
        raise TimeoutError("this work was abandoned at its deadline")


def output_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """The ServerApp's output policy in this process (:func:`mira.client.quiet.quiet_process`):
    the run config's ``verbose`` shows the libraries' warnings and progress bars; without it
    they are dropped (a client has no run directory to keep them in)."""
    quiet_process(context.run_config.get("verbose", False) in (True, "true"))
    return call_next(msg, context)


app = ClientApp(mods=[output_mod, deadline_mod])


@lru_cache(maxsize=4)
def _config(config_json: str) -> Config:
    return config_from_dict(json.loads(config_json))


def _lora_model(cfg: Config) -> LoraModel:
    # Workers share the machine's cores: each takes its slice for torch's intra-op threads.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, cfg.federation.workers)))
    # A memory budget counts process memory only on the CPU (on a GPU, device memory).
    from mira.client.devices import resolve_device

    if any(task.memory_mb for task in cfg.tasks) and resolve_device(cfg.model)[0] == "cpu":
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
def _client_data(config_json: str, shard: int) -> Encoded:
    cfg = _config(config_json)
    data = load_client_data(cfg, shard)
    tokenizer = _lora_model(cfg).tokenizer
    chat = chat_format(tokenizer, cfg.data.chat_template)

    def encode(examples: list[Any]) -> list[learner.Encoded]:
        return [learner.encode(tokenizer, e, cfg.model.max_length, chat) for e in examples]

    return Encoded(data, encode(data.train), encode(data.val), encode(data.eval))


def peak_memory_mb() -> float:
    """Peak resident memory of this client process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def training_seed(seed: int, partition: int, server_round: int) -> int:
    """Seed of one client's data order and dropout in one round."""
    return int(np.random.SeedSequence([seed, partition, server_round]).generate_state(1)[0])


def _node_partition(context: Context) -> int:
    """This node's partition-id: which client of the config it holds (-1: none given)."""
    return int(str(context.node_config.get("partition-id", -1)))


def _check_partition(context: Context, partition: int) -> None:
    """The server addresses this node as client ``partition``: it must be the one it holds."""
    held = _node_partition(context)
    if held != partition:
        raise ValueError(
            f"the server sent client {partition}'s work to this node, which holds "
            f"partition-id {held}"
        )


def _identity(view: Config, shard: int, node_id: int) -> Identity:
    """Who this client is, from its view of the config (its own task only)."""
    return Identity(
        client_id=view.client_ids[shard],
        node_id=node_id,
        task=view.client_tasks[shard],
        rank=client_rank(view, shard),
    )


def client_fingerprint(
    cfg: Config, partition: int, model: LoraModel, encoded_train: Any, own: str | None
) -> np.ndarray:
    """This client's task fingerprint: a probe-LoRA signal on a few local batches, randomly
    projected to ``server.fingerprint_dim`` with the seed every client shares, unit norm.

    ``own`` names the client's current adapter to keep active (a refresh measures the
    client's personalised model); None measures the base model, and that fingerprint is kept
    in the client's cache for the next run on the same data and settings
    (:mod:`mira.client.fingerprint_cache`, ``server.fingerprint_cache``).
    """
    if own is None and cfg.server.fingerprint_cache:
        key = fingerprint_key(cfg, partition, model.base, encoded_train)
        return cached_fingerprint(
            key,
            lambda: _fingerprint(cfg, partition, model, encoded_train, None),
            cfg.model.cache_dir,
        )
    return _fingerprint(cfg, partition, model, encoded_train, own)


def _fingerprint(
    cfg: Config, partition: int, model: LoraModel, encoded_train: Any, own: str | None
) -> np.ndarray:
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
    """Say which partition-id this node holds; given its client's view of the config, send
    its identity and the shared LoRA init and, on request, its fingerprint."""
    request = codec.decode_identify(msg)
    if request is None:
        return codec.encode_who_reply(msg, _node_partition(context))
    with _WORK:
        _check_not_cancelled()
        return codec.encode_identity(msg, _identify(request, context))


def _identify(request: IdentifyRequest, context: Context) -> Identity:
    cfg = _config(request.config_json)  # this client's view: its own task only
    partition, shard = request.partition, request.shard
    _check_partition(context, partition)
    encoded = _client_data(request.config_json, shard)
    rank = client_rank(cfg, shard)
    model = _lora_model(cfg)
    identity = _identity(cfg, shard, context.node_id)
    identity.num_train = len(encoded.data.train)
    identity.num_eval = len(encoded.data.eval)
    identity.init = model.shared_init(cfg.lora, rank, cfg.federation.seed)
    if request.fingerprint:
        identity.fingerprint = client_fingerprint(cfg, partition, model, encoded.train, None)
    return identity


def choose_mix(
    cfg: Config,
    model: LoraModel,
    name: str,
    own: Adapter,
    instruction: Instruction,
    rank: int,
    val: Any,
    reply: Reply,
) -> Adapter:
    """``server.step = "auto"``: mix ``own`` (W_k) with its neighbours' mean M_k,
    (1 - alpha) W_k + alpha M_k, for the alpha chosen by the validation losses of the
    candidates, and put in ``reply`` the alpha applied, every candidate's validation loss and,
    with a tolerance, their standard errors (docs/design.md, "Personalisation strength").
    Returns the mixed adapter, which is active.

    One forward pass of the validation split per candidate that :func:`rules.search_points`
    names (``server.auto.evaluations`` of them; the other candidates' per-example losses are
    read off the curve through them, :func:`rules.interpolate_losses`), then the decision
    :func:`rules.decide_mix`, which the server checks with the same numbers. Pooled by cluster
    (``server.auto.pool``), the client applies the alpha the server sent and reports its sums
    (:func:`rules.validation_sums`) for the next decision instead. Sent no candidates (the
    times in between its choices, ``server.auto.every``), it applies the weight the server
    sent, with no validation pass. Only this client's validation split is used; the eval split
    never influences the choice.
    """
    assert instruction.mean is not None
    policy = cfg.server.auto
    space, candidates = instruction.space, instruction.candidates
    scale = lora_scale(cfg.lora.alpha, rank, cfg.lora.rslora)
    if not candidates:  # a time it reuses its last weight (server.auto.every): no search
        if instruction.alpha is None:
            raise ValueError("server.step = 'auto': the server sent no candidates and no weight")
        reply.alpha = instruction.alpha
        reused = rules.mix_toward(own, instruction.mean, reply.alpha, space, scale)
        model.set_adapter(name, reused)
        return reused
    pad_id = model.tokenizer.pad_token_id
    pooled = policy.pool == "cluster"
    per_example = policy.tolerance > 0 or pooled
    points = rules.search_points(candidates, instruction.anchor, policy.evaluations)
    mixed: dict[float, Adapter] = {}
    measured: list[Any] = []  # per candidate: its per-example losses, or its mean loss
    tokens = np.zeros(0)
    for j in points:
        mixed[candidates[j]] = rules.mix_toward(own, instruction.mean, candidates[j], space, scale)
        model.set_adapter(name, mixed[candidates[j]])
        if per_example:
            nll, tokens = learner.example_nll(model.peft, val, cfg.train.eval_batch_size, pad_id)
            measured.append(nll)
        else:
            measured.append(learner.eval_loss(model.peft, val, cfg.train.eval_batch_size, pad_id))
    if per_example:
        nll = rules.interpolate_losses(np.stack(measured), candidates, points)
        total = tokens.sum()
        reply.val_losses = [float(row.sum() / total) if total else math.nan for row in nll]
        if policy.tolerance > 0:
            reply.val_standard_errors = rules.paired_standard_errors(nll, tokens).tolist()
        if pooled:
            reply.val_sums = rules.validation_sums(nll, tokens)
    else:
        losses = rules.interpolate_losses(np.asarray(measured), candidates, points)
        reply.val_losses = losses.tolist()
    if pooled:
        if instruction.alpha is None:
            raise ValueError("server.auto.pool = 'cluster', but the server sent no mix weight")
        reply.alpha = instruction.alpha
    else:
        reply.alpha = rules.decide_mix(
            reply.val_losses,
            reply.val_standard_errors,
            candidates,
            instruction.anchor,
            instruction.prior[0] if instruction.prior else None,
            tolerance=policy.tolerance,
            smoothing=policy.smoothing,
        ).alpha
    adapter = mixed.get(reply.alpha)
    if adapter is None:
        adapter = rules.mix_toward(own, instruction.mean, reply.alpha, space, scale)
    model.set_adapter(name, adapter)
    return adapter


def evaluate_adapter(
    cfg: Config, model: LoraModel, encoded: Encoded, task_metrics: bool
) -> Evaluation:
    """Eval loss (and, when due, the task metrics) of the active adapter on the eval split."""
    loss = learner.eval_loss(
        model.peft, encoded.eval, cfg.train.eval_batch_size, model.tokenizer.pad_token_id
    )
    scores = {}
    if task_metrics:
        scores = learner.task_metrics(
            model.peft, model.tokenizer, encoded.data.task, encoded.data.eval, cfg
        )
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"client {encoded.data.client_id}: the eval loss of its adapter is {loss}"
        )
    return Evaluation(
        eval_loss=loss,
        num_examples=float(len(encoded.data.eval)),
        peak_memory_mb=peak_memory_mb(),
        metrics=dict(scores),
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _round_step(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _round_step(msg, context)


def _round_step(msg: Message, context: Context) -> Message:
    with _WORK:
        _check_not_cancelled()
        return _round_work(msg, context)


def _round_work(msg: Message, context: Context) -> Message:
    """One exchange: choose (auto), evaluate, fingerprint and train, as instructed."""
    instruction, config_json = codec.decode_instruction(msg)
    cfg = _config(config_json)  # this client's view: its own task only
    partition, shard = instruction.partition, instruction.shard
    _check_partition(context, partition)
    if instruction.client_id != cfg.client_ids[shard]:
        raise ValueError(
            f"server sent client {instruction.client_id}'s adapter to {cfg.client_ids[shard]}"
        )
    reply = Reply(client_id=instruction.client_id, node_id=instruction.node_id)
    identity = _identity(cfg, shard, instruction.node_id)
    start = instruction.adapter
    if start is None:  # the server left out the adapter this node said it holds
        start = codec.kept_adapter(context.state)
        if start is None or adapter_digest(start) != instruction.held:
            reply.lacks_adapter = True  # a restarted process: the server sends it again
            return codec.encode_reply(reply, msg, identity)
    encoded = _client_data(config_json, shard)
    rank = client_rank(cfg, shard)
    model = _lora_model(cfg)
    name = model.activate(cfg.lora, rank)
    model.set_adapter(name, start)
    if instruction.mean is not None:
        start = choose_mix(cfg, model, name, start, instruction, rank, encoded.val, reply)
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
            server_round=instruction.round,
        )
        reply.trained = model.get_adapter(name)
        if cfg.privacy.clip_norm > 0:
            # Noise from the operating system's entropy: the server cannot regenerate it.
            # The pre-clipping norm stays here (it is not covered by the guarantee).
            reply.trained, _ = privatise_update(
                start,
                reply.trained,
                cfg.privacy.clip_norm,
                cfg.privacy.noise_multiplier,
                np.random.default_rng(),
            )
    if isinstance(cfg.server.policy, LearnedMix):
        # Kept for the next exchange: what it uploaded (the server's copy), else where it is.
        held = start if reply.trained is None else reply.trained
        codec.keep_adapter(context.state, held)
        reply.holds = adapter_digest(held)
    return codec.encode_reply(reply, msg, identity)
