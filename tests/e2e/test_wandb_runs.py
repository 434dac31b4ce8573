"""output.wandb: a Weights & Biases run with the scalars of metrics.jsonl and the config (W&B's
own service process, seconds a run: e2e; the settings: tests/unit/results/test_wandb.py).

Every test runs W&B offline (the default ``output.wandb_mode``), with no network and no
account, and reads what W&B stored back from its offline run files (``DIR/wandb/offline-run-*/
run-<id>.wandb``). wandb ships no reader for them, so :func:`wandb_records` decodes them here:
a LevelDB-style log (32 KiB blocks, records split across blocks) after a 7-byte W&B header,
each record one ``wandb_internal_pb2.Record`` protobuf. The expected values are read from
metrics.jsonl, not from the code that logged them.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mira.config import load_config
from mira.results.rundir import RunWriter, read_metrics
from mira.results.schema import ClientRow, RunLayout

HEADER, BLOCK = 7, 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
WANDB_KEYS = ("_step", "_runtime", "_timestamp")  # what W&B adds to every history row


@pytest.fixture(autouse=True)
def private_wandb(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """W&B's own settings and caches in a temporary folder, not the user's home."""
    home = tmp_path_factory.mktemp("wandb-home")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(home))
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the config's mode alone keeps it offline


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of one offline W&B run file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, payload = HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if position + HEADER + length > len(data):
            return  # a record still being written
        chunk = data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (FULL, FIRST):
            payload = chunk
        elif kind in (MIDDLE, LAST):
            payload += chunk
        if kind in (FULL, LAST):
            yield wandb_internal_pb2.Record.FromString(payload)


def run_files(folder: Path, count: int, timeout: float = 60.0) -> list[Path]:
    """The ``count`` offline run files of a run, once each ends with its exit record.

    wandb's service process can finish writing a file a moment after ``run.finish()`` has
    returned (seen when a resumed run starts within the same second as the first), so wait
    for it; a process that exits waits for the service anyway.
    """
    deadline = time.monotonic() + timeout
    while True:
        paths = sorted(RunLayout(folder).wandb.glob("offline-run-*/run-*.wandb"))
        kinds = [[r.WhichOneof("record_type") for r in wandb_records(p)] for p in paths]
        if len(paths) == count and all(k and k[-1] == "exit" for k in kinds):
            return paths
        assert time.monotonic() < deadline, f"W&B run files not complete: {kinds}"
        time.sleep(0.1)


def logged(
    folder: Path, count: int = 1
) -> tuple[dict[int, dict[str, float]], dict[str, Any], set[str]]:
    """(history by step, the run's config, run ids) over the ``count`` offline run files of a
    run (a resumed run adds one)."""
    history: dict[int, dict[str, float]] = {}
    config: dict[str, Any] = {}
    ids = set()
    for path in run_files(folder, count):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = record.history.item
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                step = int(row.pop("_step"))
                history.setdefault(step, {}).update(
                    {k: v for k, v in row.items() if k not in WANDB_KEYS}
                )
            elif kind == "run":
                ids.add(record.run.run_id)
                for item in record.run.config.update:
                    config[item.key] = json.loads(item.value_json)
    return history, config, ids


def expected_scalars(folder: Path) -> dict[int, dict[str, float]]:
    """What metrics.jsonl holds, as W&B should have it: ``round/<key>`` for the numbers of
    each round row, ``<client>/<key>`` for each client's losses, mix weight and metrics."""
    out: dict[int, dict[str, float]] = {}
    recorded = read_metrics(folder)
    for round_row in recorded.rounds:
        scalars = out.setdefault(round_row.round, {})
        scalars.update({f"round/{key}": value for key, value in round_row.scalars().items()})
    for row in recorded.clients:
        scalars = out.setdefault(row.round, {})
        scalars.update({f"{row.client}/{key}": value for key, value in row.scalars().items()})
    return out


def rows(rnd: int) -> list[ClientRow]:
    """Round ``rnd`` of three clients; b-0 has no eval loss, only a-0 a task metric."""
    return [
        ClientRow(
            round=rnd,
            client=client,
            task=client[0],
            method="mira",
            rank=4,
            sampled=True,
            train_loss=3.0 / rnd + i,
            eval_loss=None if client == "b-0" else 2.0 / rnd + 0.125 * i,
            bytes_up=10 * rnd,
            bytes_down=20,
            mix_weight=[0.0, 0.25, 0.5][i],
            metrics={"accuracy": 0.5 + 0.125 * rnd} if client == "a-0" else {},
        )
        for i, client in enumerate(["a-0", "a-1", "b-0"])
    ]


@pytest.mark.slow
def test_offline_run_holds_the_metrics_scalars_and_the_config_and_resumes(tmp_path: Path):
    cfg = load_config(None, ["output.wandb=true", "federation.rounds=3"])
    with RunWriter(tmp_path, cfg) as writer:
        writer.write_config()
        for rnd in (1, 2):
            writer.append_round(1.25, rnd, rows(rnd))
    # mira run --resume: a new writer on the same folder logs on under the same W&B run
    with RunWriter(tmp_path, cfg) as writer:
        writer.append_round(0.5, 3, rows(3))
    history, config, ids = logged(tmp_path, count=2)
    assert ids == {RunLayout(tmp_path).wandb_run_id.read_text().strip()}
    expected = expected_scalars(tmp_path)
    assert sorted(history) == [1, 2, 3]
    for step, scalars in expected.items():
        assert set(history[step]) == set(scalars), step
        assert history[step] == pytest.approx(scalars, rel=1e-12), step
    # spot checks against hand-computed numbers
    assert history[2]["a-1/eval_loss"] == 1.125 and "b-0/eval_loss" not in history[2]
    assert history[3]["round/personalised_eval_loss_mean"] == pytest.approx((2 / 3 + 19 / 24) / 2)
    assert history[1]["round/bytes_up"] == 30 and history[3]["a-0/accuracy"] == 0.875
    assert config == {**json.loads(json.dumps(cfg.to_dict())), "_wandb": config["_wandb"]}
    assert config["server"]["method"] == "mira" and config["output"]["wandb"] is True


@pytest.mark.slow
def test_a_simulated_run_logs_every_round_to_wandb_and_cards_its_adapters(tiny_config, tmp_path):
    """The real server (write_adapter, then append_round, every round) on the tiny model."""
    import wandb

    from mira.federation.simulation import run_simulation

    # The run's watchdog ends this process's helper processes when the run is over, and W&B's
    # service process of the tests above would be one of them: end it properly first.
    wandb.teardown()
    cfg = tiny_config("output.wandb=true")
    run_simulation(cfg, tmp_path)
    history, config, _ = logged(tmp_path)
    expected = expected_scalars(tmp_path)
    assert sorted(history) == list(range(1, cfg.federation.rounds + 1)) == sorted(expected)
    for step, scalars in expected.items():
        assert history[step] == pytest.approx(scalars, rel=1e-12)
    assert config["model"]["name"] == "tiny-random-llama"
    last = cfg.federation.rounds
    for row in read_metrics(tmp_path).clients_of(last):
        card = RunLayout(tmp_path).adapter(row.client).card.read_text()
        assert f"after round {last} of {last}" in card
        assert f"| eval loss (mean over target tokens) | {row.eval_loss:#.4g} |" in card
        assert f"| accuracy | {row.metrics['accuracy']:#.4g} |" in card
