"""pyproject.toml's ``[tool.flwr.app.config]`` table, generated from the schema.

Flower's SuperLink refuses a ``--run-config`` key the app does not declare, so the table declares
the ServerApp's own keys and every key of the mira config, each '' (left as the config file has
it). ``python -m mira.config.pyproject`` prints the table; ``--write`` puts it into
./pyproject.toml in place of the one there: run it after adding, renaming or removing a key
(tests/unit/config/test_config_pyproject.py fails until then).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mira.config.schema import SECTIONS, leaves

HEADER = "[tool.flwr.app.config]"

# The ServerApp's own keys (mira.federation.server_app reads them): name, default, comment.
APP_KEYS: tuple[tuple[str, str | bool, str], ...] = (
    (
        "config",
        "",
        "Path to a mira TOML config, on the server machine; empty means the packaged quickstart.",
    ),
    (
        "overrides",
        "",
        "Semicolon-separated `section.key=value` overrides, e.g. "
        '"federation.rounds=2;tasks.0.clients=3".',
    ),
    (
        "out",
        "runs/flwr",
        "Output directory, new or empty (or the run to resume): metrics, graph, adapters, report.",
    ),
    ("resume", False, "Continue the run in `out` after its last checkpointed round."),
    (
        "verbose",
        False,
        "Show the libraries' warnings and progress bars; else they go to `out`/library.log.",
    ),
)

CONFIG_KEYS_COMMENT = """\
Every key of the mira config (`mira config` lists each with its default and meaning), so
that `flwr run . --run-config "federation.rounds=2 server.method='fedit'"` sets them as
FlowerTune apps' keys are set. "" leaves a key as `config` has it; any other value overrides
it after `overrides`, read and checked exactly as `mira run --set` (a list goes in quotes:
"lora.ranks='[4, 8]'"). The [[tasks]] entries are set through `overrides`."""


def table() -> str:
    """The table, its header line first, each section's keys a block of their own."""
    lines = [HEADER]
    for key, default, comment in APP_KEYS:
        value = str(default).lower() if isinstance(default, bool) else json.dumps(default)
        lines += [f"# {comment}", f"{key} = {value}"]
    lines += [f"# {line}" for line in CONFIG_KEYS_COMMENT.splitlines()]
    blocks = [
        [f'{key} = ""' for key, _field, _default in leaves(section, cls())]
        for section, cls in SECTIONS.items()
    ]
    lines += blocks[0]
    for block in blocks[1:]:
        lines += ["", *block]
    return "\n".join(lines) + "\n"


def _span(text: str) -> tuple[int, int]:
    """Where the table lies in pyproject.toml's ``text``: from its header line to the blank
    lines before the next table (or the end)."""
    start = text.index(f"\n{HEADER}\n") + 1
    end = text.find("\n[", start)
    end = len(text) if end < 0 else end + 1
    return start, start + len(text[start:end].rstrip("\n")) + 1


def current(text: str) -> str:
    """The table as pyproject.toml's ``text`` has it."""
    start, end = _span(text)
    return text[start:end]


def updated(text: str) -> str:
    """pyproject.toml's ``text`` with :func:`table` in place of its table."""
    start, end = _span(text)
    return text[:start] + table() + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mira.config.pyproject",
        description="Print pyproject.toml's [tool.flwr.app.config] table, generated from the "
        "mira config schema.",
    )
    parser.add_argument(
        "--write",
        nargs="?",
        const="pyproject.toml",
        metavar="PYPROJECT",
        help="replace the table in PYPROJECT (default: ./pyproject.toml) instead",
    )
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(table())
        return 0
    path = Path(args.write)
    text = path.read_text()
    if updated(text) == text:
        print(f"{path}: {HEADER} is current")
    else:
        path.write_text(updated(text))
        print(f"{path}: {HEADER} rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
