"""One output policy for the apps, whichever command starts them (`flwr run` or `mira run`):
the ServerApp keeps the libraries' warnings, logs and progress bars in the run directory's
library.log and shows only errors and mira's own lines; the ClientApp drops them; the run
config's ``verbose`` shows them; and nothing they print carries ANSI colour codes when the
console is not a terminal (here: pytest captures it) or NO_COLOR is set."""

from __future__ import annotations

import collections
import io
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.common.logger import ConsoleHandler, console_handler
from flwr.common.logger import log as flower_log
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)
from huggingface_hub.utils import tqdm as hub_tqdm
from ray._private.log import PlainRayHandler as RayHandler
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from mira.client.quiet import LIBRARY_LOGGERS, app_output, plain_console, quiet_process
from mira.config import ConfigError
from mira.federation import client_app
from mira.federation.server_app import RunRequest, library_log, read_run_config
from mira.federation.simulation import _read_stream
from mira.results.schema import RunLayout

ESC = "\x1b["


def _write_to_stderr(msg: warnings.WarningMessage) -> None:
    """What Python does with a warning outside pytest (which records them instead)."""
    (msg.file or sys.stderr).write(warnings._formatwarnmsg(msg))  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def python_console(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Warnings printed as Python prints them; no colour forced by the environment; every
    switch the policy turns restored after the test."""
    monkeypatch.setattr(warnings, "_showwarnmsg_impl", _write_to_stderr)
    # The libraries' handlers hold the process's stderr (capfd reads its file descriptor),
    # not the stand-in pytest had put there when they were imported.
    for name in LIBRARY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if type(handler) in (logging.StreamHandler, RayHandler, ConsoleHandler):
                monkeypatch.setattr(handler, "stream", sys.__stderr__)
    for name in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "RAY_COLOR_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    flower = (console_handler.level, console_handler.colored)
    hf = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    hub_bars_off = are_progress_bars_disabled()
    # Start from a new process's levels: a ClientApp run in this process before (another
    # test) turned them down for the whole process, as it does in its own.
    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    enable_progress_bars()
    console_handler.setLevel(logging.INFO)
    console_handler.colored = True
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        yield
    console_handler.setLevel(flower[0])
    console_handler.colored = flower[1]
    hf_logging.set_verbosity(hf[0])
    if not hf[1]:
        hf_logging.disable_progress_bar()
    if hub_bars_off:
        disable_progress_bars()


def library_noise() -> None:
    """What the libraries say while a run works, as in a `flwr run . --stream` of the tiny
    model: a transformers deprecation (warning and log record), transformers' and the hub's
    progress bars and a plain tqdm bar (transformers' GGUF conversion) on stderr, Flower's
    warning, and one error from Flower."""
    warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
    hf_logging.get_logger("transformers.modeling_utils").warning("tied weights differ")
    for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
        pass
    for _ in tqdm(range(3), desc="Converting GGUF"):
        pass
    for _ in hub_tqdm(range(3), desc="Fetching files"):
        pass
    flower_log(logging.WARNING, "Since flwr 1.32, default simulated SuperNodes changed")
    flower_log(logging.ERROR, "a client raised")


def test_server_app_keeps_library_output_in_its_log_and_shows_errors_plain(capfd):
    log = io.StringIO()
    with app_output(verbose=False, log=log):
        print("round 1: 4/4 clients done", flush=True)  # mira's own line
        library_noise()
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    out, err = capfd.readouterr()
    console, kept = out + err, log.getvalue()
    assert "round 1: 4/4 clients done" in console
    for noise in ("is_gradient_checkpointing", "tied weights differ", "Converting GGUF"):
        assert noise not in console and noise in kept, noise
    assert "Since flwr 1.32" not in console and "WARNING flwr: Since flwr 1.32" in kept
    for bar in ("Loading weights", "Fetching files"):  # the libraries' own bars are off
        assert bar not in console + kept
    assert "a client raised" in console and "ERROR flwr: a client raised" in kept
    assert ESC not in console and ESC not in kept  # the console is no terminal here
    # Everything as it was, after.
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    assert (console_handler.level, console_handler.colored) == (logging.INFO, True)
    assert all(h.stream is not log for h in logging.getLogger("flwr").handlers)  # type: ignore[attr-defined]
    library_noise()
    assert "Loading weights" in "".join(capfd.readouterr())


def test_verbose_server_app_shows_library_output_as_it_comes(capfd):
    log = io.StringIO()
    with app_output(verbose=True, log=log):
        library_noise()
    console = "".join(capfd.readouterr())
    for noise in ("is_gradient_checkpointing", "tied weights differ", "Converting GGUF"):
        assert noise in console, noise
    for noise in ("Loading weights", "Fetching files", "Since flwr 1.32"):
        assert noise in console, noise
    assert log.getvalue() == "" and ESC not in console


def test_colour_only_on_a_terminal_without_no_color(monkeypatch, capfd):
    assert plain_console()  # pytest's captured streams are no terminal
    monkeypatch.setenv("FORCE_COLOR", "1")  # as on a terminal (rich reads it)
    assert not plain_console()
    with app_output(verbose=True, log=io.StringIO()):
        flower_log(logging.WARNING, "coloured")
    assert ESC in "".join(capfd.readouterr())
    monkeypatch.setenv("NO_COLOR", "1")
    assert plain_console()
    with app_output(verbose=True, log=io.StringIO()):
        flower_log(logging.WARNING, "plain")
    assert ESC not in "".join(capfd.readouterr())


def test_client_process_drops_library_output_and_errors_stay(capfd):
    quiet_process(verbose=False)
    quiet_process(verbose=False)  # every message calls it again
    with warnings.catch_warnings(record=True) as caught:
        library_noise()
    console = "".join(capfd.readouterr())
    assert not caught  # the FutureWarning was dropped
    for noise in ("tied weights differ", "Loading weights", "Fetching files", "Since flwr"):
        assert noise not in console, noise
    assert "a client raised" in console and ESC not in console


def test_client_app_reads_verbose_from_the_run_config(monkeypatch):
    seen: list[bool] = []
    monkeypatch.setattr(client_app, "quiet_process", seen.append)
    for run_config in ({}, {"verbose": False}, {"verbose": True}, {"verbose": "true"}):
        context = SimpleNamespace(run_config=run_config)
        reply = client_app.output_mod("msg", context, lambda msg, ctx: f"handled {msg}")  # type: ignore[arg-type]
        assert reply == "handled msg"
    assert seen == [False, False, True, True]


def test_run_config_verbose_is_a_flag():
    assert read_run_config({}).verbose is False
    assert read_run_config({"verbose": True}).verbose is True
    with pytest.raises(ConfigError, match="verbose"):
        read_run_config({"verbose": "loud"})


def _run(out: Path, said: str, resume: bool = False, starts: bool = True) -> None:
    """What the ServerApp does under :func:`library_log`: the run writes its config.toml
    first (unless it stops before), and a library warns."""
    with library_log(RunRequest(config=None, overrides=(), out_dir=out, resume=resume)):
        if starts:
            out.mkdir(exist_ok=True)
            RunLayout(out).config.write_text("")
        warnings.warn(said, FutureWarning, stacklevel=1)


def test_library_log_goes_into_the_run_directory_of_the_run_only(tmp_path):
    out = tmp_path / "run"
    _run(out, "first run")
    log = RunLayout(out).library_log
    assert log.read_text().splitlines()[0].endswith("FutureWarning: first run")
    _run(out, "resumed", resume=True)  # a resumed run adds to it
    said = [line.split("FutureWarning: ")[1] for line in log.read_text().splitlines()[::2]]
    assert said == ["first run", "resumed"]

    # A folder that holds a run is refused by the new run (serve raises): nothing written.
    other = tmp_path / "other"
    other.mkdir()
    RunLayout(other).config.write_text("")
    _run(other, "refused", starts=False)
    assert sorted(p.name for p in other.iterdir()) == ["config.toml"]

    # A run that stopped before it began (a config error) leaves no folder behind.
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError), library_log(RunRequest(None, (), fresh, False)):
        warnings.warn("noise", FutureWarning, stacklevel=1)
        raise ConfigError("server.method = 'x' is not a method")
    assert not fresh.exists()


def test_flower_cli_stream_is_plain_when_piped(monkeypatch, capsys):
    """`mira run -v` replays `flwr run`'s stream: its coloured lines arrive plain when the
    console is not a terminal, and the lines kept for an error message never carry codes."""

    stream = io.BytesIO(b"\x1b[92mINFO \x1b[0m:      Starting run\n")
    tail: collections.deque[str] = collections.deque(maxlen=5)
    _read_stream(stream, tail, verbose=True)
    assert capsys.readouterr().out == "INFO :      Starting run\n"
    assert list(tail) == ["INFO :      Starting run"]

    monkeypatch.setenv("FORCE_COLOR", "1")  # as on a terminal
    _read_stream(io.BytesIO(b"\x1b[92mINFO \x1b[0m: x\n"), tail, verbose=True)
    assert ESC in capsys.readouterr().out
    assert tail[-1] == "INFO : x"
