"""Library output kept off the console: transformers', peft's, huggingface_hub's, Ray's and
Flower's progress bars, info logs and warnings, while mira's own lines stay. One policy for
every way mira runs, each with its ``verbose`` switch that shows everything as it comes:

- in mira's own process (``mira run``, ``mira export``): :func:`library_output` around the
  work, which drops them;
- in the ServerApp (``flwr run`` and ``mira run`` alike): :func:`app_output`, which writes them
  to a log the ServerApp keeps in the run directory; Flower's and the libraries' errors still
  reach the console;
- in the ClientApp: :func:`quiet_process`, which drops them for the whole process (a client
  has no run directory).

Where the console is not a terminal, or NO_COLOR is set (:func:`plain_console`), Flower's
logger and Ray's relayed client lines carry no ANSI colour codes.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, redirect_stderr
from typing import TextIO

LIBRARY_LOGGERS = ("transformers", "peft", "huggingface_hub", "ray", "flwr")
"""The loggers whose records the ServerApp keeps in its log (errors are shown as well)."""

DROPPED_WARNINGS: tuple[type[Warning], ...] = (FutureWarning, UserWarning, DeprecationWarning)
"""The warnings a ClientApp drops: what the libraries warn about their own future."""

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


@contextmanager
def library_output(verbose: bool) -> Iterator[list[warnings.WarningMessage]]:
    """Unless ``verbose``, keep transformers', peft's and huggingface_hub's progress bars,
    info logs and warnings off the console while the block runs; yields the warnings caught
    (empty when ``verbose``: they are shown as they come). Settings are restored after."""
    if verbose:
        yield []
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # Some bars are plain tqdm on stderr (transformers' GGUF conversion), outside both
        # libraries' switches.
        with (
            _no_progress_bars(),
            warnings.catch_warnings(record=True) as caught,
            redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("always")
            yield caught
    finally:
        hf_logging.set_verbosity(level)


@contextmanager
def app_output(verbose: bool, log: TextIO) -> Iterator[None]:
    """The ServerApp's console while the block runs. Unless ``verbose``: progress bars off;
    warnings, everything written to stderr (a plain tqdm bar, a client's stderr as Ray relays
    it) and the records of :data:`LIBRARY_LOGGERS` go to ``log``, and only those loggers'
    errors reach the console too. Where :func:`plain_console`, Flower's logger and Ray's
    client prefixes are not coloured. Settings are restored after."""
    with ExitStack() as stack:
        if plain_console():
            stack.enter_context(_plain_colours())
        if not verbose:
            stack.enter_context(_no_progress_bars())
            stack.enter_context(_library_loggers_into(log))
            stack.enter_context(redirect_stderr(log))
        yield


def quiet_process(verbose: bool) -> None:
    """The ClientApp's policy, for the whole process: unless ``verbose``, progress bars off,
    transformers' and Flower's logs below errors and :data:`DROPPED_WARNINGS` dropped; where
    :func:`plain_console`, Flower's logger not coloured. Calling it again changes nothing."""
    from flwr.common.logger import update_console_handler

    if plain_console():
        update_console_handler(colored=False)
    if verbose:
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    update_console_handler(level=logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    for category in DROPPED_WARNINGS:
        warnings.filterwarnings("ignore", category=category)


def plain_console() -> bool:
    """Whether this process must print no ANSI codes: NO_COLOR is set, or its stdout or stderr
    is not a terminal (rich decides, as for mira's live progress; FORCE_COLOR forces colour)."""
    from rich.console import Console

    consoles = [Console(file=stream) for stream in (sys.stdout, sys.stderr)]
    return any(console.no_color or not console.is_terminal for console in consoles)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars off while the block runs."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    bars, hub_bars_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()


@contextmanager
def _library_loggers_into(log: TextIO) -> Iterator[None]:
    """Every record of :data:`LIBRARY_LOGGERS` (INFO and above) also goes to ``log``; their
    console handlers show errors only."""
    into_log = logging.StreamHandler(log)
    into_log.setLevel(logging.INFO)  # Flower's logger passes DEBUG records on
    into_log.setFormatter(logging.Formatter(LOG_FORMAT))
    consoles = [
        (handler, handler.level)
        for name in LIBRARY_LOGGERS
        for handler in logging.getLogger(name).handlers
        if isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
    ]
    for handler, level in consoles:
        handler.setLevel(max(level, logging.ERROR))
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).addHandler(into_log)
    try:
        yield
    finally:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).removeHandler(into_log)
        for handler, level in consoles:
            handler.setLevel(level)


@contextmanager
def _plain_colours() -> Iterator[None]:
    """Flower's console handler uncoloured, and Ray's prefixes of the client lines it relays
    (``RAY_COLOR_PREFIX``, read by Ray at each line), while the block runs."""
    from flwr.common.logger import console_handler, update_console_handler

    coloured, ray_prefix = console_handler.colored, os.environ.get("RAY_COLOR_PREFIX")
    update_console_handler(colored=False)
    os.environ["RAY_COLOR_PREFIX"] = "0"
    try:
        yield
    finally:
        update_console_handler(colored=coloured)
        if ray_prefix is None:
            os.environ.pop("RAY_COLOR_PREFIX", None)
        else:
            os.environ["RAY_COLOR_PREFIX"] = ray_prefix
