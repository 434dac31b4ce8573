"""The mira server on Flower: find the clients, then one exchange per round, and write it all.

The round logic lives in :class:`mira.federation.state.ServerState` (no Flower types); this
module is the plumbing around it: it turns instructions into Flower messages
(:mod:`mira.federation.codec`), pushes them through the Grid, pulls the replies within
``federation.timeout``, and hands the run directory what to write
(:mod:`mira.results.rundir`). ``mira run`` (Simulation Engine) and ``flwr run`` (Simulation or
Deployment Engine) both call :func:`run_federation`.

There is no global model, so this is not one of Flower's model-averaging strategies: the server
stores every client's adapter and sends each node ITS OWN (docs/design.md, "Engine").
"""

from __future__ import annotations

import functools
import math
import re
import time
from pathlib import Path

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from mira.config import Config, ConfigError, check_resumable, run_config_from_dict
from mira.core import rules
from mira.core.adapters import Adapter
from mira.errors import MiraError
from mira.federation import codec
from mira.federation.identity import (
    HOW_TO_BIND,
    ClientTable,
    client_table,
    node_has_key,
    read_client_table,
)
from mira.federation.messages import (
    IdentifyRequest,
    Identity,
    Instruction,
    Reply,
    client_view,
    task_of,
)
from mira.federation.progress import Progress
from mira.federation.state import (
    ClientState,
    ClosedRound,
    Outcome,
    ServerState,
    ServerStateError,
    train_loss_problem,
    update_problem,
)
from mira.graph.build import (
    TaskGraph,
    fingerprint_graph,
    needs_fingerprints,
    placeholder_graph,
    static_graph,
)
from mira.results.rundir import (
    Checkpoint,
    RunWriter,
    disk_full_error,
    read_checkpoint,
    truncate_metrics,
)
from mira.results.runs import update_run_info
from mira.results.schema import FAILED, OK, REJECTED, TIMEOUT, RunLayout


class FederationError(MiraError, RuntimeError):
    """A client failed, sent something unusable, or did not answer in time."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Seconds the server waits beyond a client's deadline: the ClientApp's deadline_mod answers at
# the deadline itself, counted from when the client started, and that answer (which frees a
# shared Simulation Engine worker) must arrive before the server gives up on the client.
REPLY_GRACE = 5.0


def short_reason(reason: str) -> str:
    """The gist of a client's error as Flower reports it: the client's own message, not the
    engine's traceback around it (Flower logs that in full)."""
    text = _ANSI.sub("", reason)
    marker = "Message: "
    if marker in text:
        text = text[text.rindex(marker) + len(marker) :]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    gist = lines[-1] if lines else text.strip()
    return gist.rstrip("'>").strip() or "the client failed without a message"


class Link:
    """Pushes messages to nodes through the Grid and pulls their replies within the timeout."""

    def __init__(
        self, grid: Grid, cfg: Config, progress: Progress, table: ClientTable | None = None
    ):
        self.grid = grid
        self.cfg = cfg
        self.progress = progress
        self.table = table  # federation.node_keys: which node key may hold which client
        self.warned_unbound = False
        self.names: dict[int, str] = {}  # node id -> client id, once known
        self.seen: set[int] = set()  # every node ever asked who it is
        self.claims: dict[int, Identity] = {}  # newcomers and whom they claim
        self.refused: set[int] = set()  # newcomers refused as duplicates (logged once)
        self.inits: dict[int, Adapter] = {}  # the shared LoRA initialisation of each rank

    def refuse(self, identity: Identity, holder: int) -> None:
        """A node claims a client another node holds: the first keeps it, the run goes on."""
        node = identity.node_id
        if node not in self.refused:
            self.refused.add(node)
            self.progress.note(
                f"node {node} claims client {identity.client_id}, which node {holder} holds; "
                "refused (check each SuperNode's partition-id). It takes over if that node "
                "leaves."
            )
        self.claims[node] = identity

    def bound_claims(self, claims: dict[int, int]) -> tuple[dict[int, int], dict[int, Outcome]]:
        """The claims {node id: partition-id} the client table allows, and a refusal for each
        other one (docs/design.md, "Faults and trust").

        A claim to hold one of the config's clients stands when the SuperLink knows the node
        by the public key the table gives for that partition-id; a refused node is named in
        the run's output and is sent nothing more (no config view, no adapter). The table is
        read again each time, so a replacement SuperNode's key can be put in while the run
        goes on (a table that no longer reads leaves the last good one in force). Without a
        table, every claim stands; on the Deployment Engine (nodes known by a key) the run
        says once that identities are not bound to keys.
        """
        claimed = {n: p for n, p in claims.items() if 0 <= p < self.cfg.num_clients}
        if not claimed:
            return claims, {}
        keys = {int(info.node_id): bytes(info.public_key) for info in self.grid.get_nodes()}
        if self.table is None:
            if not self.warned_unbound and any(node_has_key(keys.get(n, b"")) for n in claimed):
                self.warned_unbound = True
                self.progress.note(
                    "warning: client identities are not bound to SuperNode keys (any "
                    "registered SuperNode may claim any partition-id); " + HOW_TO_BIND
                )
            return claims, {}
        try:
            self.table = read_client_table(self.table.source, self.cfg.num_clients)
        except ConfigError as err:
            self.progress.note(f"{err}; the client table read before stays in force")
        if not any(node_has_key(key) for key in keys.values()):
            raise ConfigError(
                f"federation.node_keys = {str(self.table.source)!r} binds clients to SuperNode "
                "keys, but the SuperLink knows no node by a key (the Simulation Engine's nodes "
                "have none): leave federation.node_keys empty in simulation"
            )
        allowed, refused = dict(claims), {}
        for node, partition in sorted(claimed.items()):
            problem = self.table.claim_problem(partition, keys.get(node, b""))
            if problem is None:
                continue
            del allowed[node]
            client = self.cfg.client_ids[partition]
            reason = (
                f"node {node} claims partition-id {partition} (client {client}), but {problem}; "
                "refused: it gets no config and no adapter"
            )
            self.progress.note(reason)
            refused[node] = Outcome(REJECTED, reason)
        return allowed, refused

    def who(self, node_id: int) -> str:
        if node_id in self.names:
            return f"client {self.names[node_id]} (node {node_id})"
        return f"node {node_id}"

    def exchange(
        self, messages: list[Message], what: str, timeout: float, timeout_key: str
    ) -> tuple[dict[int, Message], dict[int, Outcome]]:
        """Push ``messages`` and pull the replies as they come, until all answered or the
        clients still pending had ``timeout`` seconds each (the value of the config key
        ``timeout_key``, which a timed-out client's reason names).

        Each client's ``timeout`` runs from when it can start on its message: the push, or the
        last reply of this exchange when that came later. Clients that share a Simulation
        Engine worker (``federation.workers`` below the number of clients) are served one
        after another, and the one before them answering is when they start; a client stuck
        past its deadline is abandoned by its own ``deadline_mod`` (an error reply, recorded
        as ``timeout``), which frees the worker for the clients queued behind it. The server
        waits :data:`REPLY_GRACE` seconds longer than the client's own deadline, so that reply
        comes first. Where nodes work in parallel (the Deployment Engine) the others answer
        early and a silent node is given up ``timeout`` after the last of them.

        Returns, by destination node id, the usable replies and what went wrong with the
        others: an error the client raised (``failed``) or no reply in time (``timeout``). A
        reply that comes after the deadline is never pulled, so it cannot reach a later round.
        """
        if not messages:
            return {}, {}
        pushed = list(self.grid.push_messages(messages))
        node_of = {mid: m.metadata.dst_node_id for mid, m in zip(pushed, messages, strict=True)}
        replies: dict[int, Message] = {}
        problems: dict[int, Outcome] = {}
        for mid, message in zip(pushed, messages, strict=True):
            if not mid:
                node = message.metadata.dst_node_id
                problems[node] = Outcome(FAILED, f"{self.who(node)}: the message was not sent")
        pending = {mid for mid in pushed if mid}
        deadline = time.monotonic() + timeout + REPLY_GRACE
        self.progress.begin(what, len(messages))
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid not in pending:
                    continue
                pending.discard(mid)
                deadline = time.monotonic() + timeout + REPLY_GRACE  # the next one starts now
                node = node_of[mid]  # the node we asked, whatever the reply claims
                if reply.has_error():
                    reason = short_reason(codec.error_reason(reply))
                    status = TIMEOUT if codec.was_abandoned(reply) else FAILED
                    problems[node] = Outcome(status, f"{self.who(node)}: {reason}")
                else:
                    replies[node] = reply
                self.progress.advance(
                    len(replies) + len(problems), len(messages), codec.train_loss_of(reply)
                )
            if pending:
                if time.monotonic() > deadline:
                    for mid in pending:
                        node = node_of[mid]
                        problems[node] = Outcome(
                            TIMEOUT,
                            f"{self.who(node)}: no reply within {timeout_key} = {timeout:g}s",
                        )
                    break
                time.sleep(0.1)
        self.progress.end()
        return replies, problems

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
                self.progress.note(
                    f"waiting for SuperNodes: {reported} of {expected} connected (one per client, "
                    f"partition-id 0..{expected - 1}; for a local `flwr run .` pass "
                    f'--federation-config "num-supernodes={expected}")'
                )
            time.sleep(2.0)
            node_ids = list(self.grid.get_node_ids())
        self.seen.update(node_ids)
        return node_ids


def expected_identity(cfg: Config) -> dict[str, tuple[str, int, int]]:
    """What the config says each client is: {client id: (task, rank, training examples)}."""
    from mira.client.ranks import client_rank  # torch-free unless a memory budget is set

    train = cfg.data.train_size - cfg.data.val_size
    return {
        client: (task, client_rank(cfg, index), train)
        for index, (client, task) in enumerate(zip(cfg.client_ids, cfg.client_tasks, strict=True))
    }


def identity_problem(identity: Identity, expected: tuple[str, int, int]) -> str | None:
    """Why the server refuses a node's account of itself, or None.

    The server trusts the config, not the client: the task, the LoRA rank and the number of
    training examples (which weighs fedit and the cluster rules) must be what the config gives.
    """
    task, rank, train = expected
    if identity.task != task:
        return f"reports task {identity.task!r}, the config gives {task!r}"
    if identity.rank != rank:
        return f"reports LoRA rank {identity.rank}, the config gives {rank}"
    if identity.num_train != train:
        return f"reports {identity.num_train} training examples, the config gives {train}"
    if identity.init is None:
        return "sent no LoRA initialisation"
    return None


@functools.lru_cache(maxsize=4096)
def view_of(cfg: Config, partition: int) -> str:
    """The config JSON client ``partition`` receives: shared settings and its own task only."""
    return client_view(cfg, partition)


def identify(
    link: Link, cfg: Config, nodes: list[int], fingerprints: bool, what: str
) -> tuple[dict[int, Identity], dict[int, Outcome]]:
    """Ask ``nodes`` who they are: {node id: Identity} of those that answered, and failures.

    Two steps, so that a node learns only its own client's settings: which partition-id do you
    hold (nothing of the config is sent), then, to each node holding one of the config's
    clients whose claim the client table allows (:meth:`Link.bound_claims`), that client's
    view of the config (:func:`mira.federation.messages.client_view`), for its identity, the
    shared LoRA init and, on request, its fingerprint. A node holding no client of the config
    is answered with an empty identity; a refused node is sent nothing more.
    """
    asked, problems = link.exchange(
        [codec.encode_who(node) for node in nodes],
        what,
        cfg.federation.timeout,
        "federation.timeout",
    )
    claims, refused = link.bound_claims(
        {node: codec.decode_who(message) for node, message in asked.items()}
    )
    problems.update(refused)
    found: dict[int, Identity] = {}
    setups = []
    for node, partition in claims.items():
        if not 0 <= partition < cfg.num_clients:
            found[node] = Identity(client_id="", node_id=node)
            continue
        request = IdentifyRequest(
            view_of(cfg, partition), partition, task_of(cfg, partition)[1], fingerprints
        )
        setups.append(codec.encode_identify(node, request))
    replies, failed = link.exchange(setups, what, cfg.federation.timeout, "federation.timeout")
    problems.update(failed)
    found.update({node: codec.decode_identity(m) for node, m in replies.items()})
    return found, problems


def discover(link: Link, cfg: Config, fingerprints: bool) -> tuple[list[ClientState], np.ndarray]:
    """Ask every node who it is; clients report their own ids (node ids are not stable).

    Returns the clients in config order and their fingerprints ([K, d]; empty when not asked).
    A node that claims a client another node already holds is refused (the first keeps it);
    a node whose account disagrees with the config is refused. Every client of the config
    must be found.
    """
    nodes = link.wait_for_nodes()
    what = "identify + fingerprint" if fingerprints else "identify"
    link.progress.note(
        f"asking {len(nodes)} client(s) who they are"
        + (" and for their fingerprints" if fingerprints else "")
        + " (each client process loads the base model first)"
    )
    found, problems = identify(link, cfg, nodes, fingerprints, what)
    expected = expected_identity(cfg)
    chosen: dict[str, Identity] = {}
    idle = 0
    for node in sorted(found):
        identity = found[node]
        if not identity.client_id:
            idle += 1
            continue
        if identity.client_id not in expected:
            link.progress.note(f"node {node} claims unknown client {identity.client_id!r}; ignored")
            continue
        if identity.client_id in chosen:
            link.refuse(identity, chosen[identity.client_id].node_id)
            continue
        problem = identity_problem(identity, expected[identity.client_id])
        if problem:
            raise FederationError(f"client {identity.client_id} (node {node}) {problem}")
        chosen[identity.client_id] = identity
    missing = [c for c in cfg.client_ids if c not in chosen]
    if missing:
        why = "; ".join(o.reason for o in problems.values())
        raise FederationError(
            f"no node answered as client(s) {', '.join(missing)}" + (f" ({why})" if why else "")
        )
    if idle:
        link.progress.note(f"{idle} node(s) hold no client of this config (partition-id too large)")
    clients = []
    for client_id in cfg.client_ids:
        identity = chosen[client_id]
        assert identity.init is not None
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
    link.inits = share_init(clients)
    try:
        rules.resolve_pull_space(cfg.server.pull_space, [c.rank for c in clients])
    except ValueError as err:
        raise ConfigError(str(err)) from err
    vectors = np.zeros((0, 0))
    if fingerprints:
        absent = [c for c in cfg.client_ids if chosen[c].fingerprint is None]
        if absent:
            raise FederationError(f"no fingerprint from {', '.join(absent)}")
        vectors = np.stack([chosen[c].fingerprint for c in cfg.client_ids])  # type: ignore[misc]
    return clients, vectors


def rejoin(link: Link, state: ServerState, lost: set[int]) -> None:
    """Let a client whose node is gone come back on a new node (a restarted SuperNode).

    Nodes the server has not seen before are asked who they are. A node claiming a client is
    adopted when that client's node has left the federation or failed its last exchange
    (``lost``), after the same checks as at the start (config, shared initialisation);
    otherwise it is refused as a duplicate and the run goes on.
    """
    connected = set(link.grid.get_node_ids())
    fresh = sorted(connected - link.seen)
    if fresh:
        found, _ = identify(link, state.cfg, fresh, False, "identify newcomers")
        link.seen.update(fresh)
        for node, identity in found.items():
            if identity.client_id:
                link.claims[node] = identity
    expected = expected_identity(state.cfg)
    for node, identity in sorted(link.claims.items()):
        if node not in connected or identity.client_id not in expected:
            continue
        index = state.index(identity.client_id)
        client = state.clients[index]
        if client.node_id == node:
            continue
        if client.node_id in connected and index not in lost:
            link.refuse(identity, client.node_id)
            continue
        problem = identity_problem(identity, expected[client.client_id])
        init = link.inits.get(client.rank, {})
        if (
            problem is None
            and identity.init is not None
            and (
                set(identity.init) != set(init)
                or any(not np.array_equal(v, init[k]) for k, v in identity.init.items())
            )
        ):
            problem = "reports another LoRA initialisation (seed or base model differ)"
        if problem:
            link.progress.note(
                f"node {node} claims client {client.client_id} but {problem}; ignored"
            )
            continue
        link.progress.note(
            f"client {client.client_id} rejoined on node {node} (was node {client.node_id})"
        )
        link.names.pop(client.node_id, None)
        link.names[node] = client.client_id
        client.node_id = node
        del link.claims[node]


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


def share_init(clients: list[ClientState]) -> dict[int, Adapter]:
    """Give every client of a rank the same arrays: the first one's copy of the shared LoRA
    init, which :func:`check_shared_init` found equal to each of theirs. The server then
    holds one init per rank instead of one per client until a client's adapter is replaced
    (docs/server_memory.md); no rule changes an adapter in place, each makes new arrays.
    Returns the init of each rank."""
    inits: dict[int, Adapter] = {}
    for client in clients:
        client.adapter = inits.setdefault(client.rank, client.adapter)
    return inits


def graph_from_fingerprints(
    cfg: Config, vectors: np.ndarray, progress: Progress, after: int
) -> TaskGraph:
    try:
        graph = fingerprint_graph(cfg, vectors)
    except ValueError as err:
        raise FederationError(f"task graph from fingerprints failed: {err}") from err
    info = graph.info
    progress.note(
        f"task graph from fingerprints after round {after}: clusters {graph.clusters}"
        + (f", k={info['k']} (silhouette {info['silhouette']:.3f})" if "k" in info else "")
        + f", ARI vs declared tasks {info['ari_vs_declared_tasks']:.3f}"
    )
    return graph


def _exchange(
    link: Link, state: ServerState, instructions: list[Instruction], what: str
) -> tuple[dict[int, Reply], dict[int, int], dict[int, Outcome]]:
    """Send every instruction; return, by client index, the usable replies, the bytes sent,
    and what went wrong with the others.

    A reply is a failure when its evaluation is not finite, and its trained adapter is refused
    (the rest of the reply is kept) when :func:`update_problem` finds fault with it or its
    train loss is not finite (:func:`train_loss_problem`).
    """
    messages, sent, index_of = [], {}, {}
    for instruction in instructions:
        view = view_of(state.cfg, instruction.partition)
        message, size = codec.encode_instruction(instruction, view)
        messages.append(message)
        index = state.index(instruction.client_id)
        sent[index] = size
        index_of[instruction.node_id] = index
    raw, problems = link.exchange(
        messages, what, state.cfg.federation.round_timeout, "federation.round_timeout"
    )
    outcomes = {index_of[node]: outcome for node, outcome in problems.items()}
    replies: dict[int, Reply] = {}
    for node, message in raw.items():
        index = index_of[node]
        client = state.clients[index]
        try:
            reply = codec.decode_reply(message)
        except (KeyError, TypeError, ValueError) as err:
            outcomes[index] = Outcome(FAILED, f"client {client.client_id}: unreadable reply: {err}")
            continue
        if reply.client_id != client.client_id:
            outcomes[index] = Outcome(
                REJECTED,
                f"node {node} answered as {reply.client_id!r} for client {client.client_id}",
            )
            continue
        if reply.evaluation is not None:
            bad = {k: v for k, v in reply.evaluation.as_dict().items() if not np.isfinite(v)}
            if bad:
                outcomes[index] = Outcome(
                    FAILED, f"client {client.client_id}: non-finite evaluation {bad}"
                )
                continue
        if reply.trained is not None:
            problem = update_problem(
                client.adapter, reply.trained, client.rank
            ) or train_loss_problem(reply.train_loss)
            if problem:
                outcomes[index] = Outcome(REJECTED, f"client {client.client_id} {problem}")
                reply.trained = None
        replies[index] = reply
    return replies, sent, outcomes


def check_replies(
    state: ServerState, instructions: list[Instruction], outcomes: dict[int, Outcome], what: str
) -> None:
    """Stop the run when fewer than ``federation.min_replies`` of the contacted clients gave a
    usable reply; the last checkpoint stays as it is."""
    contacted = [state.index(i.client_id) for i in instructions]
    if not contacted:
        return
    usable = [i for i in contacted if i not in outcomes]
    needed = math.ceil(state.cfg.federation.min_replies * len(contacted))
    if len(usable) < needed:
        reasons = "; ".join(outcomes[i].reason for i in contacted if i in outcomes)
        raise FederationError(
            f"{what}: only {len(usable)} of {len(contacted)} clients replied usably, "
            f"federation.min_replies needs {needed}: {reasons}. The run stops here; "
            "its last checkpoint is intact (continue with mira run --resume once the "
            "clients are back)"
        )


def describe_devices(cfg: Config, out_dir: Path, progress: Progress) -> None:
    """Say, in the run's first lines and in run.json, where the clients train (``model.device``
    and ``model.dtype`` resolved on this machine; the server itself never touches a GPU)."""
    from mira.client.devices import resolve_device  # asks NVML, never creates a CUDA context

    device, dtype = resolve_device(cfg.model)
    progress.note(f"clients train on {device} with {dtype} base weights (LoRA in float32)")
    update_run_info(out_dir, {"device": device, "dtype": dtype, "model": cfg.model.name})


def record_privacy(state: ServerState, out_dir: Path, progress: Progress) -> None:
    """With ``privacy.clip_norm`` > 0: every client's epsilon over the run, for privacy.delta,
    in run.json (the report shows it) and in the last line of the run."""
    privacy = state.cfg.privacy
    if privacy.clip_norm <= 0:
        return
    spent = {c.client_id: state.epsilon(i) for i, c in enumerate(state.clients)}
    worst = max(spent.values())
    record = {
        "clip_norm": privacy.clip_norm,
        "noise_multiplier": privacy.noise_multiplier,
        "delta": privacy.delta,
        "epsilon_max": worst,
        "epsilon": spent,
        "accountant": "dp-accounting, Gaussian mechanism composed over each "
        "client's rounds (mira.core.accounting.client_epsilon)",
    }
    settings = f"clip {privacy.clip_norm:g}, noise multiplier {privacy.noise_multiplier:g}"
    if math.isfinite(worst):
        note = f"epsilon <= {worst:.3g} for delta = {privacy.delta:g} per client ({settings})"
    else:  # JSON has no infinity: null, and the reason beside it
        unbounded = [client for client, epsilon in spent.items() if not math.isfinite(epsilon)]
        record["epsilon_max"] = None
        record["epsilon"] = {k: v if math.isfinite(v) else None for k, v in spent.items()}
        note = (
            f"no guarantee: epsilon is infinite (null in {RunLayout(out_dir).run_info.name}) for "
            f"{', '.join(unbounded)} ({settings}; updates were clipped but not noised)"
        )
        record["note"] = note
    update_run_info(out_dir, {"privacy": record})
    progress.note(f"differential privacy: {note}")


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


def _write_closed(
    writer: RunWriter, state: ServerState, closed: ClosedRound, progress: Progress
) -> None:
    for client, adapter in zip(state.clients, closed.adapters, strict=True):
        writer.write_adapter(client.client_id, adapter, client.rank)
    aggregate = writer.append_round(closed.seconds, closed.round, closed.rows)
    failed = sum(r.status != OK for r in closed.rows)
    progress.round_done(
        closed.round,
        aggregate.train_loss_mean,
        aggregate.personalised_eval_loss_mean,
        aggregate.personalised_eval_loss_worst,
        failed,
    )


def run_federation(
    grid: Grid,
    cfg: Config,
    out_dir: Path,
    base_source: str,
    resume: bool = False,
    progress: Progress | None = None,
) -> None:
    """The ServerApp body shared by ``mira run`` and ``flwr run``.

    With ``resume`` the run continues after the last checkpointed exchange in ``out_dir``.
    A client that fails, times out or sends an update the server refuses costs only its own
    round (docs/design.md, "Faults"): it keeps its adapter and is asked again next round.
    """
    checkpoint = read_checkpoint(out_dir) if resume else None
    if resume and checkpoint is None:
        raise FederationError(f"{out_dir} has no checkpoint to resume from")
    progress = progress or Progress()
    layout = RunLayout(out_dir)
    if checkpoint is not None and checkpoint.config is not None:
        where = f"the config {layout.checkpoint} was computed with"
        check_resumable(run_config_from_dict(checkpoint.config), cfg, where)
    elif checkpoint is not None:
        progress.note(
            f"{layout.checkpoint} was written before mira recorded the run's config in it: "
            f"{layout.config.name} cannot be checked against it"
        )
    try:
        from mira.client.sharing import PeftAdapterWriter  # peft and torch: only now

        adapters = PeftAdapterWriter(cfg.model.name, cfg.lora, base_source)
        with RunWriter(out_dir, cfg, adapters) as writer:  # holds the run directory's lock
            _serve(grid, cfg, out_dir, writer, checkpoint, progress)
    except OSError as err:  # a full disk ends the run in one line: what stopped, how to go on
        full = disk_full_error(out_dir, err)
        if full is None:
            raise
        raise full from None


def _serve(
    grid: Grid,
    cfg: Config,
    out_dir: Path,
    writer: RunWriter,
    checkpoint: Checkpoint | None,
    progress: Progress,
) -> None:
    progress.detail(
        f"server: method={cfg.server.method} step={cfg.server.step} graph={cfg.server.graph} "
        f"clients={cfg.num_clients} rounds={cfg.federation.rounds} "
        f"fraction={cfg.federation.fraction}"
    )
    writer.write_config()
    describe_devices(cfg, out_dir, progress)
    link = Link(grid, cfg, progress, client_table(cfg))
    fingerprints = needs_fingerprints(cfg) and checkpoint is None
    clients, vectors = discover(link, cfg, fingerprints)
    graph = static_graph(cfg)
    if fingerprints:
        graph = graph_from_fingerprints(cfg, vectors, progress, 0)
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
        progress.note(
            f"resuming after round {state.trained_round} from {RunLayout(out_dir).checkpoint}"
        )
        first = state.trained_round + 1
    else:
        writer.write_graph(state.clients, graph, cfg.server.step, built_after=0)
    rounds = cfg.federation.rounds
    progress.start_run(rounds, first)
    lost: set[int] = set()
    for server_round in range(first, rounds + 2):
        final = server_round > rounds
        if final and not state.open_rows:
            break
        started = time.monotonic()
        rejoin(link, state, lost)
        instructions = state.plan(server_round)
        what = "final evaluation" if final else f"round {server_round}"
        replies, sent, outcomes = _exchange(link, state, instructions, what)
        again = state.resend(replies)  # to clients that no longer hold what a message left out
        if again:
            more, more_sent, more_outcomes = _exchange(link, state, again, what)
            replies.update(more)
            outcomes.update(more_outcomes)
            sent = {i: size + more_sent.get(i, 0) for i, size in sent.items()}
        check_replies(state, instructions, outcomes, what)
        try:
            closed = state.close_round(
                replies, sent, time.monotonic() - started if final else 0.0, outcomes
            )
        except ServerStateError as err:
            raise FederationError(f"{what}: {err}") from err
        outcomes.update(state.screen_norms(replies))
        check_replies(state, instructions, outcomes, what)
        for _, outcome in sorted(outcomes.items()):
            progress.note(f"  {what}: {outcome.status}: {outcome.reason}; it keeps its adapter")
        lost = {i for i, o in outcomes.items() if o.status in (FAILED, TIMEOUT)}
        if closed is not None:
            _write_closed(writer, state, closed, progress)
        if final:
            _checkpoint(writer, state)
            record_privacy(state, out_dir, progress)
            break
        if state.refresh_due(server_round):
            fresh = [replies[i].fingerprint if i in replies else None for i in range(len(clients))]
            if any(v is None for v in fresh):
                progress.note(
                    f"  {what}: a client sent no fingerprint; the task graph is kept as it was"
                )
            else:
                vectors = np.stack(fresh)  # type: ignore[arg-type]
                graph = graph_from_fingerprints(cfg, vectors, progress, server_round - 1)
                state.rebuild_graph(graph)
                writer.write_graph(state.clients, graph, cfg.server.step, server_round - 1)
        state.apply_rule(server_round, replies, sent, time.monotonic() - started, outcomes)
        _checkpoint(writer, state)
