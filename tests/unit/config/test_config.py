"""The config schema: defaults, overrides, and a clear error for every bad value."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import tomli_w

from mira.config import (
    OPERATIONAL_KEYS,
    RESUME_KEYS,
    SECTIONS,
    TASK_KINDS,
    TASK_METRICS,
    ConfigError,
    FixedStep,
    LearnedMix,
    TaskConfig,
    apply_overrides,
    config_from_dict,
    describe,
    load_config,
    load_run_config,
    to_toml,
)
from mira.config.schema import Bounds

ROOT = Path(__file__).parents[3]


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
    # [] = the family's attention projections: q, k, v and o for Llama
    # (tests/unit/client/test_archs.py).
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
        (
            _raw(server={"auto": {"grid": [0.5, 1.5]}}),
            r"server\.auto\.grid\[1\] = 1\.5 must be in",
        ),
        (_raw(server={"auto_smoothing": 1.0}), r"server\.auto\.smoothing must be in \[0, 1\)"),
        (_raw(server={"auto": {"tolerance": -1.0}}), r"server\.auto\.tolerance must be a finite"),
        (_raw(server={"auto": {"gird": [0.5]}}), r"unknown key server\.auto\.gird; .*auto\.grid\?"),
        (
            _raw(server={"auto": {"evaluations": 2}}),
            r"server\.auto\.evaluations must be 0 \(every candidate\) or at least 3, got 2",
        ),
        (
            _raw(server={"auto_tolerance": 0.0, "auto": {"tolerance": 1.0}}),
            r"server\.auto_tolerance and server\.auto\.tolerance are both given",
        ),
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
        ({"tasks": [{"clients": 2}]}, r"^tasks\[0\]\.name is required$"),
        ({"tasks": [{"name": "a", "rank": -1}]}, r"tasks\[0\]\.rank must be >= 0 \(0 = lora"),
        (_raw(lora={"rank_choices": []}), r"^lora\.rank_choices must list at least one rank$"),
        (_raw(lora={"ranks": [4, 0, 8]}), r"^lora\.ranks\[1\] = 0 must be > 0$"),
        (_raw(lora={"ranks": [4, 8]}), r"lora\.ranks has 2 entries but the tasks declare 3"),
        (_raw(server={"graph": "graph.txt"}), r"or a matrix file ending in \.json, \.csv or"),
        (_raw(model={"device": "cuda:0x"}), r"model\.device = 'cuda:0x' is not allowed"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_server_step_is_parsed_once_into_a_policy():
    assert config_from_dict(_raw(server={"step": 0.2})).server.policy == FixedStep(0.2)
    auto = config_from_dict(_raw(server={"step": "auto"}, data={"val_size": 2}))
    assert auto.server.policy == LearnedMix() == auto.server.auto
    # Rules without a step run unchanged from a config that says 'auto' (mira compare).
    fedit = config_from_dict(_raw(server={"step": "auto", "method": "fedit"}))
    assert fedit.server.policy == FixedStep(0.0)


def test_old_flat_auto_keys_load_into_the_server_auto_table(tmp_path):
    """Configs, overrides and run directories written before [server.auto] still load."""
    flat = {"auto_grid": [0.0, 1.0], "auto_equal_share": False, "auto_smoothing": 0.25}
    old = _raw(server={"step": "auto", **flat, "auto_tolerance": 0.0}, data={"val_size": 2})
    expected = LearnedMix(grid=(0.0, 1.0), equal_share=False, smoothing=0.25, tolerance=0.0)
    assert config_from_dict(old).server.policy == expected
    # An override in the old spelling lands in the table too (mira compare's variant names).
    changed = config_from_dict(apply_overrides(old, ["server.auto_tolerance=2"]))
    assert changed.server.policy == dataclasses.replace(expected, tolerance=2.0)
    # A run's config.toml written before the table computed with every candidate evaluated.
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(old))
    stored = load_run_config(path)
    assert stored.server.policy == dataclasses.replace(expected, evaluations=0)
    path.write_text(to_toml(stored))  # written back in the new form, it reads the same
    assert load_run_config(path) == stored
    archived = ROOT / "docs/results/archive/auto-iid/runs/mira/seed-1/config.toml"
    assert load_run_config(archived).server.policy == LearnedMix(evaluations=0)


def test_a_run_from_before_the_bound_stays_unbounded(tmp_path):
    # server.robust defaults to 2 now; a config.toml written before the key existed ran
    # every pull unbounded, so resuming or comparing it must not bound it silently.
    old = load_config().to_dict()
    del old["server"]["robust"]
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(old))
    assert load_config().server.robust == 2.0
    assert load_run_config(path).server.robust == 0.0
    assert load_run_config(path, ["server.robust=2"]).server.robust == 2.0
    path.write_text(to_toml(load_config()))  # written with the key, it keeps its value
    assert load_run_config(path).server.robust == 2.0


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
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    start = readme.index("<!-- config-reference:start -->")
    end = readme.index("<!-- config-reference:end -->")
    assert readme[start:end].split("\n", 1)[1].strip() == buffer.getvalue().strip()


@pytest.mark.parametrize(
    ("text", "inside", "outside"),
    [
        ("> 0", [1e-9, 1, 10**9], [0, -1e-9]),
        (">= 0", [0, 0.5], [-1e-9, -1]),
        ("> 1", [1 + 1e-9, 10], [1, 0]),
        ("[0, 1)", [0, 0.999], [-1e-9, 1]),
        ("(0, 1]", [1e-9, 1], [0, 1 + 1e-9]),
        ("(0, 1)", [0.5], [0, 1]),
        ("[0, 1]", [0, 1], [-0.5, 1.5]),
        (">= 0 (0 = off)", [0], [-1]),
    ],
)
def test_bounds_are_written_as_the_error_says_them(text, inside, outside):
    bounds = Bounds.parse(text)
    assert bounds.text == (f"in {text}" if text[0] in "[(" else text)
    assert [bounds.allows(v) for v in inside] == [True] * len(inside)
    assert [bounds.allows(v) for v in outside] == [False] * len(outside)
    with pytest.raises(ValueError, match="not written as"):
        Bounds.parse("positive")


def _keys_with(rule, sections=None):
    """(section, field name, type, the rule) of every key whose metadata declares ``rule``; a
    table within a section ([server.auto]) is a section of its own ('server.auto')."""
    found = []
    for section, cls in sections or [*SECTIONS.items(), ("tasks", TaskConfig)]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                found += _keys_with(rule, [(f"{section}.{f.name}", hints[f.name])])
            elif rule in f.metadata:
                found.append((section, f.name, hints[f.name], f.metadata[rule]))
    return found


def _class_of(section):
    """The dataclass of a section name of :func:`_keys_with` ('server.auto' included)."""
    first, *inner = section.split(".")
    cls = TaskConfig if first == "tasks" else SECTIONS[first]
    for name in inner:
        cls = typing.get_type_hints(cls)[name]
    return cls


def test_every_declared_bound_is_enforced_with_one_message_form():
    """Each key's bounds, declared in its field metadata, refuse a value outside them with one
    message form: '{key} must be {bounds}, got {value}', or '{key}[i] = {value} must be ...'."""
    declared = _keys_with("bounds")
    assert len(declared) == 47
    for section, name, annotation, bounds in declared:
        whole = int in (annotation, *typing.get_args(annotation))
        bad = next(
            v
            for v in (-1.5, -1, 0, 0.5, 1, 1.5)
            if not bounds.allows(v) and (v == int(v) or not whole)
        )
        bad = int(bad) if whole else float(bad)
        listed = typing.get_origin(annotation) is tuple
        raw = {"tasks": [{"name": "a", "clients": 1}]}
        if section == "tasks":
            raw["tasks"][0][name] = bad
            key = f"tasks[0].{name}"
        else:
            table = {name: [bad] if listed else bad}
            for part in reversed(section.split(".")[1:]):
                table = {part: table}
            raw[section.split(".")[0]] = table
            key = f"{section}.{name}"
        expected = (
            f"{key}[0] = {bad!r} must be {bounds.text}"
            if listed
            else f"{key} must be {bounds.text}, got {bad!r}"
        )
        with pytest.raises(ConfigError) as error:
            config_from_dict(raw)
        assert str(error.value) == expected


def test_every_default_lies_within_its_bounds():
    for section, name, _annotation, bounds in _keys_with("bounds"):
        default = getattr(_class_of(section)(), name)
        values = default if isinstance(default, tuple) else (default,)
        assert all(bounds.allows(v) for v in values), f"{section}.{name} = {default!r}"


def test_resume_and_operational_keys_come_from_the_roles_in_the_schema():
    assert OPERATIONAL_KEYS == (
        "federation.workers",
        "federation.timeout",
        "federation.round_timeout",
        "federation.min_replies",
        "federation.node_keys",
        "server.fingerprint_cache",
    )
    assert RESUME_KEYS[0] == "federation.rounds"
    assert RESUME_KEYS[1:] == OPERATIONAL_KEYS
    assert [(s, n, role) for s, n, _t, role in _keys_with("role")] == [
        ("federation", "rounds", "resumable"),
        ("federation", "workers", "operational"),
        ("federation", "timeout", "operational"),
        ("federation", "round_timeout", "operational"),
        ("federation", "min_replies", "operational"),
        ("federation", "node_keys", "operational"),
        ("server", "fingerprint_cache", "operational"),
    ]


def test_built_in_tasks_take_their_kinds_and_metrics_from_the_schema():
    from mira.data.tasks import REGISTRY

    tasks = [spec.task for spec in REGISTRY.values()]
    assert {task.kind for task in tasks} == set(TASK_KINDS)
    assert {metric for task in tasks for metric in task.metrics} == set(TASK_METRICS)
