"""``server.auto.every``: a client chooses its mix weight every N-th time it trains and, the
times in between, applies the weight it applied last, with no validation pass and no
candidates in its message. Milliseconds each: the server state with replies made here, and the
client's choice with a stand-in model."""

from __future__ import annotations

import numpy as np
import pytest

from mira.core import rules
from mira.federation.client_app import choose_mix
from mira.federation.messages import Evaluation, Instruction, Reply
from mira.federation.state import ServerState, ServerStateError
from test_state import make_state as state_of


def make_state(*overrides: str) -> ServerState:
    """test_state's four clients of two tasks (a cluster each) over 6 rounds, auto over the
    grid {0, 1} plus the equal share 1/2, decisive choices (no tolerance, no smoothing)."""
    return state_of(
        "federation.rounds=6",
        "server.step='auto'",
        "server.auto.grid=[0.0, 1.0]",
        "server.auto.tolerance=0",
        "server.auto.smoothing=0",
        *overrides,
    )


def reply_to(instruction: Instruction, server_round: int, best: float) -> Reply:
    """A client's reply: trained, evaluated if asked; under auto, the argmin of losses that
    favour ``best``, or, sent no candidates, the weight the server sent."""
    reply = Reply(instruction.client_id, instruction.node_id)
    if instruction.evaluate:
        reply.evaluation = Evaluation(eval_loss=1.0)
    if instruction.train:
        assert instruction.adapter is not None
        reply.trained = {k: v + 0.01 * server_round for k, v in instruction.adapter.items()}
        reply.train_loss = 2.0
    if instruction.mean is not None:
        if instruction.candidates:
            reply.val_losses = [abs(a - best) for a in instruction.candidates]
            reply.alpha = instruction.candidates[int(np.argmin(reply.val_losses))]
        else:
            reply.alpha = instruction.alpha
    return reply


def exchanges(state: ServerState, best_by_round: dict[int, float]):
    """Every exchange of the run; per exchange, (instructions, closed round or None)."""
    seen = []
    for server_round in range(1, state.cfg.federation.rounds + 2):
        instructions = state.plan(server_round)
        best = best_by_round.get(server_round, 0.5)
        replies = {state.index(i.client_id): reply_to(i, server_round, best) for i in instructions}
        sent = {state.index(i.client_id): 100 for i in instructions}
        closed = state.close_round(replies, sent)
        if server_round <= state.cfg.federation.rounds:
            state.apply_rule(server_round, replies, sent, seconds=1.0)
        seen.append((instructions, closed))
    return seen


def test_every_third_time_a_client_chooses_and_in_between_reuses_its_weight() -> None:
    state = make_state("server.auto.every=3")
    # The losses favour 1 in exchange 2 and 0 from then on: only the choosing exchanges see it.
    seen = exchanges(state, {2: 1.0, 3: 0.0, 4: 0.0, 5: 0.0, 6: 0.0, 7: 0.0})
    searched = [bool(instructions[0].candidates) for instructions, _ in seen[1:]]
    assert searched == [True, False, False, True, False, False]  # exchanges 2 to 7
    weights = [closed.rows[0].mix_weight for _, closed in seen[1:]]
    assert weights == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    choices = [closed.rows[0].alpha_choice for _, closed in seen[1:]]
    assert choices == [1.0, None, None, 0.0, None, None]
    reused = seen[2][1].rows[0]
    assert reused.val_losses is None and reused.candidates is None  # no validation pass


def test_a_reused_weight_mixes_the_new_mean_as_the_client_does() -> None:
    state = make_state("server.auto.every=2")
    for server_round, best in ((1, 0.5), (2, 0.5)):
        instructions = state.plan(server_round)
        replies = {state.index(i.client_id): reply_to(i, server_round, best) for i in instructions}
        sent = {state.index(i.client_id): 100 for i in instructions}
        state.close_round(replies, sent)
        state.apply_rule(server_round, replies, sent, seconds=1.0)
    own, mean = dict(state.clients[0].adapter), state.clients[0].mean
    assert mean is not None and state.clients[0].prior_alpha == 0.5
    instructions = state.plan(3)
    assert instructions[0].candidates == [] and instructions[0].alpha == 0.5
    replies = {state.index(i.client_id): reply_to(i, 3, 0.0) for i in instructions}
    closed = state.close_round(replies, {state.index(i.client_id): 100 for i in instructions})
    assert closed is not None
    expected = rules.mix_toward(own, mean, 0.5, "factor", 2.0)
    for key in expected:
        np.testing.assert_allclose(closed.adapters[0][key], expected[key])


def test_a_client_that_applies_another_weight_than_the_one_sent_is_refused() -> None:
    state = make_state("server.auto.every=2")
    for server_round in (1, 2):
        instructions = state.plan(server_round)
        replies = {state.index(i.client_id): reply_to(i, server_round, 0.5) for i in instructions}
        sent = {state.index(i.client_id): 100 for i in instructions}
        state.close_round(replies, sent)
        state.apply_rule(server_round, replies, sent, seconds=1.0)
    instructions = state.plan(3)
    replies = {state.index(i.client_id): reply_to(i, 3, 0.5) for i in instructions}
    replies[0].alpha = 1.0
    with pytest.raises(ServerStateError, match=r"applied alpha = 1\.0 but the server sent it 0\.5"):
        state.close_round(replies, {state.index(i.client_id): 100 for i in instructions})


def test_every_one_chooses_every_time_as_before() -> None:
    seen = exchanges(make_state(), {})
    assert all(instructions[0].candidates for instructions, _ in seen[1:-1])
    assert all(closed.rows[0].alpha_choice == 0.5 for _, closed in seen[1:])


def test_the_count_since_the_last_choice_survives_a_checkpoint() -> None:
    state = make_state("server.auto.every=3")
    for server_round in (1, 2, 3):
        instructions = state.plan(server_round)
        replies = {state.index(i.client_id): reply_to(i, server_round, 0.5) for i in instructions}
        sent = {state.index(i.client_id): 100 for i in instructions}
        state.close_round(replies, sent)
        state.apply_rule(server_round, replies, sent, seconds=1.0)
    saved, adapters = state.snapshot_state()
    fresh = make_state("server.auto.every=3")
    fresh.restore_state(saved, adapters)
    assert [c.reused for c in fresh.clients] == [c.reused for c in state.clients] == [1] * 4
    for a, b in zip(fresh.plan(4), state.plan(4), strict=True):
        assert a.candidates == b.candidates == [] and a.alpha == b.alpha == 0.5


def test_pooled_by_cluster_a_reusing_client_applies_its_clusters_weight() -> None:
    state = make_state("server.auto.every=2", "server.auto.pool='cluster'")
    for server_round in (1, 2):
        instructions = state.plan(server_round)
        replies = {}
        for instruction in instructions:
            reply = reply_to(instruction, server_round, 1.0)
            if instruction.mean is not None:  # pooled: applies the weight sent, reports sums
                reply.alpha = instruction.alpha
                reply.val_sums = rules.validation_sums(
                    np.array([[abs(a - 1.0)] for a in instruction.candidates]), np.array([1.0])
                )
            replies[state.index(instruction.client_id)] = reply
        sent = {state.index(i.client_id): 100 for i in instructions}
        state.close_round(replies, sent)
        state.apply_rule(server_round, replies, sent, seconds=1.0)
    assert state.cluster_mix[0][0] == 1.0
    instruction = state.plan(3)[0]
    assert instruction.candidates == [] and instruction.alpha == 1.0


class StandIn:
    """The part of a client's model that the reuse path touches: which adapter is set."""

    def __init__(self) -> None:
        self.set: dict[str, object] = {}

    def set_adapter(self, name: str, adapter: object) -> None:
        self.set[name] = adapter


def test_the_client_applies_the_weight_sent_without_a_validation_pass() -> None:
    cfg = make_state("server.auto.every=2").cfg
    own = {"m.lora_A.weight": np.ones((2, 3)), "m.lora_B.weight": np.zeros((3, 2))}
    mean = {"m.lora_A.weight": np.full((2, 3), 3.0), "m.lora_B.weight": np.ones((3, 2))}
    instruction = Instruction("a-0", 1, 3, None, True, True, False, mean=mean, alpha=0.25)
    reply = Reply("a-0", 1)
    model = StandIn()
    # No validation data at all: a validation pass would fail.
    adapter = choose_mix(cfg, model, "own", own, instruction, 2, None, reply)  # type: ignore[arg-type]
    assert reply.alpha == 0.25 and reply.val_losses is None
    np.testing.assert_allclose(adapter["m.lora_A.weight"], np.full((2, 3), 1.5))
    assert model.set["own"] is adapter
