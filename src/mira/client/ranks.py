"""Which LoRA rank each client trains: given per client, per task, or from a memory budget."""

from __future__ import annotations

from mira.config import Config


def client_rank(cfg: Config, partition: int) -> int:
    """Rank of client ``partition``: ``lora.ranks`` > ``tasks[].rank`` > ``tasks[].memory_mb``
    (largest of ``lora.rank_choices`` whose estimated training memory fits) > ``lora.rank``."""
    if cfg.lora.ranks:
        return cfg.lora.ranks[partition]
    task = cfg.task(cfg.client_tasks[partition])
    if task.rank:
        return task.rank
    if task.memory_mb:
        from mira.client.memory import ModelShape, choose_rank
        from mira.client.model import base_model

        shape = ModelShape.from_hf_config(base_model(cfg.model).model.config)
        try:
            return choose_rank(
                shape,
                task.memory_mb,
                cfg.lora.rank_choices,
                cfg.lora.target_modules,
                cfg.train.batch_size,
                cfg.model.max_length,
            )
        except ValueError as err:
            raise ValueError(f"tasks.{task.name}.memory_mb: {err}") from err
    return cfg.lora.rank
