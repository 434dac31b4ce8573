"""Shared fixtures: a tiny random model cached once per session, and tiny user tasks; and the
order the tests are handed to `make unit`'s two workers in.

tests/ and every folder of test modules under it are on ``sys.path``: the helpers here
(faults.py, replay.py) and a test module's helpers import by their module name from any folder
(``from test_compare import write_fake_run``), which is why every file name under tests/ is
unique (tests/README.md)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from mira.config import Config, apply_overrides, config_from_dict
from mira.results.schema import RunLayout

TESTS = Path(__file__).resolve().parent
for _folder in [TESTS, *sorted({p.parent for p in TESTS.rglob("test_*.py")})]:
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

POSITIVE = ["good", "great", "lovely", "superb", "fine", "bright", "warm", "happy"]
NEGATIVE = ["bad", "awful", "dull", "poor", "grim", "sad", "cold", "weak"]
SPORT = ["match", "goal", "team", "league", "coach", "race", "score", "player"]
SCIENCE = ["atom", "cell", "orbit", "energy", "theory", "lab", "gene", "planet"]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mira cache for the whole session, so the tiny model is built once."""
    path = tmp_path_factory.mktemp("mira-cache")
    os.environ["MIRA_CACHE"] = str(path)
    return path


def write_tiny_tasks(folder: Path) -> dict[str, Path]:
    """Two small classification tasks of different kinds, as user JSONL files in ``folder``
    (benchmarks/startup.py and benchmarks/overhead.py use them too)."""
    sentiment, topic = [], []
    for i in range(48):
        word = (POSITIVE if i % 2 == 0 else NEGATIVE)[i % 8]
        sentiment.append(
            {
                "input": f"the film was {word} and {word} again",
                "target": "positive" if i % 2 == 0 else "negative",
            }
        )
        noun = (SPORT if i % 2 == 0 else SCIENCE)[i % 8]
        topic.append(
            {
                "input": f"an article about the {noun} and the {noun}",
                "target": "sport" if i % 2 == 0 else "science",
            }
        )
    return {
        "polarity": _write_jsonl(folder / "polarity.jsonl", sentiment),
        "subject": _write_jsonl(folder / "subject.jsonl", topic),
    }


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small classification tasks of different kinds, as user JSONL files."""
    return write_tiny_tasks(tmp_path_factory.mktemp("tiny-tasks"))


def tiny_raw(tasks: dict[str, Path], cache: Path, clients: int = 2) -> dict:
    return {
        "model": {
            "name": "tiny-random-llama",
            "max_length": 32,
            "cache_dir": str(cache),
            "device": "cpu",  # the same numbers on a machine with a GPU
        },
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"batch_size": 4, "learning_rate": 0.01, "eval_batch_size": 8},
        "federation": {"rounds": 2, "local_steps": 2, "seed": 7, "workers": 1},
        "server": {"method": "mira", "step": 0.3, "graph": "tasks"},
        "data": {"train_size": 8, "eval_size": 4},
        "tasks": [
            {
                "name": "polarity",
                "clients": clients,
                "path": str(tasks["polarity"]),
                "kind": "classification",
                "verbalisers": ["positive", "negative"],
            },
            {
                "name": "subject",
                "clients": clients,
                "path": str(tasks["subject"]),
                "kind": "classification",
                "verbalisers": ["sport", "science"],
            },
        ],
    }


@pytest.fixture(scope="session")
def tiny_config(cache_dir: Path, tiny_tasks: dict[str, Path]):
    """Factory: the tiny config with 'section.key=value' overrides applied."""

    def make(*overrides: str, clients: int = 2) -> Config:
        return config_from_dict(
            apply_overrides(tiny_raw(tiny_tasks, cache_dir, clients), overrides)
        )

    return make


SHARED_MODULES = ("test_archs_runs", "test_chat_template", "test_export", "test_federation")
"""Modules whose tests share module-scoped fixtures that take long to build (simulated runs of
the tiny model, a loaded model): under `make unit` each runs on one worker, in one piece."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow tests (a simulation, servers) first, so that under `make unit` the quick ones
    fill in at the end and both workers finish together; a stable order, so each module's
    tests stay in one piece."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make unit` (`pytest -n 2 --dist loadgroup`): every test is a unit of work of its own,
    but the tests of a :data:`SHARED_MODULES` module are one unit, so their fixtures are built
    once. (pytest-xdist's own groups mark each test's id, which this pytest no longer reads:
    the units are named here.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if Path(path).stem in SHARED_MODULES else nodeid

    return SharedModules(config, log)


@pytest.fixture(scope="module")
def privacy_bench():
    """benchmarks/privacy.py, imported under the name the Simulation Engine's workers use."""
    import importlib

    folder = str(TESTS.parent / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("privacy")
    finally:
        sys.path.remove(folder)


RELIABILITY_LOG = "MIRA_RELIABILITY_LOG"


class Reliability:
    """What a fault test saw, for docs/reliability.md (benchmarks/reliability.py runs the fault
    tests with MIRA_RELIABILITY_LOG set and turns these records into the table)."""

    def __init__(self, test: str):
        self.test = test

    def record(self, fault: str, happened: str, rounds: str, run_dir: Path | None = None) -> None:
        path = os.environ.get(RELIABILITY_LOG)
        if not path:
            return
        entry = {
            "fault": fault,
            "test": self.test,
            "happened": happened,
            "rounds": rounds,
            "adapters_lost": adapters_lost(run_dir) if run_dir is not None else 0,
        }
        with open(path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")


def adapters_lost(run_dir: Path) -> int:
    """Clients of the run whose saved adapter is missing, unreadable or not finite."""
    import numpy as np
    from safetensors.numpy import load_file

    config = RunLayout(run_dir).config
    if not config.is_file():
        return 0
    import tomllib

    raw = tomllib.loads(config.read_text())
    clients = [f"{t['name']}-{i}" for t in raw.get("tasks", []) for i in range(t["clients"])]
    lost = 0
    for client in clients:
        path = RunLayout(run_dir).adapter(client).weights
        try:
            tensors = load_file(str(path))
        except Exception:
            lost += 1
            continue
        if not all(np.all(np.isfinite(v)) for v in tensors.values()):
            lost += 1
    return lost


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Reliability:
    return Reliability(request.node.nodeid)
