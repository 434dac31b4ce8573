"""The run directory: torn last lines, the run lock, checkpoints checked against damage.

Every damaged fixture is made here by cutting, editing or removing a file that RunWriter
wrote, and every error must name the file, say what to do, and leave every file in place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mira.config import load_config
from mira.results.errors import RunDirError, RunExistsError, RunInUseError
from mira.results.files import write_atomic, write_json
from mira.results.rundir import (
    Checkpoint,
    RunLock,
    RunWriter,
    check_new_run_dir,
    default_run_dir,
    disk_full_error,
    read_checkpoint,
    read_metrics,
    round_aggregate,
    truncate_metrics,
    write_checkpoint,
)
from mira.results.schema import (
    AdapterFiles,
    ClientRow,
    RunLayout,
    client_row,
    encode_row,
)

CLIENTS = ["a-0", "a-1", "b-0"]


def client_rows(rnd: int) -> list[ClientRow]:
    """Round ``rnd``: eval losses 1, 2, 4 (+ rnd), mix weights 0, 0.5, 1."""
    return [
        ClientRow(
            round=rnd,
            client=client,
            task=client[0],
            method="mira",
            rank=4,
            sampled=True,
            train_loss=3.0,
            eval_loss=[1.0, 2.0, 4.0][i] + rnd,
            bytes_up=10,
            bytes_down=20,
            peak_memory_mb=100.0 + i,
            mix_weight=[0.0, 0.5, 1.0][i],
        )
        for i, client in enumerate(CLIENTS)
    ]


CONFIG = load_config(None, ["federation.rounds=3"])


@pytest.fixture
def cfg():
    return CONFIG


def write_run(folder: Path, cfg, rounds: int) -> RunWriter:
    writer = RunWriter(folder, cfg)
    writer.write_config()
    for rnd in range(1, rounds + 1):
        writer.append_round(1.5, rnd, client_rows(rnd))
    return writer


def checkpoint(rnd: int, shift: float = 0.0) -> Checkpoint:
    adapters = {
        c: {
            "layer.lora_A": np.full((2, 3), i + shift, dtype=np.float32),
            "layer.lora_B": np.arange(6, dtype=np.float32).reshape(3, 2) * (i + 1),
        }
        for i, c in enumerate(CLIENTS)
    }
    return Checkpoint(
        round=rnd,
        client_ids=list(CLIENTS),
        ranks=[4, 4, 4],
        adapters=adapters,
        adjacency=np.array([[0, 0.5, 0], [0.5, 0, 0], [0, 0, 0]]),
        clusters=[0, 0, 1],
        graph_source="tasks",
        graph_info={"k": 2},
        server={"trained_round": rnd, "open_rows": [], "note": [1.5, None]},
        config=CONFIG.to_dict(),
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------------ metrics
def test_round_aggregate_numbers_and_mix_weight_mean(cfg, tmp_path: Path) -> None:
    writer = write_run(tmp_path, cfg, 1)
    (aggregate,) = read_metrics(tmp_path).rounds
    # eval losses 2, 3, 5
    assert aggregate.personalised_eval_loss_mean == pytest.approx(10 / 3)
    assert aggregate.personalised_eval_loss_worst == 5.0
    assert aggregate.personalised_eval_loss_std == pytest.approx(np.std([2.0, 3.0, 5.0]))
    assert aggregate.mix_weight_mean == pytest.approx(0.5)
    assert aggregate.bytes_up == 30 and aggregate.peak_memory_mb == 102.0
    unmixed = client_rows(1)[0]
    unmixed.mix_weight = None
    assert round_aggregate(1, "mira", 1.0, [unmixed]).mix_weight_mean is None
    # auto rows carry lists; a non-finite value becomes null, never an invalid NaN token
    rows = client_rows(2)
    rows[0].val_loss, rows[0].val_losses = math.nan, [1.0, math.inf]
    rows[0].candidates = [0.0, 0.5]
    writer.append_round(1.0, 2, rows)
    text = RunLayout(tmp_path).metrics.read_text()
    assert "NaN" not in text and "Infinity" not in text
    first = read_metrics(tmp_path).clients_of(2)[0]
    # a list keeps its null; an optional number present as null reads back as NaN
    assert first.val_losses == [1.0, None] and math.isnan(first.val_loss or 0.0)
    assert encode_row(first) == encode_row(rows[0])  # and writes the same line again
    writer.close()


@pytest.mark.parametrize(
    "torn",
    [b'{"kind": "client", "rou', b'{"kind": "round", "round": 3}', b"\x00\x00\x00garbage\n"],
    ids=["cut mid-line", "whole object but no newline", "not JSON, with newline"],
)
def test_a_torn_last_line_is_ignored_and_resume_rewrites_the_file_without_it(
    cfg, tmp_path: Path, torn: bytes, reliability
) -> None:
    write_run(tmp_path, cfg, 2).close()
    path = RunLayout(tmp_path).metrics
    whole = path.read_bytes()
    expected = read_metrics(tmp_path)
    assert len(expected.all()) == 2 * (len(CLIENTS) + 1)
    path.write_bytes(whole + torn)
    assert read_metrics(tmp_path) == expected
    truncate_metrics(tmp_path, 2)
    assert path.read_bytes() == whole
    reliability.record(
        f"a torn last line in metrics.jsonl ({torn[:24]!r}...)",
        "ignored by every reader; resuming rewrites the file without it, byte for byte",
        "2 of 2 kept",
    )


def test_a_bad_line_before_the_end_is_an_error_naming_the_file_and_line(
    cfg, tmp_path: Path
) -> None:
    write_run(tmp_path, cfg, 2).close()
    path = RunLayout(tmp_path).metrics
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2][:20] + "\n"
    path.write_text("".join(lines))
    before = path.read_bytes()
    with pytest.raises(RunDirError, match=r"metrics\.jsonl, line 3: .*Restore it from a copy"):
        read_metrics(tmp_path)
    with pytest.raises(RunDirError, match=r"line 3"):
        truncate_metrics(tmp_path, 1)
    assert path.read_bytes() == before  # nothing rewritten on error


def test_truncate_drops_rows_after_the_checkpoint_and_refuses_missing_rounds(
    cfg, tmp_path: Path
) -> None:
    write_run(tmp_path, cfg, 3).close()
    truncate_metrics(tmp_path, 2)
    assert {r.round for r in read_metrics(tmp_path).all()} == {1, 2}
    before = RunLayout(tmp_path).metrics.read_bytes()
    with pytest.raises(RunDirError, match=r"lacks the rows of round\(s\) 3.*lost rows"):
        truncate_metrics(tmp_path, 3)
    assert RunLayout(tmp_path).metrics.read_bytes() == before


# ------------------------------------------------------------------------------ the lock
def test_a_second_writer_into_the_same_folder_is_refused(cfg, tmp_path: Path, reliability) -> None:
    first = RunWriter(tmp_path, cfg)
    with pytest.raises(
        RunInUseError,
        match=rf"in use by another mira run, in progress there now \(pid {os.getpid()}",
    ):
        RunWriter(tmp_path, cfg)
    first.close()
    RunWriter(tmp_path, cfg).close()  # released: the next run may take it
    reliability.record(
        "two runs into one folder at once",
        "the second is refused (the run lock names the holder's pid); the first goes on",
        "the first's, untouched",
    )


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from mira.results.rundir import RunLock; "
            f"lock = RunLock({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=rf"pid {holder.pid} "):
            RunLock(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:  # the kernel releases a killed process's flock: no stale lock to clean up
        try:
            RunLock(tmp_path).release()
            break
        except RunInUseError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_new_run_is_refused_in_a_folder_that_holds_one(cfg, tmp_path: Path) -> None:
    check_new_run_dir(tmp_path / "fresh")  # does not exist: fine
    (tmp_path / "empty").mkdir()
    check_new_run_dir(tmp_path / "empty")
    write_run(tmp_path / "run", cfg, 1).close()
    with pytest.raises(RunExistsError, match=r"already holds a run.*--resume"):
        check_new_run_dir(tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match=r"is not empty \(notes\.txt\)"):
        check_new_run_dir(tmp_path / "other")


def test_default_run_folder_is_fresh_and_timestamped(tmp_path: Path) -> None:
    first = default_run_dir(tmp_path)
    assert first.parent == tmp_path and first.name.startswith("run-")
    assert len(first.name) == len("run-YYYYMMDD-HHMMSS") and first.name[12] == "-"
    first.mkdir()
    second = default_run_dir(tmp_path)
    assert second != first and not second.exists()


def test_atomic_writes_leave_no_partial_file_and_follow_the_umask(tmp_path: Path) -> None:
    path = write_atomic(tmp_path / "a.json", "{}\n")
    write_atomic(path, b"[]\n")
    assert path.read_bytes() == b"[]\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_records_hashes_and_the_metrics_round(cfg, tmp_path: Path) -> None:
    write_run(tmp_path, cfg, 1).close()
    saved = checkpoint(2)
    write_checkpoint(tmp_path, saved)
    state = json.loads(RunLayout(tmp_path).state.read_text())
    assert state["metrics_round"] == 1 and len(state["adapters_sha256"]) == 64
    named = RunLayout(tmp_path).checkpoint_adapters(2, state["adapters_sha256"])
    assert state["adapters_file"] == named.name
    loaded = read_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 2 and loaded.clusters == [0, 0, 1]
    assert loaded.server == saved.server and loaded.graph_info == {"k": 2}
    np.testing.assert_array_equal(loaded.adjacency, saved.adjacency)
    for client in CLIENTS:
        for key, value in saved.adapters[client].items():
            np.testing.assert_array_equal(loaded.adapters[client][key], value)


def test_a_checkpoint_rewritten_for_the_same_round_never_overwrites_the_committed_file(
    cfg, tmp_path: Path
) -> None:
    write_run(tmp_path, cfg, 2).close()
    write_checkpoint(tmp_path, checkpoint(2))
    write_checkpoint(tmp_path, checkpoint(2, shift=10.0))  # the final evaluation's checkpoint
    files = sorted(p.name for p in RunLayout(tmp_path).checkpoint.iterdir())
    assert len(files) == 2 and RunLayout(tmp_path).state.name in files  # the older one is gone
    loaded = read_checkpoint(tmp_path)
    assert loaded is not None
    assert float(loaded.adapters["a-0"]["layer.lora_A"][0, 0]) == 10.0


def test_no_checkpoint_yet_is_none(cfg, tmp_path: Path) -> None:
    RunWriter(tmp_path, cfg).close()
    assert read_checkpoint(tmp_path) is None


def _cut_adapters(folder: Path) -> None:
    path = RunLayout(folder).checkpoint_adapter_files()[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _remove_adapters(folder: Path) -> None:
    RunLayout(folder).checkpoint_adapter_files()[0].unlink()


def _bad_json(folder: Path) -> None:
    path = RunLayout(folder).state
    path.write_text(path.read_text()[:-10])


def _edit_round(folder: Path) -> None:
    path = RunLayout(folder).state
    state = json.loads(path.read_text())
    state["round"] += 1
    path.write_text(json.dumps(state))


def _drop_metrics_round(folder: Path) -> None:
    path = RunLayout(folder).metrics
    rows = [r for r in read_metrics(folder).all() if r.round == 1]
    path.write_text("".join(encode_row(r) + "\n" for r in rows))


def _remove_state(folder: Path) -> None:
    RunLayout(folder).state.unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_cut_adapters, r"adapters-r3-\w+\.safetensors does not match the sha256"),
        (_remove_adapters, r"adapters-r3-\w+\.safetensors is missing"),
        (_bad_json, r"state\.json is not valid JSON"),
        (_edit_round, r"state\.json was changed after mira wrote it"),
        (_drop_metrics_round, r"metrics\.jsonl lacks the rows of round\(s\) 2"),
        (_remove_state, r"state\.json is missing although metrics\.jsonl holds completed"),
    ],
    ids=["cut adapters", "missing adapters", "bad JSON", "edited round", "lost rows", "no state"],
)
def test_a_damaged_checkpoint_is_one_clear_error_and_nothing_is_deleted(
    cfg, tmp_path: Path, damage, message: str, reliability
) -> None:
    # checkpoint of round 3 taken after round 2's rows (round 3 trained, not yet evaluated)
    write_run(tmp_path, cfg, 2).close()
    write_checkpoint(tmp_path, checkpoint(3))
    assert read_checkpoint(tmp_path) is not None
    damage(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(RunDirError, match=message) as caught:
        read_checkpoint(tmp_path)
    assert "nothing was deleted" in str(caught.value).lower()
    assert "another --out" in str(caught.value)
    assert snapshot(tmp_path) == before
    reliability.record(
        f"a damaged checkpoint: {damage.__name__.strip('_').replace('_', ' ')}",
        "--resume stops with one error naming the file and what to do; nothing deleted",
        "2 of 2 kept",
    )


def test_a_crash_after_the_rows_but_before_the_checkpoint_resumes_cleanly(
    cfg, tmp_path: Path
) -> None:
    # checkpoint of round 2 recorded after round 1's rows; round 2's rows were then appended
    # and the process died before checkpoint 3: those rows are dropped on resume, not an error
    write_run(tmp_path, cfg, 1).close()
    write_checkpoint(tmp_path, checkpoint(2))
    writer = RunWriter(tmp_path, cfg)
    writer.append_round(1.0, 2, client_rows(2))
    writer.close()
    loaded = read_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 2
    truncate_metrics(tmp_path, 1)
    assert {r.round for r in read_metrics(tmp_path).all()} == {1}


def test_write_adapter_writes_a_peft_folder_atomically(cfg, tmp_path: Path) -> None:
    from peft import LoraConfig
    from safetensors.numpy import load_file

    from mira.client.sharing import PeftAdapterWriter

    writer = RunWriter(tmp_path, cfg, PeftAdapterWriter(cfg.model.name, cfg.lora, ""))
    adapter = {"base_model.model.layer.lora_A.weight": np.ones((4, 8), dtype=np.float32)}
    path = writer.write_adapter("a-0", adapter, 4)
    writer.close()
    files = AdapterFiles(path)
    assert sorted(p.name for p in path.iterdir()) == sorted([files.config.name, files.weights.name])
    np.testing.assert_array_equal(
        load_file(str(AdapterFiles(path).weights))["base_model.model.layer.lora_A.weight"],
        adapter["base_model.model.layer.lora_A.weight"],
    )
    config = LoraConfig.from_pretrained(str(path))
    assert config.r == 4 and config.lora_alpha == cfg.lora.alpha


def test_graph_json_and_png_are_written(cfg, tmp_path: Path) -> None:
    writer = RunWriter(tmp_path, cfg)
    clients = [SimpleNamespace(client_id=c, task=c[0]) for c in CLIENTS]
    graph = SimpleNamespace(
        adjacency=np.array([[0, 0.5, 0], [0.5, 0, 0], [0, 0, 0]]),
        clusters=[0, 0, 1],
        source="tasks",
        info={"k": 2},
    )
    writer.write_graph(clients, graph, 0.3, built_after=0)
    writer.close()
    payload = json.loads(RunLayout(tmp_path).graph.read_text())
    assert payload["degree"] == [0.5, 0.5, 0.0] and payload["k"] == 2
    assert RunLayout(tmp_path).graph_plot.stat().st_size > 1000


def test_the_writer_records_the_last_round_it_appended_or_finds(cfg, tmp_path: Path) -> None:
    writer = write_run(tmp_path, cfg, 2)
    writer.write_checkpoint(checkpoint(3))
    writer.close()
    state_path = RunLayout(tmp_path).state
    assert json.loads(state_path.read_text())["metrics_round"] == 2
    resumed = RunWriter(tmp_path, cfg)  # appends nothing before its first checkpoint
    resumed.write_checkpoint(checkpoint(3, shift=1.0))
    resumed.close()
    assert json.loads(state_path.read_text())["metrics_round"] == 2


# ------------------------------------------------------------------------------ integrity
def _recompute_state_hash(state: dict) -> None:
    """What a tool that knows the layout does after editing state.json: rehash it."""
    state.pop("state_sha256", None)
    state["state_sha256"] = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _edit_state(folder: Path, change) -> None:
    path = RunLayout(folder).state
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


def _scale_adapters(folder: Path, factor: float) -> None:
    from safetensors.numpy import load_file, save_file

    path = RunLayout(folder).checkpoint_adapter_files()[0]
    tensors = {k: v * factor for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"mira_round": "3"})


def _drop_state_hash(folder: Path) -> None:
    _edit_state(folder, lambda s: s.pop("state_sha256"))


def _drop_adapters_hash_and_rehash(folder: Path) -> None:
    _edit_state(folder, lambda s: (s.pop("adapters_sha256"), _recompute_state_hash(s)))


def _scale_adapters_x50_drop_both_hashes(folder: Path) -> None:
    _scale_adapters(folder, 50.0)
    _edit_state(folder, lambda s: (s.pop("adapters_sha256"), s.pop("state_sha256")))


def _scale_adapters_x50_drop_adapters_hash_and_rehash(folder: Path) -> None:
    _scale_adapters(folder, 50.0)
    _drop_adapters_hash_and_rehash(folder)


def _drop_metrics_round_and_rehash(folder: Path) -> None:
    _edit_state(folder, lambda s: (s.pop("metrics_round"), _recompute_state_hash(s)))


def _drop_recorded_config_and_rehash(folder: Path) -> None:
    _edit_state(folder, lambda s: (s.pop("config"), _recompute_state_hash(s)))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop_state_hash, r"state\.json has no state_sha256 entry"),
        (_drop_adapters_hash_and_rehash, r"state\.json has no adapters_sha256 entry"),
        (_scale_adapters_x50_drop_both_hashes, r"state\.json has no state_sha256 entry"),
        (
            _scale_adapters_x50_drop_adapters_hash_and_rehash,
            r"state\.json has no adapters_sha256 entry",
        ),
        (_drop_metrics_round_and_rehash, r"state\.json has no metrics_round entry"),
        (_drop_recorded_config_and_rehash, r"state\.json has no config entry"),
    ],
    ids=[
        "state hash removed",
        "adapters hash removed, state rehashed",
        "adapters x50, both hashes removed",
        "adapters x50, adapters hash removed, state rehashed",
        "metrics round removed, state rehashed",
        "recorded config removed, state rehashed",
    ],
)
def test_a_checkpoint_missing_an_entry_mira_always_writes_is_refused(
    cfg, tmp_path: Path, damage, message: str, reliability
) -> None:
    write_run(tmp_path, cfg, 2).close()
    write_checkpoint(tmp_path, checkpoint(3))
    damage(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(RunDirError, match=message) as caught:
        read_checkpoint(tmp_path)
    text = str(caught.value)
    assert "which mira always writes" in text and "nothing was deleted" in text
    assert "restore" in text and "another --out" in text
    assert snapshot(tmp_path) == before
    reliability.record(
        f"a checkpoint with an entry removed: {damage.__name__.strip('_').replace('_', ' ')}",
        "--resume stops with one error naming state.json and the missing entry; nothing deleted",
        "2 of 2 kept",
    )


def _edited_config(folder: Path, section: str, key: str, value) -> bytes:
    import tomllib

    import tomli_w

    path = RunLayout(folder).config
    raw = tomllib.loads(path.read_text())
    raw[section][key] = value
    path.write_text(tomli_w.dumps(raw))
    return path.read_bytes()


def test_an_edited_config_toml_is_refused_naming_the_keys(cfg, tmp_path: Path, reliability):
    write_run(tmp_path, cfg, 2).close()
    write_checkpoint(tmp_path, checkpoint(3))
    _edited_config(tmp_path, "server", "step", 0.9)
    _edited_config(tmp_path, "train", "learning_rate", 0.5)
    before = snapshot(tmp_path)
    with pytest.raises(RunDirError) as caught:
        read_checkpoint(tmp_path)
    text = str(caught.value)
    assert text.startswith(f"{RunLayout(tmp_path).config} differs from the config its checkpoint")
    assert "in server.step, train.learning_rate (" in text
    assert f"server.step 0.3 -> 0.9, train.learning_rate {cfg.train.learning_rate!r} -> 0.5" in (
        text
    )
    assert "may change only federation.rounds, federation.workers" in text
    assert "Nothing was deleted" in text and "another --out" in text
    assert snapshot(tmp_path) == before
    reliability.record(
        "config.toml edited between runs (server.step 0.3 -> 0.9, learning rate), then --resume",
        "refused in one error naming the file, each changed key with its old and new value, "
        "and the keys a resume may change; nothing deleted",
        "2 of 2 kept",
    )


def test_a_config_changed_only_where_a_resume_may_is_accepted(cfg, tmp_path: Path) -> None:
    write_run(tmp_path, cfg, 2).close()
    write_checkpoint(tmp_path, checkpoint(3))
    _edited_config(tmp_path, "federation", "rounds", 7)
    _edited_config(tmp_path, "federation", "round_timeout", 33.0)
    loaded = read_checkpoint(tmp_path)
    assert loaded is not None and loaded.config == cfg.to_dict()


def test_the_recorded_config_edited_and_rehashed_no_longer_matches_config_toml(
    cfg, tmp_path: Path
) -> None:
    write_run(tmp_path, cfg, 2).close()
    write_checkpoint(tmp_path, checkpoint(3))

    def step(state: dict) -> None:
        state["config"]["server"]["step"] = 0.1
        _recompute_state_hash(state)

    _edit_state(tmp_path, step)
    with pytest.raises(RunDirError, match=r"in server\.step \(server\.step 0\.1 -> 0\.3\)"):
        read_checkpoint(tmp_path)


def test_a_checkpoint_from_before_configs_were_recorded_still_resumes(cfg, tmp_path: Path):
    write_run(tmp_path, cfg, 2).close()
    write_checkpoint(tmp_path, checkpoint(3))
    _edit_state(tmp_path, lambda s: (s.pop("config"), s.pop("format"), _recompute_state_hash(s)))
    loaded = read_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 3 and loaded.config is None


def test_every_json_the_run_writes_is_strict(cfg, tmp_path: Path) -> None:
    """No bare NaN or Infinity anywhere: a non-finite number is written as null."""
    writer = write_run(tmp_path, cfg, 1)
    saved = checkpoint(2)
    row = client_rows(2)[0]
    row.epsilon, row.val_losses = math.inf, [1.0, math.nan]
    saved.server["open_rows"] = [row.to_dict()]
    saved.graph_info["silhouette"] = math.nan
    writer.write_checkpoint(saved)
    clients = [SimpleNamespace(client_id=c, task=c[0]) for c in CLIENTS]
    graph = SimpleNamespace(
        adjacency=saved.adjacency, clusters=[0, 0, 1], source="tasks", info={"ari": math.nan}
    )
    writer.write_graph(clients, graph, 0.3, built_after=0)
    writer.close()

    def refuse(token: str) -> None:
        raise AssertionError(f"bare {token}")

    for path in [RunLayout(tmp_path).graph, RunLayout(tmp_path).state]:
        json.loads(path.read_text(), parse_constant=refuse)
    for line in RunLayout(tmp_path).metrics.read_text().splitlines():
        json.loads(line, parse_constant=refuse)
    loaded = read_checkpoint(tmp_path)
    assert loaded is not None
    (restored,) = [client_row(r) for r in loaded.server["open_rows"]]
    assert math.isnan(restored.epsilon or 0.0) and restored.val_losses == [1.0, None]
    assert encode_row(restored) == encode_row(row)  # a restored open row writes the same line
    assert loaded.graph_info["silhouette"] is None
    with pytest.raises(ValueError, match="Out of range float"):
        write_json(RunLayout(tmp_path).run_info, {"epsilon": math.inf})


# ------------------------------------------------------------------------------ a live run
def test_a_new_run_into_a_folder_a_live_run_writes_is_told_a_run_is_in_progress(
    cfg, tmp_path: Path, reliability
) -> None:
    folder = tmp_path / "live"
    folder.mkdir()
    RunLayout(folder).config.write_text("# written by the live run before its first round\n")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from mira.results.rundir import RunLock; "
            f"lock = RunLock({str(folder)!r}); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError) as caught:
            check_new_run_dir(folder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    text = str(caught.value)
    assert f"in progress there now (pid {holder.pid} " in text
    assert "stopped before completing" not in text and "delete" not in text
    # Once its holder is gone, the folder is what it was: a run that never finished a round.
    deadline = time.monotonic() + 10
    while True:
        try:
            check_new_run_dir(folder)
        except RunInUseError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
            continue
        except RunExistsError as err:
            assert "stopped before completing its first round" in str(err)
            break
        raise AssertionError("a folder holding config.toml was accepted")
    reliability.record(
        "`mira run --out DIR` while another run writes DIR (before its first round)",
        "refused: a run is in progress there (its pid named), not told to delete the folder",
        "the live run's, untouched",
    )


# ------------------------------------------------------------------------------ a full disk
def test_a_full_disk_is_one_line_saying_the_checkpoint_is_intact(cfg, tmp_path: Path) -> None:
    write_run(tmp_path, cfg, 2).close()
    write_checkpoint(tmp_path, checkpoint(3))
    full = OSError(errno.ENOSPC, "No space left on device", str(RunLayout(tmp_path).metrics))
    error = disk_full_error(tmp_path, full)
    assert error is not None
    assert str(error) == (
        f"{tmp_path}: No space left on device writing {RunLayout(tmp_path).metrics}; the run "
        "stopped. Its last checkpoint (after round 3) is intact: free some space and continue "
        f"with `mira run --resume {tmp_path}`"
    )
    quota = disk_full_error(tmp_path, OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert quota is not None and str(quota).startswith(f"{tmp_path}: Disk quota exceeded; the run")
    assert disk_full_error(tmp_path, OSError(errno.EACCES, "Permission denied")) is None
    fresh = tmp_path / "fresh"
    RunWriter(fresh, cfg).close()
    early = disk_full_error(fresh, full)
    assert early is not None and "nothing to resume" in str(early)
