"""Library output kept off the console: transformers', peft's and huggingface_hub's progress
bars, info logs and warnings, while mira's own lines stay (``-v`` shows everything)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr


@contextmanager
def library_output(verbose: bool) -> Iterator[list[warnings.WarningMessage]]:
    """Unless ``verbose``, keep transformers', peft's and huggingface_hub's progress bars,
    info logs and warnings off the console while the block runs; yields the warnings caught
    (empty when ``verbose``: they are shown as they come). Settings are restored after."""
    if verbose:
        yield []
        return
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        # Some bars are plain tqdm on stderr (transformers' GGUF conversion), outside both
        # libraries' switches.
        with warnings.catch_warnings(record=True) as caught, redirect_stderr(io.StringIO()):
            warnings.simplefilter("always")
            yield caught
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()
