"""pyproject.toml's [tool.flwr.app.config] table is generated from the config schema."""

from __future__ import annotations

import tomllib
from pathlib import Path

from mira.config import SECTIONS, describe
from mira.config.pyproject import current, main, table, updated

PYPROJECT = Path(__file__).parents[3] / "pyproject.toml"


def test_pyproject_holds_the_generated_table():
    """Regenerate it with `python -m mira.config.pyproject --write` after changing a key."""
    assert current(PYPROJECT.read_text()) == table()


def test_the_table_declares_every_config_key_empty_and_the_server_app_keys():
    declared = tomllib.loads(table())["tool"]["flwr"]["app"]["config"]
    dotted = {
        f"{section}.{key}{'.' + inner if inner else ''}": value
        for section in SECTIONS
        for key, table in declared[section].items()
        for inner, value in (table.items() if isinstance(table, dict) else [("", table)])
    }
    assert list(dotted) == [key for key, _, _ in describe() if not key.startswith("tasks[]")]
    assert set(dotted.values()) == {""}
    plain = {key: value for key, value in declared.items() if key not in SECTIONS}
    assert plain == {
        "config": "",
        "overrides": "",
        "out": "runs/flwr",
        "resume": False,
        "verbose": False,
    }


def test_write_replaces_a_stale_table_and_nothing_else(tmp_path, monkeypatch, capsys):
    text = PYPROJECT.read_text()
    stale = text.replace('lora.alpha = ""\n', "").replace('data.dir = ""', 'data.folder = ""')
    assert stale != text and updated(stale) == text
    monkeypatch.chdir(tmp_path)
    Path("pyproject.toml").write_text(stale)
    assert main(["--write"]) == 0
    assert Path("pyproject.toml").read_text() == text
    assert main(["--write"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "pyproject.toml: [tool.flwr.app.config] rewritten",
        "pyproject.toml: [tool.flwr.app.config] is current",
    ]
    assert main([]) == 0
    assert capsys.readouterr().out == table()
