"""output.wandb without a W&B run: the settings, the error without the package, and the line a
run ends with. W&B's offline runs themselves: tests/e2e/test_wandb_runs.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mira.config import ConfigError, load_config
from mira.results.rundir import RunWriter
from mira.results.schema import RunLayout


def test_without_the_wandb_package_the_error_says_what_to_install(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    cfg = load_config(None, ["output.wandb=true"])
    with pytest.raises(ConfigError, match=r"pip install 'mira\[wandb\]'"):
        RunWriter(tmp_path, cfg)
    RunWriter(tmp_path, load_config(None)).close()  # the failed writer released the lock


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("output.wandb_project='team/mira'", r"not a W&B project name"),
        ("output.wandb_mode='cloud'", r"output.wandb_mode.*offline, online"),
    ],
)
def test_wandb_settings_are_checked(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_run_ends_with_one_line_per_logger_saying_where_and_how_to_sync(tmp_path: Path):
    from mira.results.rundir import logger_lines

    assert logger_lines(tmp_path, load_config(None)) == []
    both = load_config(None, ["output.wandb=true", "output.tensorboard=true"])
    tensorboard, wandb = logger_lines(tmp_path, both)
    assert str(RunLayout(tmp_path).tensorboard) in tensorboard
    assert "tensorboard --logdir" in tensorboard
    assert wandb.startswith("W&B (offline)") and f"wandb sync {tmp_path}/wandb/" in wandb
    online = load_config(None, ["output.wandb=true", "output.wandb_mode=online"])
    assert logger_lines(tmp_path, online)[0].startswith("W&B: project")
