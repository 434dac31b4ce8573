"""Validation of a built :class:`~mira.config.schema.Config`: every rule a value must follow
beyond its type, each error naming the key (``section.key``) and what is allowed."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mira.config.schema import (
    ALL_LINEAR,
    DEVICE_PATTERN,
    GRAPH_SOURCES,
    TASK_KINDS,
    Config,
    ConfigError,
)


def check_config(cfg: Config) -> None:
    def positive(key: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value!r}")

    positive("model.max_length", cfg.model.max_length)
    positive("lora.rank", cfg.lora.rank)
    for i, rank in enumerate(cfg.lora.ranks):
        positive(f"lora.ranks[{i}]", rank)
    if cfg.lora.ranks and len(cfg.lora.ranks) != cfg.num_clients:
        raise ConfigError(
            f"lora.ranks has {len(cfg.lora.ranks)} entries but the tasks declare "
            f"{cfg.num_clients} clients; give one rank per client or leave it empty"
        )
    if not cfg.lora.rank_choices:
        raise ConfigError("lora.rank_choices must list at least one rank")
    for i, rank in enumerate(cfg.lora.rank_choices):
        positive(f"lora.rank_choices[{i}]", rank)
    positive("lora.alpha", cfg.lora.alpha)
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout!r}")
    if ALL_LINEAR in cfg.lora.target_modules and len(cfg.lora.target_modules) > 1:
        raise ConfigError(
            f"lora.target_modules: '{ALL_LINEAR}' stands alone (every linear layer); got "
            f"{list(cfg.lora.target_modules)}"
        )
    if not re.fullmatch(DEVICE_PATTERN, cfg.model.device):
        raise ConfigError(
            f"model.device = {cfg.model.device!r} is not allowed; choose one of: auto, cpu, "
            "cuda, cuda:N (N a GPU index), mps"
        )
    positive("train.batch_size", cfg.train.batch_size)
    positive("train.learning_rate", cfg.train.learning_rate)
    positive("train.eval_batch_size", cfg.train.eval_batch_size)
    positive("train.max_new_tokens", cfg.train.max_new_tokens)
    positive("train.grad_accum", cfg.train.grad_accum)
    if cfg.train.max_grad_norm < 0:
        raise ConfigError(
            f"train.max_grad_norm must be >= 0 (0 = no clipping), got {cfg.train.max_grad_norm!r}"
        )
    total_steps = cfg.federation.rounds * cfg.federation.local_steps
    if not 0 <= cfg.train.warmup_steps < max(total_steps, 1):
        raise ConfigError(
            f"train.warmup_steps = {cfg.train.warmup_steps} must be >= 0 and below "
            f"federation.rounds * federation.local_steps = {total_steps}"
        )
    if cfg.train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay must be >= 0, got {cfg.train.weight_decay!r}")
    positive("federation.rounds", cfg.federation.rounds)
    positive("federation.local_steps", cfg.federation.local_steps)
    positive("federation.workers", cfg.federation.workers)
    gpus = cfg.federation.gpus_per_client
    if gpus < 0 or (gpus > 1 and not gpus.is_integer()):
        raise ConfigError(
            f"federation.gpus_per_client must be a fraction in [0, 1] or a whole number of "
            f"GPUs, got {gpus!r}"
        )
    positive("federation.metrics_every", cfg.federation.metrics_every)
    positive("federation.timeout", cfg.federation.timeout)
    positive("federation.round_timeout", cfg.federation.round_timeout)
    if not 0.0 < cfg.federation.min_replies <= 1.0:
        raise ConfigError(
            f"federation.min_replies must be in (0, 1], got {cfg.federation.min_replies!r}"
        )
    if cfg.federation.max_norm_ratio <= 1.0:
        raise ConfigError(
            f"federation.max_norm_ratio must be > 1, got {cfg.federation.max_norm_ratio!r}"
        )
    if not 0.0 < cfg.federation.fraction <= 1.0:
        raise ConfigError(f"federation.fraction must be in (0, 1], got {cfg.federation.fraction!r}")
    if cfg.federation.seed < 0:
        raise ConfigError(f"federation.seed must be >= 0, got {cfg.federation.seed!r}")
    if not cfg.server.auto_step and float(cfg.server.step) < 0:
        raise ConfigError(f"server.step must be >= 0, got {cfg.server.step!r}")
    for i, alpha in enumerate(cfg.server.auto_grid):
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"server.auto_grid[{i}] = {alpha!r} must be in [0, 1]")
    if cfg.server.auto_step and not (cfg.server.auto_grid or cfg.server.auto_equal_share):
        raise ConfigError(
            "server.step = 'auto' needs candidates: list some in server.auto_grid or set "
            "server.auto_equal_share = true"
        )
    if not 0.0 <= cfg.server.auto_smoothing < 1.0:
        raise ConfigError(
            f"server.auto_smoothing must be in [0, 1), got {cfg.server.auto_smoothing!r}"
        )
    if not (math.isfinite(cfg.server.auto_tolerance) and cfg.server.auto_tolerance >= 0):
        raise ConfigError(
            f"server.auto_tolerance must be a finite number >= 0, got {cfg.server.auto_tolerance!r}"
        )
    if cfg.server.num_clusters < 0:
        raise ConfigError(f"server.num_clusters must be >= 0, got {cfg.server.num_clusters!r}")
    if cfg.server.knn < 0:
        raise ConfigError(f"server.knn must be >= 0, got {cfg.server.knn!r}")
    if cfg.server.graph == "knn" and cfg.server.knn < 1:
        raise ConfigError("server.graph = 'knn' needs server.knn >= 1")
    if not 0.0 <= cfg.server.random_threshold < 1.0:
        raise ConfigError(
            f"server.random_threshold must be in [0, 1), got {cfg.server.random_threshold!r}"
        )
    if cfg.server.graph_refresh < 0:
        raise ConfigError(f"server.graph_refresh must be >= 0, got {cfg.server.graph_refresh!r}")
    positive("server.fingerprint_dim", cfg.server.fingerprint_dim)
    positive("server.fingerprint_batches", cfg.server.fingerprint_batches)
    positive("server.fingerprint_rank", cfg.server.fingerprint_rank)
    if cfg.server.graph not in GRAPH_SOURCES and not cfg.server.graph.endswith(
        (".json", ".csv", ".npy")
    ):
        raise ConfigError(
            f"server.graph = {cfg.server.graph!r} is not allowed; choose one of: "
            + ", ".join(GRAPH_SOURCES)
            + ", or a matrix file ending in .json, .csv or .npy"
        )
    if cfg.privacy.clip_norm < 0:
        raise ConfigError(f"privacy.clip_norm must be >= 0, got {cfg.privacy.clip_norm!r}")
    if cfg.privacy.noise_multiplier < 0:
        raise ConfigError(
            f"privacy.noise_multiplier must be >= 0, got {cfg.privacy.noise_multiplier!r}"
        )
    if not 0.0 < cfg.privacy.delta < 1.0:
        raise ConfigError(f"privacy.delta must be in (0, 1), got {cfg.privacy.delta!r}")
    positive("data.train_size", cfg.data.train_size)
    positive("data.eval_size", cfg.data.eval_size)
    if not 0 <= cfg.data.val_size < cfg.data.train_size:
        raise ConfigError(
            f"data.val_size = {cfg.data.val_size} must be >= 0 and below data.train_size = "
            f"{cfg.data.train_size} (validation examples are carved out of the training ones)"
        )
    if cfg.server.method == "mira" and cfg.server.auto_step and cfg.data.val_size == 0:
        raise ConfigError(
            "server.step = 'auto' chooses each client's mix weight on its validation split: "
            "set data.val_size > 0 (for example 8)"
        )
    if cfg.data.label_skew < 0:
        raise ConfigError(f"data.label_skew must be >= 0, got {cfg.data.label_skew!r}")
    if not re.fullmatch(r"[^/\\#?%:]{1,128}", cfg.output.wandb_project):
        raise ConfigError(
            f"output.wandb_project = {cfg.output.wandb_project!r} is not a W&B project name: "
            "1 to 128 characters, none of / \\ # ? % :"
        )
    if not cfg.tasks:
        raise ConfigError("at least one [[tasks]] entry is required")
    seen: set[str] = set()
    for i, task in enumerate(cfg.tasks):
        where = f"tasks[{i}]"
        if not task.name:
            raise ConfigError(f"{where}.name is required")
        if task.name in seen:
            raise ConfigError(f"{where}.name = {task.name!r} is declared twice")
        seen.add(task.name)
        positive(f"{where}.clients", task.clients)
        if task.rank < 0:
            raise ConfigError(f"{where}.rank must be >= 0 (0 = lora.rank), got {task.rank!r}")
        if task.memory_mb < 0:
            raise ConfigError(f"{where}.memory_mb must be >= 0, got {task.memory_mb!r}")
        if task.path and task.kind not in TASK_KINDS:
            raise ConfigError(
                f"{where}.kind = {task.kind!r} is not allowed for a user task; choose one of: "
                + ", ".join(TASK_KINDS)
            )


def did_you_mean(word: str, known: Sequence[str] | Mapping[str, Any], prefix: str = "") -> str:
    """'; did you mean server.step?' for the closest known word, or '' if none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""
