"""Pre-flight: what can be checked before any client process starts, so that a bad model name
or a config that cannot work fails in one line, not minutes later inside the clients.

``mira run`` calls :func:`check_lengths` and :func:`check_model` from
:func:`mira.federation.simulation.preflight`, after the config's own checks (graph and step,
ranks and pull space) and before the Simulation Engine starts; the data files were decoded by
then (non-UTF-8 bytes are named with their file and line by :mod:`mira.data.sources`).
"""

from __future__ import annotations

from typing import Any

from mira.client.base import model_source
from mira.client.chat import chat_format, example_parts
from mira.client.errors import ModelError
from mira.config import Config, ConfigError
from mira.data import load_client_data


def check_model(cfg: Config) -> Any:
    """Load the base model's tokenizer (and config), or raise one clear line.

    Returns the tokenizer. A hub id that is not cached and cannot be downloaded, a local path
    that holds no model, or a typo all end here, naming the model and what to do. A name that
    is neither packaged nor a path nor in the Hugging Face cache fails at once when the hub
    cannot be reached (``HF_HUB_OFFLINE``, or no connection to it within 3 s) instead of after
    the hub client's retries (30 s); a name close to a packaged one gets a 'did you mean'.
    """
    import difflib
    import os
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoConfig, AutoTokenizer

    from mira.client.base import PACKAGED_SMOLLM2, looks_like_path
    from mira.client.tiny import TINY_FAMILIES

    name = cfg.model.name
    packaged = [PACKAGED_SMOLLM2, *TINY_FAMILIES]
    close = difflib.get_close_matches(name.lower(), packaged, n=1)
    hint = f"did you mean {close[0]!r}? Otherwise " if close and close[0] != name else ""
    remedy = (
        f"{hint}use {PACKAGED_SMOLLM2!r} (packaged, offline), a local model folder, or a "
        "Hugging Face id this machine has cached or can download"
    )
    if name not in packaged and not looks_like_path(name):
        try:
            cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
        except HFValidationError:
            cached = False  # not a repo id: the hub has nothing under that name either
        unreachable = ""
        offline = [
            key
            for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
            if os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on")
        ]
        if not cached and (offline or constants.HF_HUB_OFFLINE):
            unreachable = f"{(offline or ['HF_HUB_OFFLINE'])[0]} is set"
        elif not cached and not any(
            os.environ.get(key) for key in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
        ):  # through a proxy a direct connection proves nothing: the download decides
            endpoint = urlsplit(constants.ENDPOINT)
            host = endpoint.hostname or "huggingface.co"
            try:
                socket.create_connection((host, endpoint.port or 443), timeout=3.0).close()
            except OSError as err:
                unreachable = f"no connection to {host}: {err.strerror or err}"
        if unreachable:
            raise ModelError(
                f"model.name = {name!r} is not a packaged model, a local folder or a model in "
                f"the Hugging Face cache, and the hub cannot be reached ({unreachable}); {remedy}"
            )
    source = model_source(cfg.model)
    try:
        AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"model.name = {name!r} cannot be loaded ({first[:200]}); {remedy}"
        ) from None
    return tokenizer


def check_lengths(cfg: Config, tokenizer: Any) -> None:
    """``model.max_length`` must hold every target (with its end of text, or end of turn
    where ``data.chat_template`` is on) and at least one token of the prompt's own text, or
    the loss would be computed on nothing (NaN) or on a cut target. The chat template's
    framing comes on top of ``model.max_length`` (:func:`mira.client.learner.encode`). A
    tokenizer that ``data.chat_template = 'on'`` cannot use fails here.

    Classification targets are the task's label words (all of them are scored after every
    prompt); generation targets are every client's own answers.
    """
    chat = chat_format(tokenizer, cfg.data.chat_template)
    longest: dict[str, int] = {}
    for partition in range(cfg.num_clients):
        data = load_client_data(cfg, partition)
        targets = list(data.task.verbalisers) or [
            e.target for e in data.train + data.val + data.eval
        ]
        for target in targets:
            size = len(example_parts(tokenizer, "", target, chat)[3])
            longest[data.task.name] = max(longest.get(data.task.name, 0), size)
    for task, size in longest.items():
        if size + 1 > cfg.model.max_length:
            raise ConfigError(
                f"model.max_length = {cfg.model.max_length} leaves no room for the prompt: "
                f"task {task!r} has a target of {size} tokens (end of text included); set "
                f"model.max_length to at least {size + 1}, better a few times that"
            )
