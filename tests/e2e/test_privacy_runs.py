"""Client-side DP on the tiny model through the Simulation Engine: benchmarks/privacy.py's
reconstruction with and without noise, and each client's epsilon in a private run. The clip,
the noise and the accountant against hand computations: tests/unit/client/test_privacy.py."""

from __future__ import annotations

import math

import pytest

from mira.results.schema import RunLayout

pytest.importorskip("dp_accounting")


@pytest.mark.slow
def test_the_benchmark_on_the_tiny_model(privacy_bench, tiny_config, tmp_path):
    cfg = tiny_config("federation.rounds=2")
    assert cfg.server.graph == "tasks" and cfg.num_clients == 4
    plain = privacy_bench.run_one(
        cfg, tmp_path / "none", privacy_bench.Level("none", 0.0, 0.0), seed=1
    )
    # Without DP a client holds its neighbour's trained adapter (float32 rounding aside).
    assert plain["error_last"] < 1e-3 and plain["exact_max"] < 1e-3, plain
    clip = plain["update_norm_median"]
    noisy = privacy_bench.run_one(
        cfg, tmp_path / "dp", privacy_bench.Level("z=0.5", clip, 0.5), seed=1
    )
    # With DP it still recovers exactly what the neighbour uploaded, but that is the clipped
    # update plus noise of norm about z C sqrt(d) >> C: far from what the neighbour trained.
    assert noisy["exact_max"] < 1e-3, noisy
    assert noisy["error_last"] > 1.0, noisy
    assert math.isfinite(noisy["loss"]), noisy


@pytest.mark.slow
def test_a_private_run_reports_each_clients_epsilon(tiny_config, tmp_path):
    import json

    from mira.core.accounting import client_epsilon
    from mira.federation.simulation import run_simulation
    from mira.results.rundir import read_metrics

    cfg = tiny_config("privacy.clip_norm=0.05", "privacy.noise_multiplier=2.0")
    run_simulation(cfg, tmp_path)
    for row in read_metrics(tmp_path).clients:  # every client trains every round: one release
        assert row.epsilon == pytest.approx(client_epsilon(2.0, row.round, 1e-5))
    info = json.loads(RunLayout(tmp_path).run_info.read_text())
    assert info["privacy"]["epsilon_max"] == pytest.approx(client_epsilon(2.0, 2, 1e-5))
    assert set(info["privacy"]["epsilon"]) == set(cfg.client_ids)
    assert info["device"] == "cpu" and info["dtype"] == "float32"
