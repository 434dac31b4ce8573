"""The server's round logic (mira.federation.state) without Flower: who each exchange
contacts, the lagged evaluation, the auto choice, and checkpoints. Milliseconds each."""

from __future__ import annotations

import numpy as np
import pytest

from mira.config import apply_overrides, config_from_dict
from mira.core import rules
from mira.federation.messages import Evaluation, Instruction, Reply, adapter_digest
from mira.federation.server import share_init
from mira.federation.state import (
    REJECTED,
    ClientState,
    Outcome,
    ServerState,
    ServerStateError,
    train_loss_problem,
)
from mira.graph.build import TaskGraph
from mira.graph.sources import declared_task_graph


def make_state(*overrides: str) -> ServerState:
    raw = {
        "lora": {"rank": 2, "alpha": 4},
        "federation": {"rounds": 3, "seed": 1},
        "server": {"method": "mira", "step": 0.5, "graph": "tasks"},
        "data": {"train_size": 8, "eval_size": 4, "val_size": 2},
        "tasks": [{"name": "a", "clients": 2}, {"name": "b", "clients": 2}],
    }
    cfg = config_from_dict(apply_overrides(raw, list(overrides)))
    rng = np.random.default_rng(0)
    init = {"m.lora_A.weight": rng.standard_normal((2, 3)), "m.lora_B.weight": np.zeros((3, 2))}
    clients = [
        ClientState(c, t, 2, node_id=100 + i, num_train=6, adapter=dict(init))
        for i, (c, t) in enumerate(zip(cfg.client_ids, cfg.client_tasks, strict=True))
    ]
    graph = TaskGraph(declared_task_graph(cfg.client_tasks), [0, 0, 1, 1], "tasks")
    return ServerState(cfg, clients, graph)


def trained_reply(state: ServerState, instruction: Instruction, shift: float) -> Reply:
    """A client's reply: its adapter moved by ``shift``, an evaluation if asked."""
    reply = Reply(instruction.client_id, instruction.node_id)
    if instruction.evaluate:
        reply.evaluation = Evaluation(eval_loss=1.0 + shift, peak_memory_mb=10.0)
        if instruction.task_metrics:
            reply.evaluation.metrics["accuracy"] = 0.5
    if instruction.train:
        reply.trained = {k: v + shift for k, v in instruction.adapter.items()}
        reply.train_loss = 2.0 + shift
        reply.bytes_up = 48
    return reply


def run_exchange(state: ServerState, server_round: int, shifts=None):
    instructions = state.plan(server_round)
    replies = {}
    for instruction in instructions:
        index = state.index(instruction.client_id)
        shift = (shifts or {}).get(index, 0.1 * (index + 1))
        replies[index] = trained_reply(state, instruction, shift)
        if instruction.mean is not None:  # auto: the client picks the first candidate's loss
            losses = [1.0 + abs(a - 0.5) for a in instruction.candidates]
            replies[index].val_losses = losses
            replies[index].val_standard_errors = [0.0] * len(losses)  # decisive: the argmin
            replies[index].alpha = instruction.candidates[int(np.argmin(losses))]
    sent = {state.index(i.client_id): 100 for i in instructions}
    return instructions, replies, sent


def test_first_exchange_trains_everyone_and_evaluates_nobody() -> None:
    state = make_state()
    instructions = state.plan(1)
    assert [i.train for i in instructions] == [True] * 4
    assert not any(i.evaluate for i in instructions)
    assert state.close_round({}, {}) is None


def test_a_round_is_written_one_exchange_after_its_training() -> None:
    state = make_state()
    _, replies, sent = run_exchange(state, 1)
    state.apply_rule(1, replies, sent, seconds=2.0)
    assert state.trained_round == 1 and len(state.open_rows) == 4
    # MIRA at step 0.5 on degree-1 clients: alpha = 0.5, the pair averaged.
    pair = [state.clients[0].adapter, state.clients[1].adapter]
    np.testing.assert_allclose(pair[0]["m.lora_A.weight"], pair[1]["m.lora_A.weight"])
    instructions, replies, sent = run_exchange(state, 2)
    assert all(i.train and i.evaluate for i in instructions)
    closed = state.close_round(replies, sent)
    assert closed is not None and closed.round == 1 and closed.seconds == 2.0
    for row, instruction in zip(closed.rows, instructions, strict=True):
        assert row.round == 1 and row.mix_weight == 0.5
        assert row.eval_loss == replies[state.index(instruction.client_id)].evaluation.eval_loss
        assert row.bytes_down == 100 and row.bytes_up == 48
        assert row.metrics["accuracy"] == 0.5  # federation.metrics_every = 1: due every round


def test_final_exchange_only_evaluates_and_carries_the_task_metrics() -> None:
    state = make_state()
    for server_round in (1, 2, 3):
        _, replies, sent = run_exchange(state, server_round)
        state.close_round(replies, sent)
        state.apply_rule(server_round, replies, sent, seconds=1.0)
    instructions, replies, sent = run_exchange(state, 4)
    assert all(i.evaluate and not i.train and i.task_metrics for i in instructions)
    closed = state.close_round(replies, sent, seconds=0.5)
    assert closed is not None and closed.round == 3 and closed.seconds == 1.5
    assert all(r.metrics["accuracy"] == 0.5 and r.bytes_down == 200 for r in closed.rows)
    assert not state.open_rows


def test_unsampled_unchanged_clients_are_not_contacted_and_keep_their_evaluation() -> None:
    state = make_state("federation.fraction=0.5", "server.method=local")
    _, replies, sent = run_exchange(state, 1)
    state.apply_rule(1, replies, sent, seconds=1.0)
    first = {i for i, r in state.open_rows.items() if r.sampled}
    instructions, replies, sent = run_exchange(state, 2)
    contacted = {state.index(i.client_id) for i in instructions}
    second = {state.index(i.client_id) for i in instructions if i.train}
    # Never-evaluated clients (the initial adapter) and the trained ones are evaluated.
    assert contacted == set(range(4)) and len(first) == len(second) == 2
    closed = state.close_round(replies, sent)
    assert closed is not None
    state.apply_rule(2, replies, sent, seconds=1.0)
    instructions, replies, sent = run_exchange(state, 3)
    contacted = {state.index(i.client_id) for i in instructions}
    sampled_now = {state.index(i.client_id) for i in instructions if i.train}
    assert contacted == second | sampled_now  # the rest kept their adapter and evaluation
    closed = state.close_round(replies, sent)
    assert closed is not None and all(r.eval_loss is not None for r in closed.rows)


def test_auto_sends_the_mean_checks_the_choice_and_mixes_like_the_client() -> None:
    state = make_state("server.step='auto'", "server.auto.grid=[0.0, 0.25, 1.0]")
    _, replies, sent = run_exchange(state, 1)
    state.apply_rule(1, replies, sent, seconds=1.0)
    trained = [dict(c.adapter) for c in state.clients]
    assert all(c.mean is not None for c in state.clients)
    instructions, replies, sent = run_exchange(state, 2)
    assert all(i.candidates == [0.0, 0.25, 0.5, 1.0] for i in instructions)  # 1/2: equal share
    closed = state.close_round(replies, sent)
    assert closed is not None
    assert all(r.mix_weight == 0.5 for r in closed.rows)
    expected = rules.mix_toward(trained[0], trained[1], 0.5, "factor", 2.0)
    np.testing.assert_allclose(closed.adapters[0]["m.lora_A.weight"], expected["m.lora_A.weight"])
    state.apply_rule(2, replies, sent, seconds=1.0)
    instructions, replies, sent = run_exchange(state, 3)
    replies[0].alpha = 1.0  # not the argmin of what it reported
    assert state.clients[0].prior_alpha == 0.5
    with pytest.raises(ServerStateError, match=r"chose alpha = 1\.0 but its validation losses"):
        state.close_round(replies, sent)


def test_auto_tolerance_sends_the_anchor_and_rechecks_the_tolerant_choice() -> None:
    state = make_state(
        "server.step='auto'", "server.auto.grid=[0.0, 1.0]", "server.auto.tolerance=1"
    )
    _, replies, sent = run_exchange(state, 1)
    state.apply_rule(1, replies, sent, seconds=1.0)
    instructions, replies, sent = run_exchange(state, 2)
    assert all(i.anchor == 0.5 and i.candidates == [0.0, 0.5, 1.0] for i in instructions)
    for reply in replies.values():
        # alpha 0 is best, 1/2 is 0.1 worse with a standard error of 0.2: as good; 1 is not
        reply.val_losses, reply.val_standard_errors = [1.0, 1.1, 2.0], [0.0, 0.2, 0.2]
        reply.alpha = 0.5
    closed = state.close_round(replies, sent)
    assert closed is not None
    assert all(r.alpha_choice == 0.5 and r.anchor == 0.5 for r in closed.rows)
    assert all(r.val_standard_errors == [0.0, 0.2, 0.2] for r in closed.rows)
    saved, _ = state.snapshot_state()
    assert all(c["anchor"] == 0.5 for c in saved["clients"])
    state.apply_rule(2, replies, sent, seconds=1.0)
    instructions, replies, sent = run_exchange(state, 3)
    for reply in replies.values():
        reply.val_losses, reply.val_standard_errors = [1.0, 1.1, 2.0], [0.0, 0.05, 0.2]
        reply.alpha = 0.25  # the argmin 0 smoothed with 1/2 would be right; it claims 1/2's
    replies[0].alpha = 0.5
    with pytest.raises(ServerStateError, match=r"chose alpha = 0\.5 but its validation losses"):
        state.close_round(replies, sent)
    replies[0].alpha, replies[0].val_standard_errors = 0.25, None
    with pytest.raises(ServerStateError, match="reported 0 standard errors for 3"):
        state.close_round(replies, sent)


def test_auto_leaves_out_the_adapter_a_client_holds_and_resends_it_to_one_that_lost_it() -> None:
    """Under auto a client's message carries M_k and not W_k, which its node kept; a node that
    lost it (a restarted process) says so and gets it again; after a resume, or on a new node,
    the server sends it without asking."""
    state = make_state("server.step='auto'")
    instructions, replies, sent = run_exchange(state, 1)
    assert all(i.adapter is not None and not i.held for i in instructions)
    for reply in replies.values():
        assert reply.trained is not None
        reply.holds = adapter_digest(reply.trained)  # what the client kept: its upload
    state.apply_rule(1, replies, sent, seconds=1.0)
    saved, adapters = state.snapshot_state()
    instructions = state.plan(2)
    for instruction in instructions:
        own = state.clients[state.index(instruction.client_id)].adapter
        assert instruction.adapter is None and instruction.mean is not None
        assert instruction.held == adapter_digest(own)
    replies = {i: Reply(c.client_id, c.node_id) for i, c in enumerate(state.clients)}
    replies[1].lacks_adapter = True
    again = state.resend(replies)
    assert [state.index(i.client_id) for i in again] == [1] and sorted(replies) == [0, 2, 3]
    assert again[0].held == "" and again[0].adapter is state.clients[1].adapter
    assert again[0].mean is not None and again[0].train  # the same work, adapter included
    # A resumed server does not know what the nodes hold: it sends every adapter.
    fresh = make_state("server.step='auto'")
    fresh.restore_state(saved, adapters)
    assert all(i.adapter is not None and i.mean is not None for i in fresh.plan(2))
    # Nor does it for a client that moved to another node (a restarted SuperNode).
    state.clients[0].node_id = 999
    assert state.plan(2)[0].adapter is not None


def test_a_fixed_step_sends_every_adapter_whatever_the_client_holds() -> None:
    state = make_state()
    _, replies, sent = run_exchange(state, 1)
    for reply in replies.values():
        reply.holds = adapter_digest(reply.trained or {})
    state.apply_rule(1, replies, sent, seconds=1.0)
    state.clients[0].adapter = replies[0].trained or {}  # as if its pull had left it as it is
    assert all(i.adapter is not None and not i.held for i in state.plan(2))


def test_auto_pooled_by_cluster_applies_the_clusters_decision_one_round_late() -> None:
    """server.auto.pool = 'cluster': the clients of a cluster apply one weight, decided from
    the sums they all reported the exchange before (their examples put together); before any
    report, their equal share."""
    state = make_state(
        "server.step='auto'", "server.auto.grid=[0.0, 1.0]", "server.auto.pool='cluster'"
    )
    _, replies, sent = run_exchange(state, 1)
    state.apply_rule(1, replies, sent, seconds=1.0)
    instructions, replies, sent = run_exchange(state, 2)
    assert all(i.alpha == 0.5 and i.candidates == [0.0, 0.5, 1.0] for i in instructions)
    # a-0's examples favour alpha 1, a-1's alpha 0 by more: together, 0 (b: 1/2 throughout)
    per_example = {
        0: np.array([[3.0, 3.0], [2.9, 2.9], [2.8, 2.8]]),
        1: np.array([[1.0, 1.0], [1.5, 1.5], [2.0, 2.0]]),
        2: np.array([[2.0, 2.0], [1.0, 1.1], [2.0, 2.2]]),
        3: np.array([[2.0, 2.1], [1.0, 1.0], [2.0, 2.1]]),
    }
    tokens = np.array([2.0, 2.0])
    for i, reply in replies.items():
        reply.alpha = 0.5  # what the server sent
        reply.val_losses = (per_example[i].sum(axis=1) / 4).tolist()
        reply.val_standard_errors = rules.paired_standard_errors(per_example[i], tokens).tolist()
        reply.val_sums = rules.validation_sums(per_example[i], tokens)
    closed = state.close_round(replies, sent)
    assert closed is not None
    assert all(r.mix_weight == 0.5 and r.alpha_choice is None for r in closed.rows)
    for label, members in ((0, (0, 1)), (1, (2, 3))):
        together = np.concatenate([per_example[i] for i in members], axis=1)
        losses = together.sum(axis=1) / 8
        errors = rules.paired_standard_errors(together, np.full(4, 2.0))
        expected = rules.decide_mix(
            losses, errors, [0.0, 0.5, 1.0], 0.5, None, tolerance=1.0, smoothing=0.5
        )
        assert state.cluster_mix[label] == (expected.alpha, [0.0, 0.5, 1.0][expected.index])
    assert state.cluster_mix == {0: (0.0, 0.0), 1: (0.5, 0.5)}
    state.apply_rule(2, replies, sent, seconds=1.0)
    saved, adapters = state.snapshot_state()
    instructions, replies, sent = run_exchange(state, 3)
    assert [i.alpha for i in instructions] == [0.0, 0.0, 0.5, 0.5]
    fresh = make_state(
        "server.step='auto'", "server.auto.grid=[0.0, 1.0]", "server.auto.pool='cluster'"
    )
    fresh.restore_state(saved, adapters)
    assert [i.alpha for i in fresh.plan(3)] == [0.0, 0.0, 0.5, 0.5]
    assert fresh.cluster_mix == state.cluster_mix
    for reply in replies.values():
        reply.val_sums = rules.validation_sums(per_example[0], tokens)
    replies[0].alpha = 0.5  # not what it was sent
    with pytest.raises(ServerStateError, match=r"chose alpha = 0\.5 but the server sent it 0\.0"):
        state.close_round(replies, sent)


def test_checkpoint_state_round_trips() -> None:
    state = make_state("server.step='auto'")
    _, replies, sent = run_exchange(state, 1)
    state.apply_rule(1, replies, sent, seconds=1.0)
    saved, adapters = state.snapshot_state()
    fresh = make_state("server.step='auto'")
    fresh.restore_state(saved, adapters)
    assert fresh.trained_round == 1 and fresh.open_rows == state.open_rows
    for a, b in zip(fresh.plan(2), state.plan(2), strict=True):
        assert a.candidates == b.candidates and a.train == b.train and a.evaluate == b.evaluate
        assert a.mean is not None and b.mean is not None
        assert all(np.array_equal(a.mean[k], b.mean[k]) for k in a.mean)
    wrong = make_state("tasks.0.clients=3")
    with pytest.raises(ServerStateError, match="but the connected clients are"):
        wrong.restore_state(saved, adapters)


@pytest.mark.parametrize("method", ["local", "fedit", "cluster-fedavg", "cluster-merge"])
def test_rules_without_a_step_ignore_an_auto_step(method: str) -> None:
    """A config that sets server.step = "auto" for mira runs every other rule unchanged (as
    mira compare does with one config for all methods)."""
    state = make_state("server.step='auto'", f"server.method={method}")
    _, replies, sent = run_exchange(state, 1)
    state.apply_rule(1, replies, sent, seconds=1.0)
    assert not any(c.mean is not None for c in state.clients)
    weights = {r.mix_weight for r in state.open_rows.values()}
    assert weights == ({0.0} if method == "local" else weights - {0.0})


@pytest.mark.parametrize("method", ["fedit", "cluster-merge"])
def test_rules_that_send_one_global_model_ignore_server_robust(method: str) -> None:
    """A robust multiple that would clip (0.5 of the median edge) leaves a global-model rule
    exactly as without it: every client still gets the same model."""
    adapters = []
    for robust in ("0", "0.5"):
        state = make_state(f"server.method={method}", f"server.robust={robust}")
        _, replies, sent = run_exchange(state, 1, shifts={0: -0.9, 1: 0.1, 2: 0.2, 3: 0.3})
        state.apply_rule(1, replies, sent, seconds=1.0)
        adapters.append([c.adapter for c in state.clients])
    for plain, bounded in zip(*adapters, strict=True):
        assert all(np.array_equal(plain[k], bounded[k]) for k in plain)
    first = adapters[1][0]
    assert all(np.array_equal(first[k], a[k]) for a in adapters[1] for k in first)


@pytest.mark.parametrize("method", ["mira", "cluster-fedavg"])
def test_rules_that_pull_apply_server_robust(method: str) -> None:
    """The same multiple changes what a pulling rule sends (the check above is not vacuous)."""
    adapters = []
    for robust in ("0", "0.5"):
        state = make_state(f"server.method={method}", f"server.robust={robust}")
        _, replies, sent = run_exchange(state, 1, shifts={0: -0.9, 1: 0.1, 2: 0.2, 3: 0.3})
        state.apply_rule(1, replies, sent, seconds=1.0)
        adapters.append([c.adapter for c in state.clients])
    assert any(
        not np.array_equal(plain[k], bounded[k])
        for plain, bounded in zip(*adapters, strict=True)
        for k in plain
    )


def test_auto_smoothing_applies_the_moving_average_of_the_choices() -> None:
    state = make_state(
        "server.step='auto'",
        "server.auto.grid=[0.0, 1.0]",
        "server.auto.equal_share=false",
        "server.auto.smoothing=0.5",
    )
    applied = []
    for server_round in (1, 2, 3, 4):  # 4: the final evaluation
        instructions, replies, sent = run_exchange(state, server_round)
        prefer_one = server_round % 2 == 0  # the choice flips every round: 1, 0, 1
        for instruction in instructions:
            if instruction.mean is None:
                continue
            reply = replies[state.index(instruction.client_id)]
            reply.val_losses = [1.0, 0.0] if prefer_one else [0.0, 1.0]
            reply.val_standard_errors = [0.0, 0.0]
            prior = instruction.prior[0] if instruction.prior else None
            reply.alpha = rules.smoothed_mix(float(prefer_one), prior, 0.5)
        closed = state.close_round(replies, sent)
        if closed is not None:
            applied.append(closed.rows[0].mix_weight)
            assert closed.rows[0].alpha_choice == float(prefer_one)
        if server_round <= 3:
            state.apply_rule(server_round, replies, sent, seconds=1.0)
    assert applied == [1.0, 0.5, 0.75]


def test_a_non_finite_train_loss_refuses_the_update_and_keeps_the_mean_finite() -> None:
    from mira.results.rundir import round_aggregate

    assert train_loss_problem(2.5) is None and train_loss_problem(None) is None
    assert train_loss_problem(float("nan")) == "reported a non-finite train_loss (nan)"
    assert train_loss_problem(float("-inf")) == "reported a non-finite train_loss (-inf)"
    # What the server does with such a reply (mira.federation.server._exchange): its update is
    # refused, the client keeps its adapter, its row says why and carries no loss. (The pull
    # unbounded, so that b-1's adapter below is the plain rule's.)
    state = make_state("server.robust=0")
    _, replies, sent = run_exchange(state, 1)
    replies[2].train_loss = float("nan")
    problem = train_loss_problem(replies[2].train_loss)
    assert problem is not None
    replies[2].trained = None
    outcomes = {2: Outcome(REJECTED, f"client b-0 {problem}")}
    before = dict(state.clients[2].adapter)
    state.apply_rule(1, replies, sent, seconds=1.0, outcomes=outcomes)
    row = state.open_rows[2]
    assert row.status == REJECTED and row.train_loss is None
    assert row.reason == "client b-0 reported a non-finite train_loss (nan)"
    rows = [state.open_rows[i] for i in range(4)]
    aggregate = round_aggregate(1, "mira", 1.0, rows)
    assert aggregate.train_loss_mean == pytest.approx(np.mean([2.1, 2.2, 2.4]))
    # b-0 keeps its adapter; its neighbour b-1 is pulled toward that, not toward a NaN one
    assert all(np.all(np.isfinite(v)) for c in state.clients for v in c.adapter.values())
    np.testing.assert_array_equal(
        state.clients[2].adapter["m.lora_A.weight"], before["m.lora_A.weight"]
    )
    trained_b1 = replies[3].trained
    assert trained_b1 is not None
    np.testing.assert_allclose(
        state.clients[3].adapter["m.lora_A.weight"],
        0.5 * before["m.lora_A.weight"] + 0.5 * trained_b1["m.lora_A.weight"],
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("step", ["0.5", "auto"])
def test_clients_of_a_rank_share_one_init_that_no_round_changes(step: str) -> None:
    # Decoded from each client's identity reply, every client holds its own copy of the
    # shared init; after share_init they hold the first one's, and rounds (a rule, auto's
    # mix, a client not sampled) replace adapters without writing into those arrays.
    state = make_state(f"server.step={step}", "federation.fraction=0.5")
    for client in state.clients:
        client.adapter = {k: v.copy() for k, v in client.adapter.items()}
    first = state.clients[0].adapter
    inits = share_init(state.clients)
    assert list(inits) == [2] and inits[2] is first
    assert all(client.adapter is first for client in state.clients)
    before = {k: v.copy() for k, v in first.items()}
    for server_round in (1, 2, 3):
        _, replies, sent = run_exchange(state, server_round)
        state.close_round(replies, sent)
        state.apply_rule(server_round, replies, sent, seconds=1.0)
    for key, value in before.items():
        np.testing.assert_array_equal(first[key], value)
