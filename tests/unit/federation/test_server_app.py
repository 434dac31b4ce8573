"""The ServerApp's run config as `flwr run` delivers it, and the relay that carries a
ServerApp's progress and outcome back to `mira run`."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from mira.config import ConfigError, describe, load_config, read_raw
from mira.federation.progress import Progress
from mira.federation.relay import CALLS, RelayProgress, RelayReader
from mira.federation.server import FederationError
from mira.federation.server_app import WRAPPER_KEYS, as_override, read_run_config
from mira.results.errors import RunExistsError
from mira.results.schema import RunLayout

ROOT = Path(__file__).resolve().parents[3]


def flwr_run_config(*run_config: str) -> dict[str, Any]:
    """What the ServerApp's context.run_config holds after `flwr run . --run-config ...`:
    Flower's own parsing of the flag, fused with pyproject.toml's [tool.flwr.app.config]."""
    return get_fused_config_from_dir(ROOT, parse_config_args(list(run_config)))


def test_dotted_run_config_keys_override_the_config_like_set():
    run_config = flwr_run_config(
        "federation.rounds=2 server.method='fedit' lora.target_modules=\"['q_proj']\" "
        "lora.dropout=0.25 lora.rslora=true train.learning_rate=1e-05 server.step='auto'"
    )
    request = read_run_config(run_config)
    assert request.config is None and request.resume is False
    assert request.out_dir == Path("runs/flwr")
    cfg = request.load()
    expected = load_config(
        None,
        [
            "federation.rounds=2",
            "server.method=fedit",
            "lora.target_modules=['q_proj']",
            "lora.dropout=0.25",
            "lora.rslora=true",
            "train.learning_rate=1e-05",
            "server.step=auto",
        ],
    )
    assert cfg == expected
    assert (cfg.federation.rounds, cfg.server.method) == (2, "fedit")
    assert cfg.lora.target_modules == ("q_proj",) and cfg.lora.dropout == 0.25
    assert cfg.train.learning_rate == 1e-05 and cfg.server.step == "auto"
    # Keys left at '' keep the quickstart's values.
    quickstart = load_config(None)
    assert cfg.model == quickstart.model and cfg.data == quickstart.data


def test_dotted_keys_apply_after_overrides_and_over_the_config_file(tmp_path):
    raw = read_raw(None)
    raw["federation"].update(rounds=7, local_steps=3)
    config = tmp_path / "my.toml"
    config.write_text(tomli_w.dumps(raw))
    run_config = flwr_run_config(
        f'config="{config}" overrides="federation.rounds=5;federation.seed=4" '
        'federation.rounds=1 out="runs/x" resume=true'
    )
    request = read_run_config(run_config)
    assert request.overrides == ("federation.rounds=5", "federation.seed=4", "federation.rounds=1")
    assert request.out_dir == Path("runs/x") and request.resume is True
    cfg = dataclasses.replace(request, resume=False).load()  # resuming reads runs/x's config
    assert (cfg.federation.rounds, cfg.federation.local_steps, cfg.federation.seed) == (1, 3, 4)


def test_a_bad_dotted_value_fails_with_the_message_of_set():
    with pytest.raises(ConfigError) as by_set:
        load_config(None, ["federation.rounds=0"])
    with pytest.raises(ConfigError) as by_run_config:
        read_run_config(flwr_run_config("federation.rounds=0")).load()
    assert str(by_run_config.value) == str(by_set.value)
    with pytest.raises(ConfigError, match=r"server\.method"):
        read_run_config(flwr_run_config("server.method='fedavg'")).load()


def test_flower_refuses_a_key_the_app_does_not_declare():
    # The SuperLink checks --run-config keys against [tool.flwr.app.config] the same way.
    with pytest.raises(ValueError, match=r"federation\.roundz"):
        flwr_run_config("federation.roundz=2")


def test_pyproject_declares_every_config_key_empty():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    flat = flwr_run_config()
    dotted = {k: v for k, v in flat.items() if "." in k}
    keys = [key for key, _, _ in describe() if not key.startswith("tasks[]")]
    assert sorted(dotted) == sorted(keys), "pyproject.toml's [tool.flwr.app.config] is stale"
    assert set(dotted.values()) == {""}
    assert sorted(k for k in flat if "." not in k) == sorted(set(WRAPPER_KEYS) - {"relay"})
    assert declared["components"]["serverapp"] == "mira.federation.server_app:app"


def test_run_config_values_become_set_text():
    assert as_override("lora.rslora", True) == "lora.rslora=true"
    assert as_override("federation.rounds", 3) == "federation.rounds=3"
    assert as_override("train.learning_rate", 1e-05) == "train.learning_rate=1e-05"
    assert as_override("server.method", "fedit") == "server.method=fedit"
    assert as_override("lora.ranks", "[4, 8]") == "lora.ranks=[4, 8]"


def test_an_unknown_plain_key_is_refused():
    with pytest.raises(ConfigError, match="rounds"):
        read_run_config({"config": "", "rounds": 2})
    with pytest.raises(ConfigError, match="resume"):
        read_run_config({"resume": "maybe"})


class Recorder(Progress):
    """Records the Progress calls replayed on it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []


for _name in CALLS:
    setattr(Recorder, _name, lambda self, *args, _name=_name: self.calls.append((_name, args)))


def test_the_relay_replays_progress_and_raises_the_servers_exception(tmp_path):
    path = tmp_path / "relay.jsonl"
    sent = RelayProgress(path)
    recorder = Recorder()
    reader = RelayReader(path, recorder)
    reader.poll()  # nothing written yet
    sent.start_run(3, 2)
    sent.begin("round 2: train", 4)
    sent.advance(1, 4, 0.5)
    reader.poll()
    sent.advance(2, 4, None)
    sent.end()
    sent.round_done(2, 0.25, float("nan"), None, 1)
    sent.note("a note")
    sent.detail("a detail")
    sent.finish(FederationError("only 2 of 4 clients replied usably"))
    reader.poll()
    names = [name for name, _ in recorder.calls]
    assert names == [
        "start_run",
        "begin",
        "advance",
        "advance",
        "end",
        "round_done",
        "note",
        "detail",
    ]
    assert recorder.calls[2] == ("advance", (1, 4, 0.5))
    server_round, train_loss, eval_mean, eval_worst, failed = recorder.calls[5][1]
    assert (server_round, train_loss, eval_worst, failed) == (2, 0.25, None, 1)
    assert math.isnan(eval_mean)
    assert not reader.done
    assert isinstance(reader.error, FederationError)
    assert str(reader.error) == "only 2 of 4 clients replied usably"
    assert "raised in the ServerApp's process" in "".join(reader.error.__notes__)


def test_the_relay_keeps_the_error_type_of_the_results_package(tmp_path):
    path = tmp_path / "relay.jsonl"
    RelayProgress(path).finish(RunExistsError("runs/x already holds a run"))
    reader = RelayReader(path, Progress())
    reader.poll()
    assert type(reader.error) is RunExistsError and str(reader.error) == (
        "runs/x already holds a run"
    )


def test_a_finished_relay_is_done(tmp_path):
    path = tmp_path / "relay.jsonl"
    RelayProgress(path).finish()
    reader = RelayReader(path, Progress())
    reader.poll()
    assert reader.done and reader.error is None


def test_a_resumed_run_keeps_its_config_but_what_resuming_may_change(tmp_path):
    from mira.config import ConfigError, load_config, to_toml
    from mira.federation.server_app import RunRequest

    out = tmp_path / "run"
    out.mkdir()
    RunLayout(out).config.write_text(to_toml(load_config()))
    longer = RunRequest(None, ("federation.rounds=7",), out, resume=True).load()
    assert longer.federation.rounds == 7
    with pytest.raises(ConfigError, match="a resumed run keeps its config; only"):
        RunRequest(None, ("server.step=0.2",), out, resume=True).load()
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(to_toml(load_config(None, ["federation.rounds=9"])))
    assert RunRequest(str(resolved), (), out, resume=True).load().federation.rounds == 9
    resolved.write_text(to_toml(load_config(None, ["train.learning_rate=0.1"])))
    with pytest.raises(ConfigError, match=r"train\.learning_rate differ from the run"):
        RunRequest(str(resolved), (), out, resume=True).load()
