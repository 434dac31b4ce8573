"""The mira server on Flower: find the clients, then one exchange per round, and write it all.

The round logic lives in :class:`mira.federation.state.ServerState` (no Flower types); this
module is the plumbing around it: it turns instructions into Flower messages
(:mod:`mira.federation.protocol`), pushes them through the Grid, pulls the replies within
``federation.timeout``, and hands the run directory what to write
(:mod:`mira.results.rundir`). ``mira run`` (Simulation Engine) and ``flwr run`` (Simulation or
Deployment Engine) both call :func:`run_federation`.

There is no global model, so this is not one of Flower's model-averaging strategies: the server
stores every client's adapter and sends each node ITS OWN (docs/design.md, "Engine").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from mira.config import Config, ConfigError
from mira.core import rules
from mira.errors import MiraError
from mira.federation import protocol
from mira.federation.protocol import Instruction, Reply
from mira.federation.state import ClientState, ServerState, ServerStateError
from mira.graph.build import (
    TaskGraph,
    fingerprint_graph,
    needs_fingerprints,
    placeholder_graph,
    static_graph,
)
from mira.results.rundir import Checkpoint, RunWriter, read_checkpoint, truncate_metrics

Log = Callable[[str], None]


class FederationError(MiraError, RuntimeError):
    """A client failed, sent something unusable, or did not answer in time."""


class Link:
    """Pushes messages to nodes through the Grid and pulls their replies within the timeout."""

    def __init__(self, grid: Grid, cfg: Config, log: Log):
        self.grid = grid
        self.cfg = cfg
        self.log = log
        self.names: dict[int, str] = {}  # node id -> client id, once known

    def who(self, node_id: int) -> str:
        if node_id in self.names:
            return f"client {self.names[node_id]} (node {node_id})"
        return f"node {node_id}"

    def exchange(self, messages: list[Message], what: str) -> list[Message]:
        """Push ``messages``, pull replies as they come (showing progress), fail on errors."""
        if not messages:
            return []
        ids = [i for i in self.grid.push_messages(messages) if i]
        if len(ids) != len(messages):
            raise FederationError(f"{what}: only {len(ids)} of {len(messages)} messages sent")
        pending = set(ids)
        replies: list[Message] = []
        deadline = time.monotonic() + self.cfg.federation.timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    who = self.who(reply.metadata.src_node_id)
                    raise FederationError(f"{what}: {who} failed: {reply.error.reason}")
                replies.append(reply)
                self.log(f"  {what}: {len(replies)}/{len(messages)} clients done")
            if pending:
                if time.monotonic() > deadline:
                    answered = {r.metadata.src_node_id for r in replies}
                    missing = [
                        self.who(m.metadata.dst_node_id)
                        for m in messages
                        if m.metadata.dst_node_id not in answered
                    ]
                    raise FederationError(
                        f"{what}: no reply within federation.timeout = "
                        f"{self.cfg.federation.timeout}s from {', '.join(missing)}"
                    )
                time.sleep(0.1)
        return replies

    def wait_for_nodes(self) -> list[int]:
        """The node ids of the federation, once at least one per client has connected."""
        expected = self.cfg.num_clients
        deadline = time.monotonic() + self.cfg.federation.timeout
        node_ids = list(self.grid.get_node_ids())
        reported = -1
        while len(node_ids) < expected:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(node_ids)} of the {expected} SuperNodes this config needs "
                    f"connected within federation.timeout = {self.cfg.federation.timeout}s"
                )
            if len(node_ids) != reported:
                reported = len(node_ids)
                self.log(
                    f"waiting for SuperNodes: {reported} of {expected} connected (one per client, "
                    f"partition-id 0..{expected - 1}; for a local `flwr run .` pass "
                    f'--federation-config "num-supernodes={expected}")'
                )
            time.sleep(2.0)
            node_ids = list(self.grid.get_node_ids())
        return node_ids


def discover(link: Link, cfg: Config, fingerprints: bool) -> tuple[list[ClientState], np.ndarray]:
    """Ask every node who it is; clients report their own ids (node ids are not stable).

    Returns the clients in config order and their fingerprints ([K, d]; empty when not asked).
    """
    config_json = cfg.to_json()
    messages = [
        protocol.encode_identify(node, config_json, fingerprints) for node in link.wait_for_nodes()
    ]
    what = "identify + fingerprint" if fingerprints else "identify"
    found: dict[str, protocol.Identity] = {}
    idle = 0
    for reply in link.exchange(messages, what):
        identity = protocol.decode_identity(reply)
        if not identity.client_id:
            idle += 1
            continue
        if identity.client_id in found:
            raise FederationError(
                f"two nodes claim to be client {identity.client_id}: check each SuperNode's "
                "partition-id"
            )
        found[identity.client_id] = identity
    missing = [c for c in cfg.client_ids if c not in found]
    if missing:
        raise FederationError(f"no node answered as client(s) {', '.join(missing)}")
    if idle:
        link.log(f"{idle} node(s) hold no client of this config (partition-id too large)")
    clients = []
    for client_id in cfg.client_ids:
        identity = found[client_id]
        if identity.init is None:
            raise FederationError(f"client {client_id} sent no LoRA initialisation")
        link.names[identity.node_id] = client_id
        clients.append(
            ClientState(
                client_id=client_id,
                task=identity.task,
                rank=identity.rank,
                node_id=identity.node_id,
                num_train=identity.num_train,
                adapter=identity.init,
            )
        )
    check_shared_init(clients, cfg.federation.seed)
    try:
        rules.resolve_pull_space(cfg.server.pull_space, [c.rank for c in clients])
    except ValueError as err:
        raise ConfigError(str(err)) from err
    vectors = np.zeros((0, 0))
    if fingerprints:
        absent = [c for c in cfg.client_ids if found[c].fingerprint is None]
        if absent:
            raise FederationError(f"no fingerprint from {', '.join(absent)}")
        vectors = np.stack([found[c].fingerprint for c in cfg.client_ids])  # type: ignore[misc]
    return clients, vectors


def check_shared_init(clients: list[ClientState], seed: int) -> None:
    """All clients of one rank must start from the same LoRA init (same seed)."""
    first: dict[int, ClientState] = {}
    for c in clients:
        ref = first.setdefault(c.rank, c)
        for key, value in c.adapter.items():
            if not np.array_equal(value, ref.adapter[key]):
                raise FederationError(
                    f"clients {ref.client_id} and {c.client_id} report different LoRA "
                    f"initialisations ({key}); every client must use federation.seed = "
                    f"{seed} and the same base model"
                )


def graph_from_fingerprints(cfg: Config, vectors: np.ndarray, log: Log, after: int) -> TaskGraph:
    try:
        graph = fingerprint_graph(cfg, vectors)
    except ValueError as err:
        raise FederationError(f"task graph from fingerprints failed: {err}") from err
    info = graph.info
    log(
        f"task graph from fingerprints after round {after}: clusters {graph.clusters}"
        + (f", k={info['k']} (silhouette {info['silhouette']:.3f})" if "k" in info else "")
        + f", ARI vs declared tasks {info['ari_vs_declared_tasks']:.3f}"
    )
    return graph


def _exchange(
    link: Link, state: ServerState, instructions: list[Instruction], what: str
) -> tuple[dict[int, Reply], dict[int, int]]:
    """Send every instruction, return the replies and the bytes sent, by client index."""
    config_json = state.cfg.to_json()
    messages, sent = [], {}
    for instruction in instructions:
        message, size = protocol.encode_instruction(instruction, config_json)
        messages.append(message)
        sent[state.index(instruction.client_id)] = size
    replies: dict[int, Reply] = {}
    for message in link.exchange(messages, what):
        reply = protocol.decode_reply(message)
        try:
            index = state.index(reply.client_id)
        except ServerStateError as err:
            raise FederationError(f"{what}: reply from unknown client {reply.client_id!r}") from err
        expected = state.clients[index].node_id
        if reply.node_id != expected:
            raise FederationError(
                f"{what}: reply for {reply.client_id} came from node {reply.node_id}, "
                f"expected node {expected}"
            )
        if reply.trained is not None:
            check_trained(state, index, reply.trained, what)
        replies[index] = reply
    return replies, sent


def check_trained(state: ServerState, index: int, adapter: dict, what: str) -> None:
    """A trained adapter must have the tensors and shapes the client was sent, all finite."""
    client = state.clients[index]
    if set(adapter) != set(client.adapter):
        raise FederationError(
            f"{what}: client {client.client_id} returned an adapter with different tensors "
            "than it was sent"
        )
    for key, value in adapter.items():
        if value.shape != client.adapter[key].shape:
            raise FederationError(
                f"{what}: client {client.client_id} returned {key} with shape {value.shape}, "
                f"expected {client.adapter[key].shape}"
            )
        if not np.all(np.isfinite(value)):
            raise FederationError(
                f"{what}: client {client.client_id} returned NaN or infinite values in {key}; "
                "the run stops here and keeps what the completed rounds wrote"
            )


def _checkpoint(writer: RunWriter, state: ServerState) -> None:
    server_state, adapters = state.snapshot_state()
    graph = state.graph
    writer.write_checkpoint(
        Checkpoint(
            round=state.trained_round,
            client_ids=[c.client_id for c in state.clients],
            ranks=[c.rank for c in state.clients],
            adapters=adapters,
            adjacency=graph.adjacency,
            clusters=graph.clusters,
            graph_source=graph.source,
            graph_info=graph.info,
            server=server_state,
        )
    )


def _write_closed(writer: RunWriter, state: ServerState, closed, log: Log, base: str) -> None:
    for client, adapter in zip(state.clients, closed.adapters, strict=True):
        writer.write_adapter(client.client_id, adapter, client.rank, base)
    aggregate = writer.append_round(closed.seconds, closed.round, closed.rows)
    rounds = state.cfg.federation.rounds
    log(
        f"[round {closed.round}/{rounds}] done: train loss {_fmt(aggregate['train_loss_mean'])}, "
        f"personalised eval loss mean {_fmt(aggregate['personalised_eval_loss_mean'])} "
        f"worst {_fmt(aggregate['personalised_eval_loss_worst'])}"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def run_federation(
    grid: Grid,
    cfg: Config,
    out_dir: Path,
    base_source: str,
    resume: bool = False,
    log: Log = print,
) -> None:
    """The ServerApp body shared by ``mira run`` and ``flwr run``.

    With ``resume`` the run continues after the last checkpointed exchange in ``out_dir``.
    """
    checkpoint = read_checkpoint(out_dir) if resume else None
    if resume and checkpoint is None:
        raise FederationError(f"{out_dir} has no checkpoint to resume from")
    writer = RunWriter(out_dir, cfg)
    log(
        f"server: method={cfg.server.method} step={cfg.server.step} graph={cfg.server.graph} "
        f"clients={cfg.num_clients} rounds={cfg.federation.rounds} "
        f"fraction={cfg.federation.fraction}"
    )
    writer.write_config()
    link = Link(grid, cfg, log)
    fingerprints = needs_fingerprints(cfg) and checkpoint is None
    clients, vectors = discover(link, cfg, fingerprints)
    graph = static_graph(cfg)
    if fingerprints:
        graph = graph_from_fingerprints(cfg, vectors, log, 0)
    elif graph is None:
        graph = placeholder_graph(cfg)
    state = ServerState(cfg, clients, graph)
    first = 1
    if checkpoint is not None:
        state.rebuild_graph(
            TaskGraph(
                checkpoint.adjacency,
                checkpoint.clusters,
                checkpoint.graph_source,
                checkpoint.graph_info,
            )
        )
        try:
            state.restore_state(checkpoint.server, checkpoint.adapters)
        except ServerStateError as err:
            raise FederationError(str(err)) from err
        last_written = state.trained_round - 1 if state.open_rows else state.trained_round
        truncate_metrics(out_dir, last_written)
        log(f"resuming after round {state.trained_round} from {out_dir / 'checkpoint'}")
        first = state.trained_round + 1
    else:
        writer.write_graph(state.clients, graph, cfg.server.step, built_after=0)
    rounds = cfg.federation.rounds
    for server_round in range(first, rounds + 2):
        final = server_round > rounds
        if final and not state.open_rows:
            break
        started = time.monotonic()
        instructions = state.plan(server_round)
        what = "final evaluation" if final else f"round {server_round}"
        replies, sent = _exchange(link, state, instructions, what)
        try:
            closed = state.close_round(
                replies, sent, seconds=time.monotonic() - started if final else 0.0
            )
        except ServerStateError as err:
            raise FederationError(f"{what}: {err}") from err
        if closed is not None:
            _write_closed(writer, state, closed, log, base_source)
        if final:
            _checkpoint(writer, state)
            break
        if state.refresh_due(server_round):
            fresh = [replies[i].fingerprint for i in range(len(state.clients)) if i in replies]
            if len(fresh) != len(state.clients) or any(v is None for v in fresh):
                raise FederationError(f"{what}: not every client sent its fingerprint")
            graph = graph_from_fingerprints(cfg, np.stack(fresh), log, server_round - 1)  # type: ignore[arg-type]
            state.rebuild_graph(graph)
            writer.write_graph(state.clients, graph, cfg.server.step, built_after=server_round - 1)
        state.apply_rule(server_round, replies, sent, seconds=time.monotonic() - started)
        _checkpoint(writer, state)
