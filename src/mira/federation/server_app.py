"""The mira ServerApp: ``flwr run .`` (Simulation or Deployment Engine) and ``mira run`` both
run :func:`main`.

The run config (``[tool.flwr.app.config]`` in pyproject.toml, overridden by
``flwr run --run-config``) says what to run:

- ``config``: a mira TOML config file; '' is the packaged quickstart;
- ``overrides``: ``section.key=value`` overrides separated by ';';
- every mira key as ``section.key``, as FlowerTune apps take theirs
  (``--run-config "federation.rounds=2 server.method='fedit'"``): each one that is not ''
  overrides that key after ``overrides``, read and checked exactly as ``mira run --set``;
  '' (the declared default) leaves the key as the config file has it;
- ``out``: the run directory; ``resume``: continue the run there;
- ``verbose``: show the libraries' warnings, logs and progress bars as they come. Otherwise
  (:func:`library_log`) the ServerApp keeps them in the run directory's ``library.log``, the
  ClientApp drops them, and only errors and mira's own lines are shown (as ``mira run`` does
  without ``-v``).

``mira run`` also sets ``relay`` (:mod:`mira.federation.relay`): the ServerApp then reports its
progress and its outcome through that file, and ``mira run`` prints the final table and writes
the report. Without it (``flwr run``) the ServerApp does both itself after the last round.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mira.client.base import prepare_model
from mira.client.lora import check_target_modules
from mira.client.quiet import app_output
from mira.client.ranks import client_rank
from mira.config import (
    Config,
    ConfigError,
    check_resumable,
    load_config,
    load_resumed,
    load_run_config,
)
from mira.core import rules
from mira.federation.identity import client_table
from mira.federation.progress import Progress
from mira.federation.relay import RelayProgress
from mira.federation.server import run_federation
from mira.graph.build import static_graph
from mira.results.report import final_table, write_report
from mira.results.rundir import check_new_run_dir, logger_lines
from mira.results.schema import RunLayout

# Run-config keys that are not mira config keys (those are all 'section.key').
WRAPPER_KEYS = ("config", "overrides", "out", "resume", "verbose", "relay")
DEFAULT_OUT = "runs/flwr"

app = ServerApp()


@dataclass(frozen=True)
class RunRequest:
    """What a run config asks the ServerApp for."""

    config: str | None  # None: the packaged quickstart
    overrides: tuple[str, ...]  # 'section.key=value', applied in order
    out_dir: Path
    resume: bool
    verbose: bool = False

    def load(self) -> Config:
        """The config, overridden and validated (the errors of ``mira run --set``); resuming,
        the run's own config.toml with only what a resumed run may change."""
        if not self.resume:
            return load_config(self.config, self.overrides)
        stored = RunLayout(self.out_dir).config
        if self.config is None:
            return load_resumed(stored, self.overrides)
        cfg = load_config(self.config, self.overrides)  # mira run --resume passes it resolved
        check_resumable(load_run_config(stored), cfg)
        return cfg


def split_overrides(text: str) -> list[str]:
    """'a.b=1;c.d=x' -> ['a.b=1', 'c.d=x']."""
    return [part.strip() for part in text.split(";") if part.strip()]


def as_override(key: str, value: Any) -> str:
    """A run-config value as ``--set`` text: 'federation.rounds=2', 'server.method=fedit'.

    Flower parses run-config values as TOML (bool, int, float or str); a string is passed on
    as written, so a list or a quoted word arrives as ``--set`` would read it
    (``lora.target_modules="['q_proj']"``).
    """
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float):
        text = repr(value)
    else:
        text = str(value)
    return f"{key}={text}"


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "false"):
        return str(value).strip().lower() == "true"
    raise ConfigError(f"run config {key} = {value!r} must be true or false")


def read_run_config(run_config: Mapping[str, Any]) -> RunRequest:
    """The run config of a Flower run (wrapper keys and mira's own ``section.key`` keys)."""
    unknown = sorted(k for k in run_config if "." not in k and k not in WRAPPER_KEYS)
    if unknown:
        raise ConfigError(
            f"run config key(s) {', '.join(unknown)}: a key is one of {', '.join(WRAPPER_KEYS)} "
            "or a mira config key as section.key (mira config lists them)"
        )
    overrides = split_overrides(str(run_config.get("overrides", "")))
    overrides += [as_override(k, v) for k, v in run_config.items() if "." in k and v != ""]
    return RunRequest(
        config=str(run_config.get("config", "")) or None,
        overrides=tuple(overrides),
        out_dir=Path(str(run_config.get("out", "")) or DEFAULT_OUT),
        resume=_flag("resume", run_config.get("resume", False)),
        verbose=_flag("verbose", run_config.get("verbose", False)),
    )


def server_preflight(cfg: Config) -> str:
    """What the server can check before it contacts any client: the graph against the step,
    the base model (built or converted once, here), the LoRA target modules, every client's
    rank and the pull space, and the client table of ``federation.node_keys``. Returns the base
    model's local source."""
    client_table(cfg)
    static_graph(cfg)
    base_source = prepare_model(cfg.model)
    check_target_modules(cfg.model, cfg.lora)
    try:
        ranks = [client_rank(cfg, partition) for partition in range(cfg.num_clients)]
        rules.resolve_pull_space(cfg.server.pull_space, ranks)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return base_source


def serve(grid: Grid, request: RunRequest, progress: Progress) -> None:
    """Check what the server can, then run the federation into ``request.out_dir``."""
    cfg = request.load()
    if not request.resume:
        check_new_run_dir(request.out_dir)
    base_source = server_preflight(cfg)
    run_federation(
        grid, cfg, request.out_dir, base_source, resume=request.resume, progress=progress
    )


def report(out_dir: Path) -> None:
    """What ``mira run`` shows after a run: the final table, then report.md and report.html."""
    print(f"\n{final_table(out_dir)}", flush=True)
    path = write_report(out_dir)
    print(f"\nreport: {path} and {RunLayout(out_dir).report_html}", flush=True)
    config = RunLayout(out_dir).config
    if config.is_file():  # every run directory has one; a bare folder of metrics does not
        for line in logger_lines(out_dir, load_run_config(config)):
            print(line, flush=True)


@contextmanager
def library_log(request: RunRequest) -> Iterator[None]:
    """The libraries' output while the block runs, as :func:`~mira.client.quiet.app_output`
    says: unless ``request.verbose``, kept and then appended to the run directory's
    ``library.log``, if the block ran a run there (a refused ``out`` is left as it was; a run
    that failed before it began writes none)."""
    layout = RunLayout(request.out_dir)
    ours = request.resume or not layout.config.exists()  # else serve refuses the folder
    with tempfile.TemporaryFile("w+", encoding="utf-8") as held:
        try:
            with app_output(request.verbose, held):
                yield
        finally:
            if ours and layout.config.is_file() and held.tell():
                held.seek(0)
                with layout.library_log.open("a", encoding="utf-8") as log:
                    shutil.copyfileobj(held, log)


@app.main()
def main(grid: Grid, context: Context) -> None:
    relay_to = str(context.run_config.get("relay", ""))
    if not relay_to:  # flwr run: this process shows the run and reports on it
        request = read_run_config(context.run_config)
        with library_log(request):
            serve(grid, request, Progress())
            report(request.out_dir)
        return
    relay = RelayProgress(Path(relay_to))  # mira run: it shows the run and reports on it
    try:
        request = read_run_config(context.run_config)
        with library_log(request):
            serve(grid, request, relay)
    except Exception as err:
        relay.finish(err)
        raise
    relay.finish()
