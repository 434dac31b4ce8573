"""MiraStrategy: a Flower Message-API strategy that keeps one adapter per client.

Implements MIRA (Elbakary, Ben Issaid, ElBatt, Seddik, Bennis, "MIRA: A Method of Federated
Multi-Task Learning for Large Language Models", IEEE Networking Letters 7(3), 2025) and the
baselines of DESIGN.md in one harness. Unlike FedAvg-style strategies there is no global
model: the server stores every client's adapter, sends each sampled client ITS OWN adapter
(one message per node), takes the trained adapters back and applies the server rule of
:mod:`mira.rules` to a snapshot of all stored adapters.

Parameters (all from :class:`mira.config.Config`):
    server.method ("mira"): mira | fedit | cluster-fedavg | cluster-merge | local.
    server.step (0.1): gamma = eta * lambda; gamma * max degree must stay below 1.
    server.graph ("tasks"): tasks | full | a K x K matrix file.
    server.pull_space ("auto"): factor | product | auto.
    federation.rounds (3), federation.fraction (1.0), federation.seed (0),
    federation.timeout (3600.0).

Each round: sample clients, ``train`` messages with their own adapters, apply the rule,
then ``evaluate`` messages so every client reports the eval loss of the personalised adapter
it now holds; metrics and adapters are written after every round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from mira import rules
from mira.config import Config, ConfigError
from mira.federation.client_app import CONFIG_KEY, from_record, to_record
from mira.metrics import HIGHER_IS_BETTER as TASK_METRICS
from mira.model import Adapter, lora_scale
from mira.outputs import (
    Checkpoint,
    RunWriter,
    read_checkpoint,
    truncate_metrics,
    write_checkpoint,
)
from mira.task_graph import TaskGraph, fingerprint_graph, needs_fingerprints, static_graph


class FederationError(RuntimeError):
    """A client failed, sent something unusable, or did not answer in time."""


def sample_clients(num_clients: int, fraction: float, seed: int, server_round: int) -> list[int]:
    """Clients trained in a round: a seeded uniform sample without replacement."""
    count = max(1, round(fraction * num_clients))
    if count >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))


@dataclass
class ClientState:
    client_id: str
    task: str
    rank: int
    node_id: int
    num_train: int
    adapter: Adapter


def _nbytes(record: ArrayRecord) -> int:
    return int(sum(len(a.data) for a in record.values()))


class MiraStrategy(Strategy):
    """Per-client state, one message per node, the server rule on a snapshot."""

    def __init__(
        self,
        cfg: Config,
        writer: RunWriter,
        base_source: str,
        log: Callable[[str], None] = print,
        resume_from: Checkpoint | None = None,
    ):
        self.cfg = cfg
        self.writer = writer
        self.base_source = base_source
        self.log = log
        self.resume_from = resume_from
        self.graph = static_graph(cfg)
        self.clients: list[ClientState] = []
        self._rows: dict[int, dict[str, Any]] = {}

    # ----------------------------------------------------------------- messages
    def _config_record(self, server_round: int, client: ClientState | None) -> ConfigRecord:
        record = ConfigRecord({CONFIG_KEY: self.cfg.to_json(), "round": server_round})
        if client is not None:
            record["client"] = client.client_id
        return record

    def _message(self, kind: str, server_round: int, client: ClientState) -> Message:
        content = RecordDict(
            {
                "config": self._config_record(server_round, client),
                "adapter": to_record(client.adapter),
            }
        )
        return Message(content, dst_node_id=client.node_id, message_type=kind)

    def _exchange(self, grid: Grid, messages: list[Message], what: str) -> list[Message]:
        """Push messages, pull replies as they come (showing progress), fail on errors."""
        ids = [i for i in grid.push_messages(messages) if i]
        if len(ids) != len(messages):
            raise FederationError(f"{what}: only {len(ids)} of {len(messages)} messages sent")
        by_node = {m.metadata.dst_node_id: m for m in messages}
        pending = set(ids)
        replies: list[Message] = []
        deadline = time.monotonic() + self.cfg.federation.timeout
        while pending:
            for reply in grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    who = self._who(reply.metadata.src_node_id)
                    raise FederationError(f"{what}: {who} failed: {reply.error.reason}")
                replies.append(reply)
                self.log(f"  {what}: {len(replies)}/{len(messages)} clients done")
            if pending:
                if time.monotonic() > deadline:
                    missing = [self._who(n) for n in by_node if n not in _sources(replies)]
                    raise FederationError(
                        f"{what}: no reply within federation.timeout = "
                        f"{self.cfg.federation.timeout}s from {', '.join(missing)}"
                    )
                time.sleep(0.1)
        return replies

    def _who(self, node_id: int) -> str:
        for c in self.clients:
            if c.node_id == node_id:
                return f"client {c.client_id} (node {node_id})"
        return f"node {node_id}"

    def _client_of(self, reply: Message) -> int:
        client_id = str(reply.content.config_records["identity"]["client"])
        for index, c in enumerate(self.clients):
            if c.client_id == client_id:
                if c.node_id != reply.metadata.src_node_id:
                    raise FederationError(
                        f"reply for {client_id} came from node {reply.metadata.src_node_id}, "
                        f"expected node {c.node_id}"
                    )
                return index
        raise FederationError(f"reply from unknown client {client_id!r}")

    # ------------------------------------------------------------------ set-up
    @property
    def task_graph(self) -> TaskGraph:
        if self.graph is None:
            raise FederationError("the task graph is built after the clients' fingerprints")
        return self.graph

    def _write_graph(self, server_round: int) -> None:
        graph = self.task_graph
        self.writer.write_graph(
            [c.client_id for c in self.clients],
            [c.task for c in self.clients],
            graph.clusters,
            graph.adjacency,
            graph.source,
            {**graph.info, "built_after_round": server_round},
        )

    def _fingerprint_graph(self, replies: list[Message], server_round: int) -> None:
        """Rebuild the graph from the fingerprints in ``replies`` (one per client)."""
        vectors: dict[int, np.ndarray] = {}
        for reply in replies:
            if "fingerprint" not in reply.content.array_records:
                continue  # an idle node
            record = reply.content.array_records["fingerprint"]
            vectors[self._client_of(reply)] = record.to_numpy_ndarrays()[0]
        missing = [c.client_id for i, c in enumerate(self.clients) if i not in vectors]
        if missing:
            raise FederationError(f"no fingerprint from {', '.join(missing)}")
        fingerprints = np.stack([vectors[i] for i in range(len(self.clients))])
        try:
            self.graph = fingerprint_graph(self.cfg, fingerprints)
        except ValueError as err:
            raise FederationError(f"task graph from fingerprints failed: {err}") from err
        info = self.graph.info
        self.log(
            f"task graph from fingerprints after round {server_round}: "
            f"clusters {self.graph.clusters}"
            + (f", k={info['k']} (silhouette {info['silhouette']:.3f})" if "k" in info else "")
            + f", ARI vs declared tasks {info['ari_vs_declared_tasks']:.3f}"
        )

    def refresh_graph(self, grid: Grid, server_round: int) -> None:
        """Ask every client for a fresh fingerprint of its current adapter; rebuild the graph."""
        messages = []
        for client in self.clients:
            message = self._message(MessageType.QUERY, server_round, client)
            message.content.config_records["config"]["fingerprint"] = True
            messages.append(message)
        replies = self._exchange(grid, messages, f"round {server_round} fingerprints")
        self._fingerprint_graph(replies, server_round)
        self._write_graph(server_round)

    def discover(self, grid: Grid) -> None:
        """Ask every node who it is; clients report their own ids (node ids are not stable)."""
        expected = self.cfg.num_clients
        deadline = time.monotonic() + self.cfg.federation.timeout
        node_ids = list(grid.get_node_ids())
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
            node_ids = list(grid.get_node_ids())
        config = self._config_record(0, None)
        config["fingerprint"] = needs_fingerprints(self.cfg) and self.resume_from is None
        messages = [
            Message(
                RecordDict({"config": config}), dst_node_id=node, message_type=MessageType.QUERY
            )
            for node in node_ids
        ]
        what = "identify + fingerprint" if config["fingerprint"] else "identify"
        replies = self._exchange(grid, messages, what)
        found: dict[str, ClientState] = {}
        idle = 0
        for reply in replies:
            identity = reply.content.config_records["identity"]
            client_id = str(identity["client"])
            if not client_id:
                idle += 1
                continue
            if client_id in found:
                raise FederationError(
                    f"two nodes claim to be client {client_id}: check each SuperNode's partition-id"
                )
            found[client_id] = ClientState(
                client_id=client_id,
                task=str(identity["task"]),
                rank=int(identity["rank"]),  # type: ignore[arg-type]
                node_id=reply.metadata.src_node_id,
                num_train=int(identity["num_train"]),  # type: ignore[arg-type]
                adapter=from_record(reply.content.array_records["init"]),
            )
        missing = [c for c in self.cfg.client_ids if c not in found]
        if missing:
            raise FederationError(f"no node answered as client(s) {', '.join(missing)}")
        if idle:
            self.log(f"{idle} node(s) hold no client of this config (partition-id too large)")
        self.clients = [found[c] for c in self.cfg.client_ids]
        self._check_shared_init()
        if needs_fingerprints(self.cfg) and self.resume_from is None:
            self._fingerprint_graph(replies, 0)
        try:
            rules.resolve_pull_space(self.cfg.server.pull_space, [c.rank for c in self.clients])
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def _check_shared_init(self) -> None:
        """All clients of one rank must start from the same LoRA init (same seed)."""
        first: dict[int, ClientState] = {}
        for c in self.clients:
            ref = first.setdefault(c.rank, c)
            for key, value in c.adapter.items():
                if not np.array_equal(value, ref.adapter[key]):
                    raise FederationError(
                        f"clients {ref.client_id} and {c.client_id} report different LoRA "
                        f"initialisations ({key}); every client must use federation.seed = "
                        f"{self.cfg.federation.seed} and the same base model"
                    )

    # ------------------------------------------------------------------ rounds
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node, each carrying that client's OWN adapter."""
        sampled = sample_clients(
            len(self.clients), self.cfg.federation.fraction, self.cfg.federation.seed, server_round
        )
        return [self._message(MessageType.TRAIN, server_round, self.clients[i]) for i in sampled]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Store the trained adapters, then apply the server rule to all clients at once."""
        replies = list(replies)
        trained: dict[int, Adapter] = {}
        for reply in replies:
            index = self._client_of(reply)
            adapter = from_record(reply.content.array_records["adapter"])
            self._check_adapter(index, adapter, server_round)
            trained[index] = adapter
            metrics = reply.content.metric_records["metrics"]
            row = self._rows[index]
            row["train_loss"] = float(metrics["train_loss"])  # type: ignore[arg-type]
            row["bytes_up"] += _nbytes(reply.content.array_records["adapter"])
        snapshot = [trained.get(i, c.adapter) for i, c in enumerate(self.clients)]
        active = [i in trained for i in range(len(self.clients))]
        try:
            updated = rules.apply_rule(
                self.cfg.server.method,
                snapshot,
                adjacency=self.task_graph.adjacency,
                step=self.cfg.server.step,
                clusters=self.task_graph.clusters,
                weights=[c.num_train for c in self.clients],
                active=active,
                ranks=[c.rank for c in self.clients],
                scales=[lora_scale(self.cfg.lora, c.rank) for c in self.clients],
                pull_space=self.cfg.server.pull_space,
            )
        except ValueError as err:
            raise FederationError(f"round {server_round}: server rule failed: {err}") from err
        for client, adapter in zip(self.clients, updated, strict=True):
            client.adapter = adapter
        losses = [self._rows[i]["train_loss"] for i in trained]
        return None, MetricRecord({"train_loss": float(np.mean(losses))})

    def _check_adapter(self, index: int, adapter: Adapter, server_round: int) -> None:
        client = self.clients[index]
        if set(adapter) != set(client.adapter):
            raise FederationError(
                f"round {server_round}: client {client.client_id} returned an adapter with "
                "different tensors than it was sent"
            )
        for key, value in adapter.items():
            if value.shape != client.adapter[key].shape:
                raise FederationError(
                    f"round {server_round}: client {client.client_id} returned {key} with "
                    f"shape {value.shape}, expected {client.adapter[key].shape}"
                )
            if not np.all(np.isfinite(value)):
                raise FederationError(
                    f"round {server_round}: client {client.client_id} returned NaN or infinite "
                    f"values in {key}; the run stops here and keeps what rounds 1.."
                    f"{server_round - 1} wrote"
                )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every client evaluates the personalised adapter it holds after the server rule."""
        messages = [self._message(MessageType.EVALUATE, server_round, c) for c in self.clients]
        for message in messages:
            message.content.config_records["config"]["task_metrics"] = self.measures_task_metrics(
                server_round
            )
        return messages

    def measures_task_metrics(self, server_round: int) -> bool:
        """Task metrics every ``federation.metrics_every`` rounds and after the last round."""
        federation = self.cfg.federation
        return server_round % federation.metrics_every == 0 or server_round == federation.rounds

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        losses = []
        for reply in replies:
            index = self._client_of(reply)
            record = reply.content.metric_records["metrics"]
            loss = float(record["eval_loss"])  # type: ignore[arg-type]
            self._rows[index]["eval_loss"] = loss
            self._rows[index]["peak_memory_mb"] = float(record["peak_memory_mb"])  # type: ignore[arg-type]
            for name in TASK_METRICS:
                if name in record:
                    self._rows[index][name] = float(record[name])  # type: ignore[arg-type]
            losses.append(loss)
        return MetricRecord({"personalised_eval_loss_mean": float(np.mean(losses))})

    def summary(self) -> None:
        self.log(
            f"MiraStrategy: method={self.cfg.server.method} step={self.cfg.server.step} "
            f"graph={self.cfg.server.graph} clients={self.cfg.num_clients} "
            f"rounds={self.cfg.federation.rounds} fraction={self.cfg.federation.fraction}"
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 0,
        timeout: float = 0.0,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
    ) -> Result:
        """Run the whole federation. There is no global ``initial_arrays``: clients report
        the shared LoRA init, and each keeps its own adapter from then on."""
        rounds = num_rounds or self.cfg.federation.rounds
        self.summary()
        self.writer.write_config()
        self.discover(grid)
        first_round = 1
        if self.resume_from is not None:
            first_round = self._restore(self.resume_from)
        else:
            self._write_graph(0)
        result = Result()
        for server_round in range(first_round, rounds + 1):
            started = time.monotonic()
            self.log(f"[round {server_round}/{rounds}]")
            refresh = self.cfg.server.graph_refresh
            if (
                needs_fingerprints(self.cfg)
                and refresh
                and server_round > 1
                and (server_round - 1) % refresh == 0
            ):
                self.refresh_graph(grid, server_round - 1)
            self._rows = {
                i: {
                    "round": server_round,
                    "client": c.client_id,
                    "task": c.task,
                    "method": self.cfg.server.method,
                    "rank": c.rank,
                    "sampled": False,
                    "train_loss": None,
                    "eval_loss": None,
                    "bytes_up": 0,
                    "bytes_down": 0,
                }
                for i, c in enumerate(self.clients)
            }
            empty_arrays, empty_config = ArrayRecord(), ConfigRecord()
            train_messages = list(
                self.configure_train(server_round, empty_arrays, empty_config, grid)
            )
            for message in train_messages:
                index = self._index_of_node(message.metadata.dst_node_id)
                self._rows[index]["sampled"] = True
                self._rows[index]["bytes_down"] += _nbytes(message.content.array_records["adapter"])
            replies = self._exchange(grid, train_messages, f"round {server_round} train")
            _, train_metrics = self.aggregate_train(server_round, replies)
            eval_messages = list(
                self.configure_evaluate(server_round, empty_arrays, empty_config, grid)
            )
            for message in eval_messages:
                index = self._index_of_node(message.metadata.dst_node_id)
                self._rows[index]["bytes_down"] += _nbytes(message.content.array_records["adapter"])
            replies = self._exchange(grid, eval_messages, f"round {server_round} evaluate")
            eval_metrics = self.aggregate_evaluate(server_round, replies)
            for client in self.clients:
                self.writer.write_adapter(
                    client.client_id, client.adapter, client.rank, self.base_source
                )
            aggregate = self.writer.append_round(
                time.monotonic() - started,
                server_round,
                [self._rows[i] for i in sorted(self._rows)],
            )
            self._checkpoint(server_round)
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = eval_metrics
            self.log(
                f"[round {server_round}/{rounds}] done in {time.monotonic() - started:.1f}s: "
                f"train loss {aggregate['train_loss_mean']:.4f}, personalised eval loss "
                f"mean {aggregate['personalised_eval_loss_mean']:.4f} "
                f"worst {aggregate['personalised_eval_loss_worst']:.4f}"
            )
        return result

    def _checkpoint(self, server_round: int) -> None:
        graph = self.task_graph
        write_checkpoint(
            self.writer.out,
            Checkpoint(
                round=server_round,
                client_ids=[c.client_id for c in self.clients],
                ranks=[c.rank for c in self.clients],
                adapters=[c.adapter for c in self.clients],
                adjacency=graph.adjacency,
                clusters=graph.clusters,
                graph_source=graph.source,
                graph_info=graph.info,
            ),
        )

    def _restore(self, checkpoint: Checkpoint) -> int:
        """Put the checkpoint's adapters and graph in place; return the next round."""
        ids = [c.client_id for c in self.clients]
        ranks = [c.rank for c in self.clients]
        if checkpoint.client_ids != ids or checkpoint.ranks != ranks:
            raise FederationError(
                f"the checkpoint holds clients {checkpoint.client_ids} with ranks "
                f"{checkpoint.ranks}, but the connected clients are {ids} with ranks {ranks}"
            )
        for client, adapter in zip(self.clients, checkpoint.adapters, strict=True):
            if {k: v.shape for k, v in adapter.items()} != {
                k: v.shape for k, v in client.adapter.items()
            }:
                raise FederationError(
                    f"the checkpointed adapter of {client.client_id} does not match its layout"
                )
            client.adapter = adapter
        self.graph = TaskGraph(
            checkpoint.adjacency,
            checkpoint.clusters,
            checkpoint.graph_source,
            checkpoint.graph_info,
        )
        truncate_metrics(self.writer.out, checkpoint.round)
        self.log(f"resuming after round {checkpoint.round} from {self.writer.out / 'checkpoint'}")
        return checkpoint.round + 1

    def _index_of_node(self, node_id: int) -> int:
        for index, c in enumerate(self.clients):
            if c.node_id == node_id:
                return index
        raise FederationError(f"no client on node {node_id}")


def _sources(replies: Sequence[Message]) -> set[int]:
    return {r.metadata.src_node_id for r in replies}


def run_federation(
    grid: Grid, cfg: Config, out_dir: Path, base_source: str, resume: bool = False
) -> Result:
    """The ServerApp body shared by ``mira run`` and ``flwr run``.

    With ``resume`` the run continues after the last checkpointed round in ``out_dir``.
    """
    checkpoint = read_checkpoint(out_dir) if resume else None
    if resume and checkpoint is None:
        raise FederationError(f"{out_dir} has no checkpoint to resume from")
    strategy = MiraStrategy(cfg, RunWriter(out_dir, cfg), base_source, resume_from=checkpoint)
    return strategy.start(grid)


__all__ = ["FederationError", "MiraStrategy", "run_federation"]
