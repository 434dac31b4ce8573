"""What a resumed run may change: only :data:`~mira.config.schema.RESUME_KEYS`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mira.config.load import load_run_config
from mira.config.schema import RESUME_KEYS, Config, ConfigError


def load_resumed(run_config: str | Path, overrides: Sequence[str]) -> Config:
    """The config of a run being resumed: its own ``config.toml``, with only the overrides a
    resumed run may take (:data:`RESUME_KEYS`)."""
    allowed = tuple(f"{key}=" for key in RESUME_KEYS)
    for override in overrides:
        if not override.strip().startswith(allowed):
            raise ConfigError(
                f"--set {override}: a resumed run keeps its config; only "
                f"{', '.join(RESUME_KEYS)} may change"
            )
    return load_run_config(run_config, overrides)


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every key two config dicts disagree on, in order;
    a table within a section is compared key by key (``server.auto.tolerance``), and a section
    that is not a table on both sides (the task list) counts as one key."""
    found = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            found += [(f"{name}.{key}", x, y) for key, x, y in differing_keys(a, b)]
        elif a != b:
            found.append((name, a, b))
    return found


def resume_changes(stored: Config, resumed: Config) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every key outside :data:`RESUME_KEYS` on which a
    resumed run's config differs from the run it continues; empty when it may resume."""
    return [
        change
        for change in differing_keys(stored.to_dict(), resumed.to_dict())
        if change[0] not in RESUME_KEYS
    ]


def describe_changes(changes: Sequence[tuple[str, Any, Any]]) -> str:
    """'server.step 0.3 -> 0.9, ...' (long values cut short)."""

    def shown(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return ", ".join(f"{key} {shown(old)} -> {shown(new)}" for key, old, new in changes)


def check_resumable(stored: Config, resumed: Config, where: str = "the run's config.toml") -> None:
    """A resumed run may differ from the run it continues (``stored``, as ``where`` records it)
    only in :data:`RESUME_KEYS`."""
    changes = resume_changes(stored, resumed)
    if changes:
        raise ConfigError(
            f"a resumed run keeps its config, but {', '.join(c[0] for c in changes)} differ "
            f"from {where} ({describe_changes(changes)}); only {', '.join(RESUME_KEYS)} may "
            "change"
        )
