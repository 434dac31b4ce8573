"""The one configuration schema of mira, and how a config is read and validated.

A config is a TOML document with the sections of :class:`Config`; it is validated once, before
any work starts, by :func:`load_config` / :func:`config_from_dict`, and the resulting frozen
:class:`Config` is trusted everywhere else. An unknown key, a value of the wrong type or outside
its allowed set raises :class:`ConfigError` with a message naming the key (``section.key``) and
what is allowed.

- :mod:`~mira.config.schema`: the sections, every key's type, default and help; the key lists;
- :mod:`~mira.config.rules`: the server rules as records (:data:`RULES`), whence the method list;
- :mod:`~mira.config.checks`: the rules a value follows beyond its type;
- :mod:`~mira.config.load`: TOML files, overrides, type coercion, a run directory's config;
- :mod:`~mira.config.resume`: what a resumed run may change.
"""

from mira.config.checks import check_config
from mira.config.load import (
    WRITTEN_BEFORE,
    apply_overrides,
    config_from_dict,
    load_config,
    load_run_config,
    parse_override,
    read_raw,
    run_config_from_dict,
    to_toml,
)
from mira.config.resume import (
    check_resumable,
    describe_changes,
    differing_keys,
    load_resumed,
    resume_changes,
)
from mira.config.rules import RULES, Rule
from mira.config.schema import (
    ALL_LINEAR,
    AUTO,
    CHAT_TEMPLATES,
    CLUSTER_METHODS,
    DEVICE_PATTERN,
    DTYPES,
    EDGE_WEIGHTS,
    FINGERPRINT_GRAPHS,
    FINGERPRINTS,
    GRAPH_SOURCES,
    LR_SCHEDULES,
    METHODS,
    OPERATIONAL_KEYS,
    POOLS,
    PULL_SPACES,
    QUICKSTART,
    RENAMED_KEYS,
    RESUME_KEYS,
    SECTIONS,
    TASK_KINDS,
    TASK_METRICS,
    WANDB_MODES,
    Config,
    ConfigError,
    DataConfig,
    FederationConfig,
    FixedStep,
    LearnedMix,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    PrivacyConfig,
    ServerConfig,
    TaskConfig,
    TrainConfig,
    describe,
)

__all__ = [
    "ALL_LINEAR",
    "AUTO",
    "CHAT_TEMPLATES",
    "CLUSTER_METHODS",
    "DEVICE_PATTERN",
    "DTYPES",
    "EDGE_WEIGHTS",
    "FINGERPRINTS",
    "FINGERPRINT_GRAPHS",
    "GRAPH_SOURCES",
    "LR_SCHEDULES",
    "METHODS",
    "OPERATIONAL_KEYS",
    "POOLS",
    "PULL_SPACES",
    "QUICKSTART",
    "RENAMED_KEYS",
    "RESUME_KEYS",
    "RULES",
    "SECTIONS",
    "TASK_KINDS",
    "TASK_METRICS",
    "WANDB_MODES",
    "WRITTEN_BEFORE",
    "Config",
    "ConfigError",
    "DataConfig",
    "FederationConfig",
    "FixedStep",
    "LearnedMix",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "PrivacyConfig",
    "Rule",
    "ServerConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "check_config",
    "check_resumable",
    "config_from_dict",
    "describe",
    "describe_changes",
    "differing_keys",
    "load_config",
    "load_resumed",
    "load_run_config",
    "parse_override",
    "read_raw",
    "resume_changes",
    "run_config_from_dict",
    "to_toml",
]
