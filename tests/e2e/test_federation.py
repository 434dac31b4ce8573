"""Simulated federations with the tiny model, checked against an in-process replay.

Each method runs once per session on Flower's Simulation Engine (module fixture); the
assertions compare the adapters each client ends with.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mira.federation.simulation import run_simulation
from mira.results.rundir import read_metrics
from mira.results.schema import AdapterFiles, ClientRow, RunLayout
from replay import replay

pytestmark = pytest.mark.slow

RUNS = {
    "mira": ["server.method=mira", "output.tensorboard=true"],
    "fedit": ["server.method=fedit", "federation.metrics_every=2"],
    "local": ["server.method=local"],
    "cluster-fedavg": ["server.method=cluster-fedavg"],
    "mira-step0": ["server.method=mira", "server.step=0.0"],
    "mira-hetero": ["server.method=mira", "lora.ranks=[2, 4, 2, 4]"],
    "fedit-hetero": ["server.method=fedit", "lora.ranks=[2, 4, 2, 4]"],
    "mira-clusters": ["server.graph=clusters", "server.graph_refresh=1", "lora.ranks=[2, 4, 2, 4]"],
    # server.step = "auto" (tests at the end of this file)
    "mira-auto": [
        "server.step='auto'",
        "data.val_size=3",
        "server.auto.tolerance=0",
        "server.auto.evaluations=0",
    ],
    "mira-auto-hetero": ["server.step='auto'", "data.val_size=3", "lora.ranks=[2, 4, 2, 4]"],
    "auto-only-zero": [
        "server.step='auto'",
        "data.val_size=3",
        "server.auto.grid=[0.0]",
        "server.auto.equal_share=false",
    ],
    "local-val": ["server.method=local", "data.val_size=3"],
    "auto-only-equal-share": [
        "server.step='auto'",
        "data.val_size=3",
        "server.auto.grid=[]",
        "server.auto.equal_share=true",
    ],
    "cluster-fedavg-val": ["server.method=cluster-fedavg", "data.val_size=3"],
    # the defaults: a tolerance of 1, four candidates evaluated, the fifth read off the curve
    "mira-auto-tolerant": ["server.step='auto'", "data.val_size=3"],
    "mira-auto-pooled": ["server.step='auto'", "data.val_size=3", "server.auto.pool='cluster'"],
}


@pytest.fixture(scope="module")
def runs(tiny_config, tmp_path_factory):
    out = {}
    for name, overrides in RUNS.items():
        cfg = tiny_config(*overrides)
        folder = tmp_path_factory.mktemp(name)
        run_simulation(cfg, folder)
        out[name] = (cfg, folder)
    return out


def adapters_of(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    root = RunLayout(folder).adapters
    return {p.name: load_file(str(AdapterFiles(p).weights)) for p in sorted(root.iterdir())}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float = 0.0) -> bool:
    return set(a) == set(b) and all(np.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


def test_outputs_layout(runs):
    cfg, folder = runs["mira"]
    assert RunLayout(folder).config.is_file()
    graph = json.loads(RunLayout(folder).graph.read_text())
    assert graph["clients"] == cfg.client_ids
    assert graph["tasks"] == cfg.client_tasks
    adjacency = np.array(graph["adjacency"])
    assert adjacency.shape == (4, 4)
    np.testing.assert_allclose(adjacency, adjacency.T)
    rows = read_metrics(folder)
    client_rows = rows.clients
    assert len(client_rows) == cfg.num_clients * cfg.federation.rounds
    for row in client_rows:
        assert row.task == cfg.client_tasks[cfg.client_ids.index(row.client)]
        assert row.method == "mira"
        assert row.eval_loss is not None and row.train_loss is not None
        assert np.isfinite(row.eval_loss) and np.isfinite(row.train_loss)
        # One exchange per client per round: the adapter goes down once; the last round adds
        # the final evaluation's message.
        assert row.bytes_up > 0
        final = row.round == cfg.federation.rounds
        assert row.bytes_down == (2 if final else 1) * row.bytes_up
        assert row.mix_weight == pytest.approx(cfg.server.step)  # step * degree 1
    rounds = rows.rounds
    assert [r.round for r in rounds] == [1, 2]
    last = [r.eval_loss for r in rows.clients_of(2)]
    assert rounds[-1].personalised_eval_loss_mean == pytest.approx(np.mean(last))
    assert rounds[-1].personalised_eval_loss_worst == pytest.approx(max(last))
    assert rounds[-1].personalised_eval_loss_std == pytest.approx(np.std(last))


def test_task_metrics_follow_metrics_every_and_always_end_the_run(runs):
    every_round = read_metrics(runs["mira"][1]).clients
    assert all("accuracy" in r.metrics for r in every_round)
    cfg, folder = runs["fedit"]
    assert cfg.federation.metrics_every == 2
    rows = read_metrics(folder).clients
    assert all(r.eval_loss is not None for r in rows)
    assert not any("accuracy" in r.metrics for r in rows if r.round == 1)
    assert all("accuracy" in r.metrics for r in rows if r.round == cfg.federation.rounds)


def test_mira_gives_every_client_its_own_adapter(runs):
    mira = adapters_of(runs["mira"][1])
    fedit = adapters_of(runs["fedit"][1])
    names = sorted(mira)
    assert len(names) == 4
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not same(mira[a], mira[b], atol=1e-7), f"{a} and {b} are identical"
        assert not same(mira[a], fedit[a], atol=1e-7)


def test_fedit_leaves_all_clients_identical(runs):
    fedit = list(adapters_of(runs["fedit"][1]).values())
    for other in fedit[1:]:
        assert same(fedit[0], other)


def test_cluster_fedavg_members_share_their_cluster_model(runs):
    cf = adapters_of(runs["cluster-fedavg"][1])
    assert same(cf["polarity-0"], cf["polarity-1"])
    assert same(cf["subject-0"], cf["subject-1"])
    assert not same(cf["polarity-0"], cf["subject-0"], atol=1e-7)


def test_step_zero_equals_local(runs):
    local = adapters_of(runs["local"][1])
    step0 = adapters_of(runs["mira-step0"][1])
    for name in local:
        assert same(local[name], step0[name])


@pytest.mark.parametrize("method", ["local", "mira", "fedit", "cluster-fedavg"])
def test_simulation_equals_in_process_replay(runs, method):
    """local = training without communication; the rest = dense reference aggregation."""
    cfg, folder = runs[method]
    expected, expected_losses = replay(cfg)
    got = adapters_of(folder)
    for index, client in enumerate(cfg.client_ids):
        assert same(got[client], expected[index], atol=2e-5), client
    losses = {r.client: r.eval_loss for r in read_metrics(folder).clients_of(2)}
    for index, client in enumerate(cfg.client_ids):
        assert losses[client] == pytest.approx(expected_losses[index], abs=1e-4)


def assert_reloads_to_recorded_eval_loss(run: str, runs, partitions: tuple[int, ...]) -> None:
    """Each saved adapter, loaded by peft onto a fresh base model, gives the final eval loss
    that metrics.jsonl recorded for its client."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mira.client import learner
    from mira.client.base import model_source
    from mira.data import load_client_data

    cfg, folder = runs[run]
    recorded = {
        r.client: r.eval_loss for r in read_metrics(folder).clients_of(cfg.federation.rounds)
    }
    source = model_source(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    for partition in partitions:
        client = cfg.client_ids[partition]
        base = AutoModelForCausalLM.from_pretrained(source)
        model = PeftModel.from_pretrained(base, str(RunLayout(folder).adapter(client).dir))
        data = load_client_data(cfg, partition)
        encoded = [learner.encode(tokenizer, e, cfg.model.max_length) for e in data.eval]
        loss = learner.eval_loss(model, encoded, cfg.train.eval_batch_size, tokenizer.pad_token_id)
        assert loss == pytest.approx(recorded[client], abs=1e-5)


def test_saved_adapter_reloads_with_peft_to_the_recorded_eval_loss(runs):
    assert_reloads_to_recorded_eval_loss("mira", runs, (0, 3))


def product(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """B @ A of every module of a saved adapter."""
    return {
        key[: -len(".lora_A.weight")]: adapter[key.replace("lora_A", "lora_B")] @ adapter[key]
        for key in adapter
        if key.endswith(".lora_A.weight")
    }


@pytest.mark.parametrize("run", ["mira-hetero", "fedit-hetero"])
def test_mixed_ranks_keep_each_clients_rank(runs, run):
    cfg, folder = runs[run]
    for client, rank in zip(cfg.client_ids, cfg.lora.ranks, strict=True):
        settings = json.loads(RunLayout(folder).adapter(client).config.read_text())
        assert settings["r"] == rank
        adapter = adapters_of(folder)[client]
        for key, value in adapter.items():
            assert rank in value.shape, key
    rows = read_metrics(folder).clients
    assert {r.client: r.rank for r in rows} == dict(
        zip(cfg.client_ids, cfg.lora.ranks, strict=True)
    )


def test_mixed_rank_fedit_gives_each_rank_the_truncation_of_one_average(runs):
    """FlexLoRA: one averaged effective update s * B @ A; rank-4 clients share it (rank 4
    holds it exactly here), and the rank-2 clients hold its best rank-2 approximation."""
    cfg, folder = runs["fedit-hetero"]
    scale = {c: cfg.lora.alpha / r for c, r in zip(cfg.client_ids, cfg.lora.ranks, strict=True)}
    saved = {c: product(a) for c, a in adapters_of(folder).items()}
    for module in saved["polarity-1"]:
        effective = {c: scale[c] * saved[c][module].astype(np.float64) for c in saved}
        np.testing.assert_allclose(effective["subject-1"], effective["polarity-1"], atol=1e-6)
        np.testing.assert_allclose(effective["subject-0"], effective["polarity-0"], atol=1e-6)
        u, s, vt = np.linalg.svd(effective["polarity-1"])
        best2 = (u[:, :2] * s[:2]) @ vt[:2]
        np.testing.assert_allclose(effective["polarity-0"], best2, atol=1e-5)


def test_mixed_rank_adapters_reload_with_peft_to_the_recorded_eval_loss(runs):
    assert_reloads_to_recorded_eval_loss("mira-hetero", runs, (0, 1))


def test_cluster_graph_from_fingerprints_is_written_with_k_and_ari(runs):
    from mira.graph.clustering import adjusted_rand_index
    from mira.graph.sources import cluster_graph

    _cfg, folder = runs["mira-clusters"]
    graph = json.loads(RunLayout(folder).graph.read_text())
    clusters = graph["clusters"]
    assert graph["source"] == "clusters"
    assert graph["k"] == len(set(clusters)) >= 2
    assert graph["silhouette"] == graph["silhouette_by_k"][str(graph["k"])]
    task_ids = [0 if t == "polarity" else 1 for t in graph["tasks"]]
    assert graph["ari_vs_declared_tasks"] == pytest.approx(adjusted_rand_index(task_ids, clusters))
    adjacency = np.array(graph["adjacency"])
    if min(clusters.count(c) for c in set(clusters)) >= 2:
        np.testing.assert_allclose(adjacency, cluster_graph(clusters))
    assert adjacency.sum(axis=1).max() <= 1.0 + 1e-12
    # graph_refresh = 1 with 2 rounds: fingerprints were taken again after round 1.
    assert graph["built_after_round"] == 1
    assert RunLayout(folder).graph_plot.stat().st_size > 1000


def test_tensorboard_events_hold_the_metrics_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _cfg, folder = runs["mira"]
    events = EventAccumulator(str(RunLayout(folder).tensorboard))
    events.Reload()
    rows = read_metrics(folder)
    for row in rows.rounds:  # every number of the round row, at its round
        for key, value in row.scalars().items():
            event = next(e for e in events.Scalars(f"round/{key}") if e.step == row.round)
            assert event.value == pytest.approx(value, rel=1e-6), key
    client = rows.clients_of(2)[0]
    for key, value in client.scalars().items():
        last = events.Scalars(f"{client.client}/{key}")[-1]
        assert last.value == pytest.approx(value, rel=1e-6), key


# ---------------------------------------------------------------------------------- auto


def client_rows(folder: Path) -> list[ClientRow]:
    return read_metrics(folder).clients


def test_auto_choice_is_the_argmin_of_an_independent_replay(runs):
    """Every round, every client's choice is the argmin over its candidates of the validation
    loss (every candidate evaluated: server.auto.evaluations = 0), and the alpha it applies the
    moving average of its choices (server.auto.smoothing), recomputed here without Flower or
    mira.core; adapters match too."""
    cfg, folder = runs["mira-auto"]
    trace: list[dict] = []
    expected, expected_losses = replay(cfg, trace)
    rows = {(r.round, r.client): r for r in client_rows(folder)}
    for index, choice in enumerate(trace):
        server_round = index // cfg.num_clients + 1
        row = rows[(server_round, choice["client"])]
        assert row.alpha_choice == pytest.approx(choice["choice"], abs=1e-12)
        assert row.mix_weight == pytest.approx(choice["alpha"], abs=1e-12)
        assert row.candidates == pytest.approx(sorted(choice["losses"]))
        assert row.val_losses == pytest.approx(
            [choice["losses"][a] for a in sorted(choice["losses"])], abs=1e-5
        )
    assert {r.mix_weight for r in client_rows(folder)} - {0.0}, "auto never mixed"
    got = adapters_of(folder)
    for index, client in enumerate(cfg.client_ids):
        assert same(got[client], expected[index], atol=2e-5), client
        assert rows[(cfg.federation.rounds, client)].eval_loss == pytest.approx(
            expected_losses[index], abs=1e-4
        )


def test_auto_tolerance_choice_matches_an_independent_replay(runs):
    """The defaults (server.auto.tolerance = 1, 4 evaluations): every recorded validation
    loss, standard error, choice and applied alpha is what a replay computes from per-example
    losses (one forward pass per example, at 0, 1/4, 1/2 and 1; 3/4 from the cubic through
    their logarithms, written out), and the tolerance does move choices away from the argmin
    toward the equal-share point."""
    cfg, folder = runs["mira-auto-tolerant"]
    trace: list[dict] = []
    expected, expected_losses = replay(cfg, trace)
    rows = {(r.round, r.client): r for r in client_rows(folder)}
    moved = 0
    for index, choice in enumerate(trace):
        row = rows[(index // cfg.num_clients + 1, choice["client"])]
        order = sorted(choice["losses"])
        assert row.val_losses == pytest.approx([choice["losses"][a] for a in order], abs=1e-5)
        assert row.val_standard_errors == pytest.approx(
            [choice["errors"][a] for a in order], abs=1e-5
        )
        assert row.anchor == pytest.approx(0.5)  # two clients per task: one neighbour
        assert row.alpha_choice == pytest.approx(choice["choice"], abs=1e-12)
        assert row.mix_weight == pytest.approx(choice["alpha"], abs=1e-12)
        moved += row.alpha_choice != order[int(np.argmin(row.val_losses))]
    assert moved, "the tolerance never changed a choice: the test would not see it ignored"
    got = adapters_of(folder)
    for index, client in enumerate(cfg.client_ids):
        assert same(got[client], expected[index], atol=2e-5), client
        assert rows[(cfg.federation.rounds, client)].eval_loss == pytest.approx(
            expected_losses[index], abs=1e-4
        )


def test_auto_pooled_by_cluster_gives_a_cluster_one_weight_one_round_late(runs):
    """server.auto.pool = 'cluster': both clients of a task apply one weight, their equal
    share 1/2 while their cluster has not reported, then the candidate their pooled sums chose
    (the first decision is applied as it is); each still records its own validation losses."""
    _cfg, folder = runs["mira-auto-pooled"]
    rows = {(r.round, r.client): r for r in client_rows(folder)}
    for task in ("polarity", "subject"):
        first, second = (rows[(1, f"{task}-{i}")] for i in (0, 1))
        assert first.mix_weight == second.mix_weight == 0.5 and first.alpha_choice is None
        first, second = (rows[(2, f"{task}-{i}")] for i in (0, 1))
        assert first.mix_weight == second.mix_weight == first.alpha_choice
        assert first.mix_weight in (first.candidates or [])
        assert first.val_losses != second.val_losses


def test_auto_with_only_zero_is_local_training_exactly(runs):
    auto, local = runs["auto-only-zero"][1], runs["local-val"][1]
    assert all(r.mix_weight == 0.0 for r in client_rows(auto))
    for name, adapter in adapters_of(local).items():
        assert same(adapters_of(auto)[name], adapter)
    losses = {(r.round, r.client): r.eval_loss for r in client_rows(local)}
    for row in client_rows(auto):
        assert row.eval_loss == losses[(row.round, row.client)]


def test_auto_with_only_the_equal_share_is_cluster_fedavg(runs):
    """Two clients per task: the equal share 1/2 = (n - 1) / n is the cluster average."""
    auto, cluster = runs["auto-only-equal-share"][1], runs["cluster-fedavg-val"][1]
    assert all(r.mix_weight == 0.5 for r in client_rows(auto))
    expected = adapters_of(cluster)
    for name, adapter in adapters_of(auto).items():
        assert same(adapter, expected[name], atol=1e-6), name
    losses = {(r.round, r.client): r.eval_loss for r in client_rows(cluster)}
    for row in client_rows(auto):
        assert row.eval_loss == pytest.approx(losses[(row.round, row.client)], abs=1e-5)


def test_auto_with_mixed_ranks_keeps_ranks_and_reloads(runs):
    cfg, folder = runs["mira-auto-hetero"]
    for client, rank in zip(cfg.client_ids, cfg.lora.ranks, strict=True):
        for key, value in adapters_of(folder)[client].items():
            assert rank in value.shape, key
    assert all(0.0 <= r.mix_weight <= 1.0 for r in client_rows(folder))
    # After round 1 a message carries the neighbour's mean and not the client's own adapter,
    # which it holds: in product space the exact stacked product, here the one neighbour's
    # adapter (its own rank). Round 2's row also counts the final evaluation's message.
    rows = {(r.round, r.client): r for r in client_rows(folder)}
    for index, client in enumerate(cfg.client_ids):
        neighbour = cfg.client_ids[index ^ 1]  # its task's other client
        assert rows[(1, client)].bytes_down == rows[(1, client)].bytes_up
        assert rows[(2, client)].bytes_down == 2 * rows[(2, neighbour)].bytes_up
    assert_reloads_to_recorded_eval_loss("mira-auto-hetero", runs, (0, 1))


def test_auto_downlink_is_one_adapter_per_client_round_as_a_fixed_step(runs):
    """A client holds its own trained adapter: the message that lets it choose its mix
    carries only its neighbours' mean, and auto costs the downlink a fixed step does."""
    fixed = {(r.round, r.client): r.bytes_down for r in client_rows(runs["mira"][1])}
    for name in ("mira-auto", "mira-auto-tolerant"):
        cfg, folder = runs[name]
        for row in client_rows(folder):
            final = row.round == cfg.federation.rounds  # + the final evaluation's message
            assert row.bytes_down == (2 if final else 1) * row.bytes_up
            assert row.bytes_down == fixed[(row.round, row.client)]
