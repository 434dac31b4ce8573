"""Validation of a built :class:`~mira.config.schema.Config`, once, before any work starts.

The rules of a single key are declared with it, in its field metadata (choices, bounds, pattern,
emptiness: :func:`mira.config.schema._meta`), and :func:`check_key` is the one place that
enforces them. Only the rules that relate several keys, or the entries of one list, are written
out here (:func:`check_relations`). Every error names the key (``section.key``) and what is
allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mira.config.schema import (
    ALL_LINEAR,
    SECTIONS,
    TASK_KINDS,
    Config,
    ConfigError,
    LearnedMix,
    leaves,
)


def check_config(cfg: Config) -> None:
    """Every key's own rules, in schema order (the tasks last), then the rules relating keys."""
    for key, value, meta in _keys(cfg):
        check_key(key, value, meta)
    check_relations(cfg)


def _keys(cfg: Config) -> Iterator[tuple[str, Any, Mapping[str, Any]]]:
    """(dotted key, value, field metadata) of every key of ``cfg``."""
    sections: list[tuple[str, Any]] = [(name, getattr(cfg, name)) for name in SECTIONS]
    sections += [(f"tasks[{i}]", task) for i, task in enumerate(cfg.tasks)]
    for name, values in sections:
        for key, f, value in leaves(name, values):
            yield key, value, f.metadata


def check_key(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """``value`` (already of the key's type) against the rules the key's metadata declares."""
    if meta.get("if_empty") and value in ("", ()):
        raise ConfigError(f"{key} {meta['if_empty']}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{key} = {value!r} is not allowed; choose one of: "
            + ", ".join(choices)
            + did_you_mean(str(value), choices)
        )
    pattern = meta.get("pattern")
    if pattern is not None and not re.fullmatch(pattern.regex, value):
        raise ConfigError(f"{key} = {value!r} {pattern.says}")
    bounds = meta.get("bounds")
    if bounds is None or isinstance(value, str):  # a word of a number key (server.step = 'auto')
        return
    if isinstance(value, tuple):
        for i, entry in enumerate(value):
            if not bounds.allows(entry):
                raise ConfigError(f"{key}[{i}] = {entry!r} must be {bounds.text}")
    elif not bounds.allows(value):
        raise ConfigError(f"{key} must be {bounds.text}, got {value!r}")


def check_relations(cfg: Config) -> None:
    """The rules no single key's metadata can say: between keys, or among a list's entries."""
    if cfg.lora.ranks and len(cfg.lora.ranks) != cfg.num_clients:
        raise ConfigError(
            f"lora.ranks has {len(cfg.lora.ranks)} entries but the tasks declare "
            f"{cfg.num_clients} clients; give one rank per client or leave it empty"
        )
    if ALL_LINEAR in cfg.lora.target_modules and len(cfg.lora.target_modules) > 1:
        raise ConfigError(
            f"lora.target_modules: '{ALL_LINEAR}' stands alone (every linear layer); got "
            f"{list(cfg.lora.target_modules)}"
        )
    total_steps = cfg.federation.rounds * cfg.federation.local_steps
    if not 0 <= cfg.train.warmup_steps < max(total_steps, 1):
        raise ConfigError(
            f"train.warmup_steps = {cfg.train.warmup_steps} must be >= 0 and below "
            f"federation.rounds * federation.local_steps = {total_steps}"
        )
    policy = cfg.server.policy
    if isinstance(policy, LearnedMix) and not (policy.grid or policy.equal_share):
        raise ConfigError(
            "server.step = 'auto' needs candidates: list some in server.auto.grid or set "
            "server.auto.equal_share = true"
        )
    if cfg.server.graph == "knn" and cfg.server.knn < 1:
        raise ConfigError("server.graph = 'knn' needs server.knn >= 1")
    if not 0 <= cfg.data.val_size < cfg.data.train_size:
        raise ConfigError(
            f"data.val_size = {cfg.data.val_size} must be >= 0 and below data.train_size = "
            f"{cfg.data.train_size} (validation examples are carved out of the training ones)"
        )
    if isinstance(policy, LearnedMix) and cfg.data.val_size == 0:
        raise ConfigError(
            "server.step = 'auto' chooses each client's mix weight on its validation split: "
            "set data.val_size > 0 (for example 8)"
        )
    if not cfg.tasks:
        raise ConfigError("at least one [[tasks]] entry is required")
    seen: set[str] = set()
    for i, task in enumerate(cfg.tasks):
        if task.name in seen:
            raise ConfigError(f"tasks[{i}].name = {task.name!r} is declared twice")
        seen.add(task.name)
        if task.path and task.kind not in TASK_KINDS:
            raise ConfigError(
                f"tasks[{i}].kind = {task.kind!r} is not allowed for a user task; choose one of: "
                + ", ".join(TASK_KINDS)
            )


def did_you_mean(word: str, known: Sequence[str] | Mapping[str, Any], prefix: str = "") -> str:
    """'; did you mean server.step?' for the closest known word, or '' if none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""
