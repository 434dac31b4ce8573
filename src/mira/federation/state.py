"""The server's state, without Flower: every client's stored adapter, the task graph, who each
exchange contacts and with what, the server rule, and the metric rows each round writes.

One exchange per client per round (docs/design.md, "Engine"). Exchange r sends every client
that trains in round r, and every client whose adapter changed in round r - 1 and is not yet
evaluated, ONE message: the adapter it holds after round r - 1's rule (under
``server.step = "auto"``, its neighbours' mean, to choose its mix with its own trained adapter,
which its node keeps: the message leaves out an adapter the node said it holds). The client
first evaluates that personalised adapter (closing round r - 1's rows), then trains round r.
After the last round one more exchange evaluates, and nothing else. So a round's rows are
complete, and written, one exchange after its training; each reported eval loss is still that
of the adapter the client held after that round's rule.

Everything here is plain Python and numpy, so the round logic is tested without Flower
(tests/unit/federation/test_state.py); :mod:`mira.federation.server` moves the instructions and
replies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mira.config import RULES, TASK_METRICS, Config, LearnedMix
from mira.core import rules
from mira.core.adapters import Adapter, lora_scale
from mira.core.mixing import mix_weights
from mira.core.rules import ValidationSums
from mira.errors import MiraError
from mira.federation.messages import Evaluation, Instruction, Reply, adapter_digest, task_of
from mira.graph.build import TaskGraph
from mira.results.schema import OK, REJECTED, ClientRow, client_row


class ServerStateError(MiraError, ValueError):
    """The server state cannot take what it was given (a bad checkpoint, an unknown client)."""


def sample_clients(num_clients: int, fraction: float, seed: int, server_round: int) -> list[int]:
    """Clients trained in a round: a seeded uniform sample without replacement."""
    count = max(1, round(fraction * num_clients))
    if count >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))


@dataclass(frozen=True)
class Outcome:
    """A client's exchange that went wrong: its status and why, in words naming the client."""

    status: str
    reason: str


def update_problem(sent: Adapter, trained: Adapter, rank: int) -> str | None:
    """Why the server refuses a trained adapter, or None when it is usable.

    Refused: other tensors than it was sent, other shapes or dtypes, a LoRA rank other than
    the client's (its config's), or any non-finite value.
    """
    if set(trained) != set(sent):
        missing = sorted(set(sent) - set(trained))[:2]
        extra = sorted(set(trained) - set(sent))[:2]
        return f"returned other tensors than it was sent (missing {missing}, extra {extra})"
    for key, value in trained.items():
        if value.shape != sent[key].shape:
            return f"returned {key} with shape {value.shape}, expected {sent[key].shape}"
        if value.dtype != sent[key].dtype:
            return f"returned {key} as {value.dtype}, expected {sent[key].dtype}"
        if key.endswith(".lora_A.weight") and value.shape[0] != rank:
            return f"returned rank {value.shape[0]} in {key}, its config gives rank {rank}"
        if not np.all(np.isfinite(value)):
            return f"returned NaN or infinite values in {key}"
    return None


def train_loss_problem(train_loss: float | None) -> str | None:
    """Why the server refuses a trained adapter whose reported training loss is NaN or
    infinite (training diverged, or the client lies about it), or None. A refused update never
    reaches the rule, and its loss never reaches the round's mean."""
    if train_loss is not None and not math.isfinite(train_loss):
        return f"reported a non-finite train_loss ({train_loss})"
    return None


def norm_outliers(norms: dict[int, float], history: list[float], ratio: float) -> dict[int, float]:
    """Updates whose norm exceeds ``ratio`` times a robust reference: {index: reference}.

    The reference is the median of this exchange's update norms when there are at least three,
    else the median of these together with the last accepted ones (``history``), so that one
    huge update among few cannot drag the reference up with it.
    """
    pool = list(norms.values())
    if len(pool) < 3:
        pool += history
    if not pool:
        return {}
    reference = float(np.median(pool))
    if reference <= 0.0:
        return {}
    return {i: reference for i, norm in norms.items() if norm > ratio * reference}


def update_norm(start: Adapter, trained: Adapter) -> float:
    """||trained - start|| over all tensors (float64)."""
    return float(
        np.sqrt(
            sum(float(np.sum(np.square(trained[k].astype(np.float64) - start[k]))) for k in trained)
        )
    )


@dataclass
class ClientState:
    """What the server keeps of one client between exchanges."""

    client_id: str
    task: str
    rank: int
    node_id: int
    num_train: int
    adapter: Adapter  # after the last rule; under auto, its own trained adapter until it chooses
    mean: Adapter | None = None  # auto: the neighbours' mean it has yet to choose its mix with
    candidates: list[float] = field(default_factory=list)  # auto: mix weights it tries
    prior_alpha: float | None = None  # auto: the mix weight it applied when it last chose
    anchor: float = 0.0  # auto: its equal-share point, which a tolerant choice leans toward
    evaluation: Evaluation | None = None  # of ``adapter``, once known
    evaluated_task_metrics: bool = False  # whether ``evaluation`` includes the task metrics
    held: tuple[int, str] | None = None  # auto: (node, adapter_digest) its node said it holds
    apply_alpha: float | None = None  # auto: the weight it is to apply (pooled, or reused)
    apply_choice: float | None = None  # ... and the candidate that chose it (None: the start)
    reused: int = 0  # auto: times it applied its last weight again since it last chose


@dataclass
class ClosedRound:
    """A round whose rows are complete: write them, and the adapters the clients hold."""

    round: int
    rows: list[ClientRow]
    seconds: float
    adapters: list[Adapter]


class ServerState:
    """Per-client state, the rule on one snapshot, and the rows of the round still open."""

    def __init__(self, cfg: Config, clients: list[ClientState], graph: TaskGraph):
        self.cfg = cfg
        self.policy = cfg.server.policy
        self.clients = clients
        self.graph = graph
        ranks = [c.rank for c in clients]
        self.space = rules.resolve_pull_space(cfg.server.pull_space, ranks)
        self.scales = [lora_scale(cfg.lora.alpha, c.rank, cfg.lora.rslora) for c in clients]
        self.trained_round = 0  # the last round whose rule was applied
        self.open_rows: dict[int, ClientRow] = {}  # rows of trained_round, not yet written
        self.open_seconds = 0.0
        self.accepted_norms: list[float] = []  # update norms accepted in the last exchange
        self.releases = [0] * len(clients)  # rounds each client was asked to train (for DP)
        self._contacted: dict[int, Instruction] = {}
        # auto pooled by cluster: each cluster's last decision, (mix weight, candidate)
        self.cluster_mix: dict[int, tuple[float, float]] = {}

    # ------------------------------------------------------------------------ queries
    @property
    def auto(self) -> bool:
        """MIRA with ``server.step = "auto"``: every client chooses its own mix weight."""
        return isinstance(self.policy, LearnedMix)

    def index(self, client_id: str) -> int:
        for i, client in enumerate(self.clients):
            if client.client_id == client_id:
                return i
        raise ServerStateError(f"unknown client {client_id!r}")

    def measures_task_metrics(self, server_round: int) -> bool:
        """Task metrics every ``federation.metrics_every`` rounds and after the last round."""
        federation = self.cfg.federation
        return server_round % federation.metrics_every == 0 or server_round == federation.rounds

    def refresh_due(self, server_round: int) -> bool:
        """Whether exchange ``server_round`` also asks every client for a fresh fingerprint."""
        refresh = self.cfg.server.graph_refresh
        return (
            self.cfg.server.graph in ("clusters", "knn")
            and RULES[self.cfg.server.method].uses_graph
            and refresh > 0
            and server_round > 1
            and (server_round - 1) % refresh == 0
        )

    # ------------------------------------------------------------------------ one exchange
    def plan(self, server_round: int) -> list[Instruction]:
        """The instructions of exchange ``server_round`` (rounds + 1: the final evaluation).

        A client is contacted when it trains this round, when its adapter has changed since it
        was last evaluated (or its task metrics are due), or when fingerprints are refreshed.
        Under auto the message leaves out the adapter when the client's node said it holds
        that very one (:meth:`_held_digest`), naming it by digest instead.
        """
        final = server_round > self.cfg.federation.rounds
        sampled = set()
        if not final:
            sampled = set(
                sample_clients(
                    len(self.clients),
                    self.cfg.federation.fraction,
                    self.cfg.federation.seed,
                    server_round,
                )
            )
        refresh = not final and self.refresh_due(server_round)
        closing = bool(self.open_rows)
        metrics_due = closing and self.measures_task_metrics(self.trained_round)
        instructions: dict[int, Instruction] = {}
        for i, client in enumerate(self.clients):
            evaluate = closing and (
                client.evaluation is None
                or client.mean is not None
                or (metrics_due and not client.evaluated_task_metrics)
            )
            if not (i in sampled or evaluate or refresh):
                continue
            held = self._held_digest(client)  # its node holds it: the message leaves it out
            instructions[i] = Instruction(
                client_id=client.client_id,
                node_id=client.node_id,
                round=server_round,
                adapter=None if held else client.adapter,
                held=held,
                train=i in sampled,
                evaluate=evaluate,
                task_metrics=metrics_due and evaluate,
                fingerprint=refresh,
                mean=client.mean,
                candidates=list(client.candidates) if client.mean is not None else [],
                prior=(
                    [client.prior_alpha]
                    if client.mean is not None and client.prior_alpha is not None
                    else None
                ),
                anchor=client.anchor,
                alpha=client.apply_alpha if client.mean is not None else None,
                space=self.space,
                partition=i,
                shard=task_of(self.cfg, i)[1],
            )
        self._contacted = instructions
        return list(instructions.values())

    def _held_digest(self, client: ClientState) -> str:
        """Auto: the digest of the client's adapter when its node said it holds that very
        adapter (its last reply), else ''. A fixed step sends every adapter: it changes with
        every pull, and fixed-step runs keep the messages they always had."""
        if not self.auto or client.held is None or client.held[0] != client.node_id:
            return ""
        digest = adapter_digest(client.adapter)
        return digest if client.held[1] == digest else ""

    def resend(self, replies: dict[int, Reply]) -> list[Instruction]:
        """The instructions to send again, with the adapter, to the clients whose reply says
        they do not hold the adapter their message left out (a restarted client process: its
        node's state is gone); their replies are taken out of ``replies``. Whether a client
        keeps its adapter never changes what it computes, only what travels."""
        again = []
        for i in sorted(replies):
            if not replies[i].lacks_adapter:
                continue
            del replies[i]
            client = self.clients[i]
            client.held = None
            instruction = self._contacted[i]
            instruction.adapter, instruction.held = client.adapter, ""
            again.append(instruction)
        return again

    def close_round(
        self,
        replies: dict[int, Reply],
        sent: dict[int, int],
        seconds: float = 0.0,
        outcomes: dict[int, Outcome] | None = None,
    ) -> ClosedRound | None:
        """Take the choices and evaluations of the open round from this exchange's replies.

        Under auto, each client's chosen alpha is checked against the decision its reported
        validation losses (and, with ``server.auto.tolerance``, standard errors) make
        (:func:`mira.core.rules.decide_mix`, as the client made it; pooled by cluster, against
        the weight the server sent, and the cluster's next weight is decided from the sums its
        clients reported) and its adapter becomes (1 - alpha) W_k + alpha M_k, computed with
        the same function the client used. Bytes of messages that only evaluate count toward
        the round they evaluate; ``seconds`` (the final exchange's time) is added to the
        round's. A client whose message only evaluated and went wrong (``outcomes``) has its
        status recorded in the closing row. Returns None when no round is open.
        """
        if not self.open_rows:
            return None
        outcomes = outcomes or {}
        metrics_due = self.measures_task_metrics(self.trained_round)
        sums: dict[int, list[tuple[int, ValidationSums]]] = {}
        for i, client in enumerate(self.clients):
            row = self.open_rows[i]
            reply = replies.get(i)
            instruction = self._contacted.get(i)
            if instruction is not None and not instruction.train:
                row.bytes_down += sent.get(i, 0)
                if i in outcomes:
                    row.status, row.reason = outcomes[i].status, outcomes[i].reason
            if reply is not None and client.mean is not None and reply.alpha is not None:
                self._resolve_choice(i, reply, row)
                if reply.val_sums is not None:
                    sums.setdefault(self.graph.clusters[i], []).append((i, reply.val_sums))
            if reply is not None and reply.evaluation is not None:
                client.evaluation = reply.evaluation
                client.evaluated_task_metrics = bool(instruction and instruction.task_metrics)
            evaluation = client.evaluation or Evaluation(eval_loss=None)
            row.eval_loss = evaluation.eval_loss
            if evaluation.peak_memory_mb is not None:
                row.peak_memory_mb = max(
                    float(row.peak_memory_mb or 0.0), evaluation.peak_memory_mb
                )
            if metrics_due:
                for name in TASK_METRICS:
                    if name in evaluation.metrics:
                        row.metrics[name] = evaluation.metrics[name]
        if sums:
            self._decide_pooled(sums)
        closed = ClosedRound(
            round=self.trained_round,
            rows=[self.open_rows[i] for i in range(len(self.clients))],
            seconds=self.open_seconds + seconds,
            adapters=[c.adapter for c in self.clients],
        )
        self.open_rows = {}
        self.open_seconds = 0.0
        return closed

    def _resolve_choice(self, index: int, reply: Reply, row: ClientRow) -> None:
        """Check a client's mix weight against what its reported numbers make it (pooled by
        cluster: against the weight the server sent), and store its mixed adapter."""
        client = self.clients[index]
        assert client.mean is not None and reply.alpha is not None
        policy = self.policy
        assert isinstance(policy, LearnedMix)
        if not client.candidates:  # it reused a weight the server sent (server.auto.every)
            if client.apply_alpha is None or not math.isclose(
                client.apply_alpha, reply.alpha, rel_tol=0, abs_tol=1e-12
            ):
                raise ServerStateError(
                    f"client {client.client_id} applied alpha = {reply.alpha} but the server "
                    f"sent it {client.apply_alpha} to apply again (server.auto.every)"
                )
            self._store_mix(index, reply.alpha, row)
            client.reused += 1
            return
        losses = reply.val_losses or []
        if len(losses) != len(client.candidates):
            raise ServerStateError(
                f"client {client.client_id} reported {len(losses)} validation losses for "
                f"{len(client.candidates)} candidates"
            )
        tolerance = policy.tolerance
        if tolerance > 0 and len(reply.val_standard_errors or []) != len(losses):
            raise ServerStateError(
                f"client {client.client_id} reported {len(reply.val_standard_errors or [])} "
                f"standard errors for {len(losses)} validation losses (server.auto.tolerance "
                f"= {tolerance:g} needs one per candidate)"
            )
        if policy.pool == "cluster":
            alpha, choice = client.apply_alpha, client.apply_choice
            assert alpha is not None
            if len(reply.val_sums.nll if reply.val_sums else []) != len(losses):
                raise ServerStateError(
                    f"client {client.client_id} reported no validation sums for its "
                    f"{len(losses)} candidates (server.auto.pool = 'cluster' needs them)"
                )
            why = "the server sent it"
        else:
            decision = rules.decide_mix(
                losses,
                reply.val_standard_errors,
                client.candidates,
                client.anchor,
                client.prior_alpha,
                tolerance=tolerance,
                smoothing=policy.smoothing,
            )
            alpha, choice = decision.alpha, client.candidates[decision.index]
            why = "its validation losses make it"
        if not math.isclose(alpha, reply.alpha, rel_tol=0, abs_tol=1e-12):
            raise ServerStateError(
                f"client {client.client_id} chose alpha = {reply.alpha} but {why} {alpha}"
            )
        self._store_mix(index, alpha, row)
        client.reused = 0
        row.alpha_choice = choice
        if choice in client.candidates:
            row.val_loss = float(losses[client.candidates.index(choice)])
        row.val_losses = [float(v) for v in losses]
        row.candidates = list(client.candidates)
        if tolerance > 0:
            row.val_standard_errors = [float(v) for v in reply.val_standard_errors or []]
            row.anchor = client.anchor

    def _store_mix(self, index: int, alpha: float, row: ClientRow) -> None:
        """Client ``index``'s adapter becomes (1 - alpha) W_k + alpha M_k, as the client
        computed it; alpha is the weight it applied last from now on."""
        client = self.clients[index]
        assert client.mean is not None
        client.adapter = rules.mix_toward(
            client.adapter, client.mean, alpha, self.space, self.scales[index]
        )
        client.mean = None
        client.prior_alpha = alpha
        row.mix_weight = alpha

    def _decide_pooled(self, sums: dict[int, list[tuple[int, ValidationSums]]]) -> None:
        """``server.auto.pool = 'cluster'``: each cluster's one mix weight, from the sums its
        clients reported in this exchange (their validation examples taken together), with
        the same decision a client makes alone; its clients apply it in the next exchange."""
        policy = self.policy
        assert isinstance(policy, LearnedMix)
        for label, reported in sums.items():
            member = self.clients[reported[0][0]]  # every one of them tried these candidates
            losses, errors = rules.pooled_losses([part for _, part in reported])
            decision = rules.decide_mix(
                losses,
                errors,
                member.candidates,
                member.anchor,
                self.cluster_mix[label][0] if label in self.cluster_mix else None,
                tolerance=policy.tolerance,
                smoothing=policy.smoothing,
            )
            self.cluster_mix[label] = (decision.alpha, member.candidates[decision.index])

    def screen_norms(self, replies: dict[int, Reply]) -> dict[int, Outcome]:
        """Refuse trained updates far larger than the round's others
        (``federation.max_norm_ratio``).

        The update is the trained adapter minus the one the client started from (after its
        auto choice, so call this after :meth:`close_round`). A refused reply loses its trained
        adapter; the client keeps the adapter it holds. Returns the refusals.
        """
        norms = {
            i: update_norm(self.clients[i].adapter, r.trained)
            for i, r in replies.items()
            if r.trained is not None
        }
        ratio = self.cfg.federation.max_norm_ratio
        refused = {}
        for i, reference in norm_outliers(norms, self.accepted_norms, ratio).items():
            replies[i].trained = None
            refused[i] = Outcome(
                REJECTED,
                f"client {self.clients[i].client_id}'s update norm {norms[i]:.3g} is more than "
                f"{ratio:g} times the round's median {reference:.3g} "
                "(federation.max_norm_ratio)",
            )
        accepted = [n for i, n in norms.items() if i not in refused]
        if accepted:
            self.accepted_norms = accepted
        return refused

    def epsilon(self, index: int) -> float:
        """Client ``index``'s epsilon so far, for ``privacy.delta``: one Gaussian mechanism per
        round it was asked to train (:func:`mira.core.accounting.client_epsilon`)."""
        from mira.core.accounting import client_epsilon

        privacy = self.cfg.privacy
        return client_epsilon(privacy.noise_multiplier, self.releases[index], privacy.delta)

    def rebuild_graph(self, graph: TaskGraph) -> None:
        """Use a graph rebuilt from fresh fingerprints for this round's rule and later (its
        clusters are new: pooled by cluster, each starts again from its equal share)."""
        self.graph = graph
        self.cluster_mix = {}

    def apply_rule(
        self,
        server_round: int,
        replies: dict[int, Reply],
        sent: dict[int, int],
        seconds: float,
        outcomes: dict[int, Outcome] | None = None,
    ) -> None:
        """Store the trained adapters and apply the server rule to one snapshot of all.

        A client that was asked to train but failed, timed out or was refused (``outcomes``)
        is treated like one not sampled: it keeps its adapter, which still serves as a
        neighbour, and its row records why. Opens the rows of ``server_round``; they are closed
        by the next exchange.
        """
        outcomes = outcomes or {}
        trained = {i: r.trained for i, r in replies.items() if r.trained is not None}
        snapshot = [trained.get(i, c.adapter) for i, c in enumerate(self.clients)]
        active = [i in trained for i in range(len(self.clients))]
        rows = {}
        for i, client in enumerate(self.clients):
            reply = replies.get(i)
            train_loss = reply.train_loss if reply is not None and i in trained else None
            instruction = self._contacted.get(i)
            rows[i] = ClientRow(
                round=server_round,
                client=client.client_id,
                task=client.task,
                method=self.cfg.server.method,
                rank=client.rank,
                sampled=bool(instruction is not None and instruction.train),
                train_loss=train_loss,
                eval_loss=None,
                bytes_up=reply.bytes_up if reply is not None else 0,
                bytes_down=sent.get(i, 0) if instruction is not None and instruction.train else 0,
                mix_weight=0.0,
                status=OK,
            )
            if i in outcomes and instruction is not None and instruction.train:
                rows[i].status, rows[i].reason = outcomes[i].status, outcomes[i].reason
            if instruction is not None and instruction.train:
                # Counted even when the round failed: the client may have uploaded.
                self.releases[i] += 1
            if self.cfg.privacy.clip_norm > 0:
                rows[i].epsilon = self.epsilon(i)
        for i in self._contacted:  # what each contacted node said it holds now, if anything
            holds = replies[i].holds if i in replies else ""
            self.clients[i].held = (self.clients[i].node_id, holds) if holds else None
        if isinstance(self.policy, LearnedMix):
            self._open_choices(snapshot, active, trained, self.policy)
        else:
            mixing = rules.mixing_for(
                self.cfg.server.method,
                adjacency=self.graph.adjacency,
                step=self.policy.step,
                clusters=self.graph.clusters,
                weights=[c.num_train for c in self.clients],
                active=active,
            )
            mixing = rules.bound_pull(
                mixing, snapshot, self.space, self.scales, self.cfg.server.pull_bound
            )
            updated = rules.apply_mixing(snapshot, mixing, self.space, self.scales)
            weights = mix_weights(mixing)
            for i, client in enumerate(self.clients):
                identity = mixing[i, i] == 1.0 and np.count_nonzero(mixing[i]) == 1
                if i in trained or not identity:
                    client.evaluation = None
                    client.evaluated_task_metrics = False
                client.adapter = updated[i]
                rows[i].mix_weight = float(weights[i])
        self.trained_round = server_round
        self.open_rows = rows
        self.open_seconds = seconds

    def _open_choices(
        self,
        snapshot: list[Adapter],
        active: list[bool],
        trained: dict[int, Adapter],
        policy: LearnedMix,
    ) -> None:
        """Auto: each trained client keeps its trained adapter until it chooses its mix with
        its neighbours' mean, computed here from the same snapshot as every other rule."""
        means = rules.neighbour_means(
            snapshot,
            self.graph.adjacency,
            active,
            self.space,
            self.scales,
            self.cfg.server.pull_bound,
        )
        for i, client in enumerate(self.clients):
            if i not in trained:
                continue  # not sampled: keeps its adapter, mix weight 0
            client.adapter = trained[i]
            client.evaluation = None
            client.evaluated_task_metrics = False
            client.mean = means[i]
            neighbours = int(np.count_nonzero(self.graph.adjacency[i]))
            candidates = rules.auto_candidates(policy.grid, neighbours, policy.equal_share)
            client.candidates = candidates if client.mean is not None else []
            client.anchor = rules.sharing_anchor(neighbours)
            client.apply_alpha = client.apply_choice = None
        choosing = [i for i in trained if self.clients[i].mean is not None]
        reusing = [i for i in choosing if self._reuses(self.clients[i], policy)]
        choosing = [i for i in choosing if i not in reusing]
        if policy.pool == "cluster":
            self._share_candidates(choosing)
        for i in reusing:  # no validation pass: the weight it applied last, or its cluster's
            client = self.clients[i]
            client.candidates = []
            label = self.graph.clusters[i]
            pooled = policy.pool == "cluster" and label in self.cluster_mix
            client.apply_alpha = self.cluster_mix[label][0] if pooled else client.prior_alpha

    @staticmethod
    def _reuses(client: ClientState, policy: LearnedMix) -> bool:
        """Whether a client that trained applies its last weight again instead of choosing
        (``server.auto.every``): it has chosen before, fewer than ``every`` times ago."""
        return client.prior_alpha is not None and client.reused + 1 < policy.every

    def _share_candidates(self, choosing: list[int]) -> None:
        """Pooled by cluster: the clients of a cluster that choose this round try the same
        candidates (all of theirs), lean toward the same anchor (the mean of theirs: on a
        uniform cluster everyone's equal share) and apply the cluster's last decision, or
        before it has one, that anchor."""
        groups: dict[int, list[int]] = {}
        for i in choosing:
            groups.setdefault(self.graph.clusters[i], []).append(i)
        for label, members in groups.items():
            candidates = sorted({a for i in members for a in self.clients[i].candidates})
            anchor = float(np.mean([self.clients[i].anchor for i in members]))
            alpha, choice = self.cluster_mix.get(label, (anchor, None))
            for i in members:
                client = self.clients[i]
                client.candidates, client.anchor = candidates, anchor
                client.apply_alpha, client.apply_choice = alpha, choice

    # ------------------------------------------------------------------------ checkpoints
    def snapshot_state(self) -> tuple[dict[str, Any], dict[str, Adapter]]:
        """(JSON-able state, named adapters) that :meth:`restore_state` takes back."""
        adapters: dict[str, Adapter] = {}
        clients = []
        for client in self.clients:
            adapters[client.client_id] = client.adapter
            if client.mean is not None:
                adapters[f"mean:{client.client_id}"] = client.mean
            clients.append(
                {
                    "client": client.client_id,
                    "rank": client.rank,
                    "candidates": client.candidates,
                    "prior_alpha": client.prior_alpha,
                    "anchor": client.anchor,
                    "apply_alpha": client.apply_alpha,
                    "apply_choice": client.apply_choice,
                    "reused": client.reused,
                    "evaluation": None
                    if client.evaluation is None
                    else client.evaluation.as_dict(),
                    "evaluated_task_metrics": client.evaluated_task_metrics,
                    "has_mean": client.mean is not None,
                }
            )
        state = {
            "trained_round": self.trained_round,
            "open_rows": [self.open_rows[i].to_dict() for i in sorted(self.open_rows)],
            "open_seconds": self.open_seconds,
            "accepted_norms": self.accepted_norms,
            "releases": self.releases,
            "clients": clients,
            "cluster_mix": [[label, *mix] for label, mix in sorted(self.cluster_mix.items())],
        }
        return state, adapters

    def restore_state(self, state: dict[str, Any], adapters: dict[str, Adapter]) -> None:
        """Put a checkpoint's state in place (the graph is restored by the caller)."""
        saved = state["clients"]
        ids = [c.client_id for c in self.clients]
        if [s["client"] for s in saved] != ids or [s["rank"] for s in saved] != [
            c.rank for c in self.clients
        ]:
            raise ServerStateError(
                f"the checkpoint holds clients {[s['client'] for s in saved]} with ranks "
                f"{[s['rank'] for s in saved]}, but the connected clients are {ids} with "
                f"ranks {[c.rank for c in self.clients]}"
            )
        for client, entry in zip(self.clients, saved, strict=True):
            adapter = adapters[client.client_id]
            if {k: v.shape for k, v in adapter.items()} != {
                k: v.shape for k, v in client.adapter.items()
            }:
                raise ServerStateError(
                    f"the checkpointed adapter of {client.client_id} does not match its layout"
                )
            client.adapter = adapter
            client.mean = adapters.get(f"mean:{client.client_id}") if entry["has_mean"] else None
            client.candidates = [float(a) for a in entry["candidates"]]
            client.prior_alpha = entry.get("prior_alpha")
            client.anchor = float(entry.get("anchor", 0.0))
            client.apply_alpha = entry.get("apply_alpha")
            client.apply_choice = entry.get("apply_choice")
            client.reused = int(entry.get("reused", 0))
            stored = entry["evaluation"]
            client.evaluation = None if stored is None else Evaluation.from_dict(stored)
            client.evaluated_task_metrics = bool(entry["evaluated_task_metrics"])
        self.trained_round = int(state["trained_round"])
        self.open_rows = dict(enumerate(client_row(row) for row in state["open_rows"]))
        self.open_seconds = float(state["open_seconds"])
        self.accepted_norms = [float(n) for n in state.get("accepted_norms", [])]
        self.releases = [int(n) for n in state.get("releases", [0] * len(self.clients))]
        self.cluster_mix = {
            int(label): (float(alpha), float(choice))
            for label, alpha, choice in state.get("cluster_mix", [])
        }
