"""The config schema: defaults, overrides, and a clear error for every bad value."""

from __future__ import annotations

import pytest

from mira.config import ConfigError, apply_overrides, config_from_dict, describe, load_config


def _raw(**sections):
    raw = {"tasks": [{"name": "a", "clients": 2}, {"name": "b", "clients": 1}]}
    raw.update(sections)
    return raw


def test_quickstart_is_valid_and_uses_the_packaged_model():
    cfg = load_config()
    assert cfg.model.name == "smollm2-135m-instruct"
    assert len(cfg.tasks) >= 2
    assert all(t.clients == 3 for t in cfg.tasks)
    assert cfg.server.method == "mira"


def test_defaults_and_client_order():
    cfg = config_from_dict(_raw())
    assert cfg.lora.rank == 8
    # [] = the family's attention projections: q, k, v and o for Llama (tests/test_archs.py).
    assert cfg.lora.target_modules == ()
    assert cfg.client_ids == ["a-0", "a-1", "b-0"]
    assert cfg.client_tasks == ["a", "a", "b"]
    assert cfg.num_clients == 3


def test_overrides_are_typed_as_toml():
    raw = apply_overrides(
        _raw(),
        [
            "server.method=fedit",
            "server.step=0.05",
            "lora.target_modules=['q_proj']",
            "tasks.1.clients=4",
            "model.name=tiny-random-llama",
        ],
    )
    cfg = config_from_dict(raw)
    assert cfg.server.method == "fedit"
    assert cfg.server.step == 0.05
    assert cfg.lora.target_modules == ("q_proj",)
    assert cfg.tasks[1].clients == 4
    assert cfg.model.name == "tiny-random-llama"


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert config_from_dict(_raw(lora={"alpha": 16})).lora.alpha == 16.0
    with pytest.raises(ConfigError, match=r"lora\.rank must be an integer"):
        config_from_dict(_raw(lora={"rank": 4.5}))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_raw(server={"methd": "mira"}), r"unknown key server\.methd; allowed keys: .*method"),
        (_raw(serv={"method": "mira"}), r"unknown section \[serv\]"),
        (
            _raw(server={"method": "fedprox"}),
            r"server\.method = 'fedprox' is not allowed; "
            r"choose one of: mira, fedit, cluster-fedavg, cluster-merge, local",
        ),
        (_raw(server={"step": -0.1}), r"server\.step must be >= 0"),
        (_raw(server={"auto_grid": [0.5, 1.5]}), r"server\.auto_grid\[1\] = 1\.5 must be in"),
        (_raw(server={"auto_smoothing": 1.0}), r"server\.auto_smoothing must be in \[0, 1\)"),
        (_raw(server={"auto_tolerance": -1.0}), r"server\.auto_tolerance must be a finite"),
        (_raw(federation={"metrics_every": 0}), r"federation\.metrics_every must be"),
        (_raw(server={"graph": "nope"}), r"server\.graph = 'nope' is not allowed"),
        (_raw(server={"pull_space": "dense"}), r"server\.pull_space = 'dense' is not allowed"),
        (_raw(federation={"fraction": 0.0}), r"federation\.fraction must be in \(0, 1\]"),
        (_raw(federation={"rounds": 0}), r"federation\.rounds must be > 0"),
        (_raw(lora={"target_modules": "q_proj"}), r"lora\.target_modules must be a list"),
        (_raw(lora={"dropout": 1.5}), r"lora\.dropout must be in \[0, 1\)"),
        ({"tasks": []}, r"at least one \[\[tasks\]\]"),
        ({"tasks": [{"name": "a"}, {"name": "a"}]}, r"tasks\[1\]\.name = 'a' is declared twice"),
        ({"tasks": [{"name": "a", "clients": 0}]}, r"tasks\[0\]\.clients must be > 0"),
        (
            {"tasks": [{"name": "a", "path": "x.jsonl", "kind": "regression"}]},
            r"tasks\[0\]\.kind = 'regression' is not allowed",
        ),
        ({"tasks": [{"name": "a", "colour": 1}]}, r"unknown key tasks\[0\]\.colour"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        apply_overrides(_raw(), ["server.method"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nmethod=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_reference_lists_every_fixed_key():
    keys = {row[0] for row in describe()}
    for key in [
        "model.name",
        "lora.rank",
        "lora.alpha",
        "lora.target_modules",
        "federation.rounds",
        "federation.local_steps",
        "federation.fraction",
        "federation.seed",
        "server.method",
        "server.step",
        "server.graph",
    ]:
        assert key in keys


def test_readme_config_reference_is_current():
    """The README table is `mira config --markdown`; regenerate it when the schema changes."""
    import io
    from contextlib import redirect_stdout
    from pathlib import Path

    from mira.cli import main

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        main(["config", "--markdown"])
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("<!-- config-reference:start -->")
    end = readme.index("<!-- config-reference:end -->")
    assert readme[start:end].split("\n", 1)[1].strip() == buffer.getvalue().strip()
