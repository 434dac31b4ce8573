"""A client's first-contact fingerprint kept in its cache: the same bits as computing it, read
back on the same key only, recomputed when the file is damaged, never an error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mira.client import learner
from mira.client.fingerprint_cache import cached_fingerprint, fingerprint_key
from mira.client.lora import lora_model
from mira.data import load_client_data
from mira.federation import client_app


def _encoded(cfg, partition):
    model = lora_model(cfg.model)
    data = load_client_data(cfg, partition)
    return [learner.encode(model.tokenizer, e, cfg.model.max_length) for e in data.train]


def _key(cfg, partition, encoded):
    return fingerprint_key(cfg, partition, lora_model(cfg.model).base, encoded)


def test_computed_once_then_read_back(tmp_path: Path) -> None:
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.array([0.6, 0.8])

    first = cached_fingerprint("k", compute, str(tmp_path))
    again = cached_fingerprint("k", compute, str(tmp_path))
    np.testing.assert_array_equal(first, again)
    assert len(calls) == 1
    assert [p.name for p in (tmp_path / "fingerprints").iterdir()] == ["k.npy"]


@pytest.mark.parametrize("damage", [b"", b"\x93NUMPY garbage", None])
def test_a_damaged_file_is_computed_again_and_replaced(tmp_path: Path, damage) -> None:
    folder = tmp_path / "fingerprints"
    folder.mkdir()
    if damage is None:  # readable, but not a fingerprint
        np.save(folder / "k.npy", np.array([np.nan, 1.0]))
    else:
        (folder / "k.npy").write_bytes(damage)
    vector = cached_fingerprint("k", lambda: np.array([1.0, 0.0]), str(tmp_path))
    np.testing.assert_array_equal(vector, [1.0, 0.0])
    np.testing.assert_array_equal(np.load(folder / "k.npy"), [1.0, 0.0])


def test_a_cache_that_cannot_be_written_costs_the_computation_only(tmp_path: Path) -> None:
    (tmp_path / "fingerprints").write_text("a file where the folder would be")
    vector = cached_fingerprint("k", lambda: np.array([1.0]), str(tmp_path))
    np.testing.assert_array_equal(vector, [1.0])
    assert (tmp_path / "fingerprints").read_text() == "a file where the folder would be"


def test_the_key_follows_what_the_fingerprint_depends_on_only(tiny_config) -> None:
    cfg = tiny_config()
    encoded = _encoded(cfg, 0)
    key = _key(cfg, 0, encoded)
    # Another rule, step, length of run or timeout: the same fingerprint, the same key.
    for same in (
        "server.method=cluster-fedavg",
        "server.step=0.1",
        "federation.rounds=7",
        "federation.round_timeout=99",
    ):
        assert _key(tiny_config(same), 0, encoded) == key, same
    # Anything it is computed from: another key.
    for other in (
        "server.fingerprint_batches=3",
        "server.fingerprint_rank=2",
        "server.fingerprint_dim=32",
        "server.fingerprint=update",
        "federation.seed=2",
        "lora.alpha=4",
        "train.batch_size=3",
        "model.max_length=48",
    ):
        assert _key(tiny_config(other), 0, encoded) != key, other
    assert _key(cfg, 1, encoded) != key  # another partition (its data order's seed)
    assert _key(cfg, 0, encoded[1:]) != key  # other tokens


def test_the_model_files_are_part_of_the_key(tiny_config) -> None:
    cfg = tiny_config()
    encoded = _encoded(cfg, 0)
    key = _key(cfg, 0, encoded)
    folder = Path(lora_model(cfg.model).base.source)
    config = folder / "config.json"
    before = config.stat()
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    try:
        assert _key(cfg, 0, encoded) != key
    finally:
        os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert _key(cfg, 0, encoded) == key


def test_a_cached_fingerprint_is_the_computed_one_bit_for_bit(tiny_config, monkeypatch) -> None:
    cfg = tiny_config("server.fingerprint_dim=64", "federation.seed=11")
    model = lora_model(cfg.model)
    encoded = _encoded(cfg, 1)
    computed = client_app.client_fingerprint(
        tiny_config(
            "server.fingerprint_dim=64", "federation.seed=11", "server.fingerprint_cache=false"
        ),
        1,
        model,
        encoded,
        None,
    )
    first = client_app.client_fingerprint(cfg, 1, model, encoded, None)  # computes and stores

    def no_computation(*args, **kwargs):
        raise AssertionError("the stored fingerprint was not read")

    monkeypatch.setattr(client_app, "_fingerprint", no_computation)
    read = client_app.client_fingerprint(cfg, 1, model, encoded, None)
    np.testing.assert_array_equal(first, computed)
    np.testing.assert_array_equal(read, computed)
    assert read.dtype == computed.dtype
    # A refresh (the client's own adapter active) is never cached.
    own = model.activate(cfg.lora, cfg.lora.rank)
    with pytest.raises(AssertionError, match="not read"):
        client_app.client_fingerprint(cfg, 1, model, encoded, own)
