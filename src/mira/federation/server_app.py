"""The mira ServerApp, for ``flwr run .`` (Simulation or Deployment Engine) and ``mira run``.

Under ``flwr run`` the run config (``[tool.flwr.app.config]`` in pyproject.toml, or
``--run-config``) names the mira config file, overrides and output directory.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mira.client.model import check_target_modules, prepare_model
from mira.config import Config, load_config
from mira.federation.progress import Progress
from mira.federation.server import run_federation
from mira.results.rundir import check_new_run_dir

app = ServerApp()


def split_overrides(text: str) -> list[str]:
    """'a.b=1;c.d=x' -> ['a.b=1', 'c.d=x']."""
    return [part.strip() for part in text.split(";") if part.strip()]


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    source = str(run_config.get("config", "")) or None
    cfg = load_config(source, split_overrides(str(run_config.get("overrides", ""))))
    out_dir = Path(str(run_config.get("out", "runs/flwr")))
    resume = bool(run_config.get("resume", False))
    if not resume:
        check_new_run_dir(out_dir)
    base_source = prepare_model(cfg.model)
    check_target_modules(cfg.model, cfg.lora)
    run_federation(grid, cfg, out_dir, base_source, resume=resume)


def make_server_app(
    cfg: Config,
    out_dir: Path,
    base_source: str,
    errors: list[BaseException],
    resume: bool = False,
    progress: Progress | None = None,
) -> ServerApp:
    """A ServerApp bound to an already validated config; failures are kept in ``errors``
    so the caller can report them after the Simulation Engine has shut down."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        del context
        try:
            run_federation(grid, cfg, out_dir, base_source, resume=resume, progress=progress)
        except BaseException as err:
            errors.append(err)
            raise

    return bound
