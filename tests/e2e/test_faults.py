"""A federation that survives its clients: faults injected by tests/faults.py into real
simulated runs of the tiny model. Each fault costs only its own client's round."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import faults
from mira.federation import simulation
from mira.federation.server import FederationError
from mira.results.rundir import read_checkpoint, read_metrics
from mira.results.schema import ClientRow, RunLayout

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parents[1]


@pytest.fixture
def faulty(monkeypatch):
    """Run simulations with tests/faults.py's ClientApp; return a function that sets faults."""
    monkeypatch.setattr(simulation, "client_app", faults.faulty_app)
    # The Simulation Engine's worker processes import tests/faults.py by name.
    paths = [str(TESTS), *filter(None, [__import__("os").environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", ":".join(paths))

    def set_faults(*entries: dict) -> None:
        monkeypatch.setenv(faults.FAULTS, json.dumps(list(entries)))

    return set_faults


def rows_of(folder: Path) -> dict[tuple[int, str], ClientRow]:
    return {(r.round, r.client): r for r in read_metrics(folder).clients}


def strict_json_lines(folder: Path) -> None:
    """metrics.jsonl is valid JSON: no bare NaN or Infinity anywhere."""

    def refuse(token: str) -> None:
        raise AssertionError(f"metrics.jsonl holds {token}")

    for line in RunLayout(folder).metrics.read_text().splitlines():
        json.loads(line, parse_constant=refuse)


def assert_kept_its_adapter(rows: dict, client: str, server_round: int) -> None:
    """A client that did not train in a round (and under MIRA is not pulled then) holds the
    same adapter after it as before: the same eval loss."""
    assert rows[(server_round, client)].train_loss is None
    assert rows[(server_round, client)].mix_weight == 0.0
    before = rows[(server_round - 1, client)].eval_loss
    if before is not None:  # else it travelled with the failed exchange and was lost
        assert rows[(server_round, client)].eval_loss == pytest.approx(before, abs=1e-6)
    assert rows[(server_round, client)].eval_loss is not None


@pytest.mark.parametrize(
    ("kind", "status", "reason"),
    [
        ("raise", "failed", "injected fault"),
        ("nan", "rejected", "NaN or infinite"),
        ("shape", "rejected", "with shape"),
        ("huge", "rejected", "update norm"),
        ("nan_loss", "rejected", "non-finite train_loss (nan)"),
    ],
)
def test_a_bad_client_costs_only_its_own_round(
    faulty, tiny_config, tmp_path, kind, status, reason, reliability
):
    faulty({"client": "polarity-1", "round": 2, "kind": kind})
    cfg = tiny_config("federation.rounds=3")
    simulation.run_simulation(cfg, tmp_path)
    rows = rows_of(tmp_path)
    assert sorted(rows) == sorted((r, c) for r in (1, 2, 3) for c in cfg.client_ids)
    bad = rows[(2, "polarity-1")]
    assert bad.status == status and "polarity-1" in bad.reason and reason in bad.reason
    assert all(r.status == "ok" for key, r in rows.items() if key != (2, "polarity-1"))
    assert_kept_its_adapter(rows, "polarity-1", 2)
    # A refused update still brought round 1's evaluation; a failed exchange lost it.
    assert (rows[(1, "polarity-1")].eval_loss is None) == (status == "failed")
    assert rows[(3, "polarity-1")].train_loss is not None  # asked again, trained again
    # The round's mean train loss is the others' (finite), never blanked by the bad client.
    aggregate = read_metrics(tmp_path).round_row(2)
    others = [rows[(2, c)].train_loss for c in cfg.client_ids if c != "polarity-1"]
    assert aggregate is not None
    assert aggregate.train_loss_mean == pytest.approx(np.mean(others))
    strict_json_lines(tmp_path)
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint is not None
    largest = max(float(np.abs(v).max()) for a in checkpoint.adapters.values() for v in a.values())
    assert math.isfinite(largest) and largest < 100.0
    for client in cfg.client_ids:
        saved = load_file(str(RunLayout(tmp_path).adapter(client).weights))
        assert all(np.all(np.isfinite(v)) for v in saved.values())
    reliability.record(
        FAULT_NAMES[kind],
        f"status {status} ({bad.reason}); the client kept its adapter, trained again in round 3",
        "3 of 3",
        tmp_path,
    )


FAULT_NAMES = {
    "raise": "a client raises in round 2 of 3",
    "nan": "a client returns a NaN adapter",
    "shape": "a client returns a tensor of the wrong shape",
    "huge": "a client returns a finite but huge update (x 1e30)",
    "nan_loss": "a client reports a NaN train loss (its adapter finite)",
}


def test_a_non_finite_evaluation_is_a_failure_never_averaged(
    faulty, tiny_config, tmp_path, reliability
):
    # The message of round 3 evaluates round 2's adapter: its NaN loss is refused.
    faulty({"client": "subject-0", "round": 3, "kind": "nan_eval"})
    cfg = tiny_config("federation.rounds=3")
    simulation.run_simulation(cfg, tmp_path)
    rows = rows_of(tmp_path)
    assert rows[(3, "subject-0")].status == "failed"
    assert "non-finite evaluation" in rows[(3, "subject-0")].reason
    assert rows[(2, "subject-0")].eval_loss is None  # not measured, not NaN
    aggregate = read_metrics(tmp_path).round_row(2)
    others = [rows[(2, c)].eval_loss for c in cfg.client_ids if c != "subject-0"]
    assert aggregate is not None
    assert aggregate.personalised_eval_loss_mean == pytest.approx(np.mean(others))
    strict_json_lines(tmp_path)
    reliability.record(
        "a client reports a NaN eval loss",
        "status failed (non-finite evaluation); its loss is null, left out of the mean",
        "3 of 3",
        tmp_path,
    )


def test_a_hung_client_times_out_and_the_run_ends_in_bounded_time(
    faulty, tiny_config, tmp_path, reliability
):
    faulty({"client": "subject-1", "round": 2, "kind": "hang", "seconds": 120})
    cfg = tiny_config("federation.rounds=3", "federation.round_timeout=10", "federation.workers=2")
    started = time.monotonic()
    simulation.run_simulation(cfg, tmp_path)
    elapsed = time.monotonic() - started
    rows = rows_of(tmp_path)
    assert rows[(2, "subject-1")].status == "timeout"
    assert "federation.round_timeout = 10s" in rows[(2, "subject-1")].reason
    assert rows[(3, "subject-1")].status == "ok"
    assert_kept_its_adapter(rows, "subject-1", 2)
    assert elapsed < 110, f"the run waited for the hung client ({elapsed:.0f}s)"
    reliability.record(
        "a client hangs for 120 s (round_timeout 10 s)",
        f"status timeout; the run went on and ended in {elapsed:.0f} s",
        "3 of 3",
        tmp_path,
    )


def test_a_client_stuck_every_round_does_not_hold_up_the_clients_queued_behind_it(
    faulty, tiny_config, tmp_path, reliability
):
    """One client process for all four clients (federation.workers = 1): the stuck client is
    abandoned at its deadline and the clients queued after it on that worker still answer."""
    stuck = "polarity-0"
    faulty(*[{"client": stuck, "round": r, "kind": "hang", "seconds": 3600} for r in (1, 2, 3)])
    cfg = tiny_config("federation.rounds=3", "federation.round_timeout=15")
    assert cfg.federation.workers == 1
    started = time.monotonic()
    simulation.run_simulation(cfg, tmp_path)
    elapsed = time.monotonic() - started
    rows = rows_of(tmp_path)
    assert sorted(rows) == sorted((r, c) for r in (1, 2, 3) for c in cfg.client_ids)
    for server_round in (1, 2, 3):
        assert rows[(server_round, stuck)].status == "timeout"
        assert "federation.round_timeout = 15s" in rows[(server_round, stuck)].reason
        assert rows[(server_round, stuck)].train_loss is None
        for client in cfg.client_ids:
            if client != stuck:
                row = rows[(server_round, client)]
                assert row.status == "ok", row
                assert row.train_loss is not None and row.eval_loss is not None
    reliability.record(
        "a client sleeps forever in every round, all clients on one worker (workers = 1, "
        "round_timeout 15 s)",
        f"status timeout for it in rounds 1 to 3; every other client ok in every round; the run "
        f"ended in {elapsed:.0f} s",
        "3 of 3",
        tmp_path,
    )


def test_first_contact_is_bounded_by_the_connect_timeout_not_the_round_timeout(
    faulty, tiny_config, tmp_path, reliability
):
    # Answering the identify query includes loading the base model, which on a busy machine
    # takes longer than a round of the tiny model: it is bounded by federation.timeout.
    faulty({"client": "*", "round": 0, "kind": "hang", "seconds": 8})
    cfg = tiny_config("federation.rounds=1", "federation.round_timeout=6", "federation.workers=2")
    simulation.run_simulation(cfg, tmp_path)
    rows = rows_of(tmp_path)
    assert sorted(rows) == [(1, c) for c in sorted(cfg.client_ids)]
    assert all(r.status == "ok" for r in rows.values())
    reliability.record(
        "every client takes 8 s to answer first contact (round_timeout 6 s)",
        "all identified (first contact waits up to federation.timeout); round 1 ok",
        "1 of 1",
        tmp_path,
    )


def test_too_few_replies_stop_the_run_with_its_checkpoint_intact(
    faulty, tiny_config, tmp_path, reliability
):
    faulty(
        {"client": "polarity-0", "round": 2, "kind": "raise"},
        {"client": "polarity-1", "round": 2, "kind": "raise"},
    )
    cfg = tiny_config("federation.rounds=3", "federation.min_replies=0.75")
    needs = r"only 2 of 4 clients replied usably, federation\.min_replies needs 3"
    with pytest.raises(FederationError, match=needs):
        simulation.run_simulation(cfg, tmp_path)
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.round == 1
    assert not RunLayout(tmp_path).metrics.exists()  # round 1 was not closed yet
    faulty()  # the clients are back
    simulation.run_simulation(cfg, tmp_path, resume=True)
    assert {r.round for r in read_metrics(tmp_path).all()} == {1, 2, 3}
    reliability.record(
        "2 of 4 clients raise in round 2 (min_replies 0.75)",
        "the run stopped naming both clients, checkpoint of round 1 intact; --resume finished it",
        "1 of 3, then 3 of 3 after resume",
        tmp_path,
    )


def test_a_resumed_run_with_a_fault_equals_the_uninterrupted_one(
    faulty, tiny_config, tmp_path, reliability
):
    from mira.results.diff import run_differences

    faulty({"client": "polarity-1", "round": 2, "kind": "raise"})
    whole = tmp_path / "whole"
    simulation.run_simulation(tiny_config("federation.rounds=3"), whole)
    parts = tmp_path / "parts"
    simulation.run_simulation(tiny_config("federation.rounds=2"), parts)
    simulation.run_simulation(tiny_config("federation.rounds=3"), parts, resume=True)
    found = run_differences(whole, parts)
    assert found.pairs == 12 and found.eval_loss == 0.0 and found.adapter == 0.0
    assert rows_of(parts)[(2, "polarity-1")].status == "failed"
    reliability.record(
        "a fault, then the run stopped and resumed",
        "the resumed run equals the uninterrupted one (mira diff: 0 over 12 eval losses and "
        "every adapter)",
        "3 of 3",
        parts,
    )


def test_each_client_receives_only_its_own_task(tiny_config, tmp_path, monkeypatch):
    """Least information: no message names another task, its data path or the ranks list."""
    monkeypatch.setattr(simulation, "client_app", faults.view_checking_app)
    paths = [str(TESTS), *filter(None, [__import__("os").environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", ":".join(paths))
    cfg = tiny_config("federation.rounds=1", "lora.ranks=[2, 4, 2, 4]")
    others = {
        str(p): [
            text
            for t in cfg.tasks
            if t.name != cfg.client_tasks[p]
            for text in (f'"name": "{t.name}"', t.path)
        ]
        for p in range(cfg.num_clients)
    }
    monkeypatch.setenv(faults.OTHER_TASKS, json.dumps(others))
    simulation.run_simulation(cfg, tmp_path)
    rows = rows_of(tmp_path)
    assert len(rows) == 4 and all(r.status == "ok" for r in rows.values())
    assert {r.client: r.rank for r in rows.values()} == dict(
        zip(cfg.client_ids, cfg.lora.ranks, strict=True)
    )


def test_handlers_share_one_worker_thread_until_one_is_abandoned():
    """Every message of a client process runs on the same thread (one malloc arena, so freed
    activations are not kept once per thread); a handler past its deadline retires that
    thread, is told it is cancelled, and the next message runs on a fresh one."""
    from mira.federation import client_app

    def where() -> int:
        return threading.get_ident()

    first = client_app._run_on_worker(where, limit=30)
    second = client_app._run_on_worker(where, limit=30)
    assert first.done.is_set() and second.done.is_set()
    assert first.reply == second.reply != threading.get_ident()

    release = threading.Event()
    seen: dict[str, object] = {}

    def stuck() -> int:
        release.wait(30)
        try:
            client_app._check_not_cancelled()
        except TimeoutError as err:
            seen["cancelled"] = str(err)
        return threading.get_ident()

    abandoned = client_app._run_on_worker(stuck, limit=0.2)
    assert not abandoned.done.is_set() and abandoned.cancelled.is_set()
    after = client_app._run_on_worker(where, limit=30)
    assert after.done.is_set() and after.reply != first.reply
    release.set()
    assert abandoned.done.wait(30)
    assert "abandoned at its deadline" in str(seen["cancelled"])

    def fails() -> int:
        raise ValueError("bad adapter")

    failed = client_app._run_on_worker(fails, limit=30)
    assert isinstance(failed.error, ValueError) and failed.reply is None
    assert client_app._run_on_worker(where, limit=30).reply == after.reply
