"""A client's fingerprint with the tiny model: deterministic, unit norm, side-effect free.
Computed each time here (server.fingerprint_cache off); test_fingerprint_cache tests the cache."""

from __future__ import annotations

import numpy as np

from mira.client import learner
from mira.client.lora import lora_model
from mira.data import load_client_data
from mira.federation.client_app import client_fingerprint


def _encoded(cfg, partition):
    model = lora_model(cfg.model)
    data = load_client_data(cfg, partition)
    return [learner.encode(model.tokenizer, e, cfg.model.max_length) for e in data.train]


def test_fingerprint_is_deterministic_normalised_and_leaves_adapters_alone(tiny_config):
    cfg = tiny_config("server.fingerprint_dim=64", "server.fingerprint_cache=false")
    model = lora_model(cfg.model)
    own = model.activate(cfg.lora, cfg.lora.rank)
    rng = np.random.default_rng(0)
    adapter = {
        k: rng.normal(size=v.shape).astype(np.float32) * 0.01
        for k, v in model.get_adapter(own).items()
    }
    model.set_adapter(own, adapter)
    encoded = _encoded(cfg, 0)
    first = client_fingerprint(cfg, 0, model, encoded, None)
    again = client_fingerprint(cfg, 0, model, encoded, None)
    with_own = client_fingerprint(cfg, 0, model, encoded, own)
    assert first.shape == (64,)
    assert abs(np.linalg.norm(first) - 1.0) < 1e-12
    np.testing.assert_array_equal(first, again)
    # The client's own adapter takes part when named, and is not modified by it.
    assert not np.allclose(first, with_own)
    for key, value in model.get_adapter(own).items():
        np.testing.assert_array_equal(value, adapter[key])


def test_update_fingerprint_differs_from_gradient_and_is_deterministic(tiny_config):
    cfg = tiny_config(
        "server.fingerprint=update", "server.fingerprint_dim=32", "server.fingerprint_cache=false"
    )
    model = lora_model(cfg.model)
    encoded = _encoded(cfg, 2)
    one = client_fingerprint(cfg, 2, model, encoded, None)
    two = client_fingerprint(cfg, 2, model, encoded, None)
    np.testing.assert_array_equal(one, two)
    plain = tiny_config("server.fingerprint_dim=32", "server.fingerprint_cache=false")
    gradient = client_fingerprint(plain, 2, model, encoded, None)
    assert not np.allclose(one, gradient)
