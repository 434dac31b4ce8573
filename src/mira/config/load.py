"""Reading a config: TOML files, ``section.key=value`` overrides, each value coerced to its
annotated type, and the config a run directory recorded."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from mira.config.checks import check_config, did_you_mean
from mira.config.schema import (
    QUICKSTART,
    RENAMED_KEYS,
    SECTIONS,
    Config,
    ConfigError,
    TaskConfig,
)


def _coerce(key: str, value: Any, annotation: Any, words: tuple[str, ...] = ()) -> Any:
    """Check one value against its annotated type; ints are accepted for floats.

    A ``float | str`` field takes a number or one of its ``words`` (e.g. server.step = "auto").
    """
    if annotation == (float | str):
        if isinstance(value, str):
            if value not in words:
                raise ConfigError(
                    f"{key} must be a number or one of: {', '.join(words)}; got {value!r}"
                )
            return value
        return _coerce(key, value, float)
    if get_origin(annotation) is tuple:
        (item_type, _ellipsis) = get_args(annotation)
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key} must be a list of {item_type.__name__}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {annotation!r} for {key}")


def _build_section(section: str, cls: type, raw: Any) -> Any:
    """One section (or task entry) of the right types; its values are checked afterwards."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{section}] must be a table of keys, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(
                f"unknown key {section}.{key}; allowed keys: {allowed}"
                + did_you_mean(key, fields, f"{section}.")
            )
        if dataclasses.is_dataclass(hints[key]):  # a table of its own: [server.auto]
            values[key] = _build_section(f"{section}.{key}", hints[key], value)
            continue
        words = fields[key].metadata.get("words", ())
        try:
            coerced = _coerce(f"{section}.{key}", value, hints[key], words)
        except ConfigError as err:
            if isinstance(value, str) and words:  # e.g. server.step = "atuo"
                raise ConfigError(f"{err}{did_you_mean(value, words)}") from None
            raise
        values[key] = coerced
    return cls(**values)


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a parsed TOML mapping."""
    if not isinstance(raw, Mapping):
        raise ConfigError("a config must be a TOML table")
    raw = moved_keys(raw)
    allowed = [*SECTIONS, "tasks"]
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "tasks":
            continue
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}]; allowed sections: {', '.join(allowed)}")
        sections[name] = _build_section(name, SECTIONS[name], value)
    raw_tasks = raw.get("tasks", [])
    if not isinstance(raw_tasks, Sequence) or isinstance(raw_tasks, str):
        raise ConfigError("tasks must be an array of tables ([[tasks]])")
    tasks = tuple(_build_section(f"tasks[{i}]", TaskConfig, t) for i, t in enumerate(raw_tasks))
    cfg = Config(**sections, tasks=tasks)
    check_config(cfg)
    return cfg


def moved_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with every key of :data:`RENAMED_KEYS` that it spells the old way
    moved to its new place (``server.auto_grid`` -> ``server.auto.grid``), so configs and run
    directories written before the move still load.

    Raises:
        ConfigError: a key given under both names.
    """
    copy: dict[str, Any] = json.loads(json.dumps(raw))
    for old, new in RENAMED_KEYS.items():
        *old_path, old_key = old.split(".")
        holder = _table(copy, old_path)
        if holder is None or old_key not in holder:
            continue
        *new_path, new_key = new.split(".")
        target = _table(copy, new_path, create=True)
        if target is None:
            raise ConfigError(f"{'.'.join(new_path)} must be a table of keys to take {old}")
        if new_key in target:
            raise ConfigError(f"{old} and {new} are both given; keep {new} ({old} is its old name)")
        target[new_key] = holder.pop(old_key)
    return copy


def _table(raw: dict[str, Any], path: Sequence[str], create: bool = False) -> Any:
    """The table at ``path`` in ``raw`` (made when ``create``), or None where there is none."""
    node: Any = raw
    for part in path:
        if not isinstance(node, dict):
            return None
        if part not in node and create:
            node[part] = {}
        node = node.get(part)
    return node if isinstance(node, dict) else None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse 'section.key=value'; the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, value_text = text.split("=", 1)
    path = [p.strip() for p in dotted.strip().split(".")]
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override {text!r} must name section.key")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each 'section.key=value' applied.

    ``tasks.N.key=value`` addresses the N-th task entry.
    """
    result = moved_keys(raw)
    for text in overrides:
        path, value = parse_override(text)
        path = RENAMED_KEYS.get(".".join(path), ".".join(path)).split(".")
        node: Any = result
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {text!r}: no entry {part} in {'.'.join(path[:i])}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {text!r} does not address a key")
        node[path[-1]] = value
    return result


def read_raw(source: str | Path | None) -> dict[str, Any]:
    """Read a TOML config file, or the packaged quickstart when ``source`` is None."""
    if source is None or str(source) == QUICKSTART:
        text = resources.files("mira.configs").joinpath("quickstart.toml").read_text()
        return tomllib.loads(text)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate a config; ``source=None`` is the packaged quickstart."""
    return config_from_dict(apply_overrides(read_raw(source), overrides))


def to_toml(cfg: Config) -> str:
    """The config as TOML, every key filled in; :func:`load_config` reads it back to an equal
    :class:`Config` (``mira config --show`` prints it, a run directory keeps it)."""
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())


# Keys added after run directories were first written, with the value that reproduces what a
# run written before them computed: its config.toml lacks the key, and today's default could
# compute something else (before data.chat_template every prompt went to the model raw; before
# server.auto.evaluations every client evaluated all its candidates; before server.robust
# every pull was unbounded).
WRITTEN_BEFORE = {
    "data.chat_template": "off",
    "server.auto.evaluations": 0,
    "server.robust": 0.0,
}


def load_run_config(run_config: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config a run directory's ``config.toml`` records, a key it predates taking the value
    of :data:`WRITTEN_BEFORE` (so resuming or comparing it changes nothing silently)."""
    return run_config_from_dict(read_raw(run_config), overrides)


def run_config_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """:func:`load_run_config` of a config a run recorded as a dict (its checkpoint keeps one)."""
    filled = moved_keys(raw)  # a copy, to fill in what it predates
    for dotted, value in WRITTEN_BEFORE.items():
        *path, key = dotted.split(".")
        table = _table(filled, path, create=True)
        if table is not None:
            table.setdefault(key, value)
    return config_from_dict(apply_overrides(filled, overrides))
