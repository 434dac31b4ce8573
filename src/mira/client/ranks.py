"""Which LoRA rank each client trains: given per client, per task, or from a memory budget."""

from __future__ import annotations

from mira.config import ALL_LINEAR, Config


def client_rank(cfg: Config, partition: int) -> int:
    """Rank of client ``partition``: ``lora.ranks`` > ``tasks[].rank`` > ``tasks[].memory_mb``
    (largest of ``lora.rank_choices`` whose estimated training memory fits) > ``lora.rank``.

    A memory budget is in the memory of the device the client trains on (``model.device``):
    process memory on the CPU, device memory on a GPU (mira.client.memory says what is
    counted), with the base weights in ``model.dtype``. Only the model's config is read: no
    weights are loaded and no device is touched, so the server may call this too.
    """
    if cfg.lora.ranks:
        return cfg.lora.ranks[partition]
    task = cfg.task(cfg.client_tasks[partition])
    if task.rank:
        return task.rank
    if task.memory_mb:
        from mira.client.base import hf_config
        from mira.client.devices import resolve_device
        from mira.client.lora import default_target_modules
        from mira.client.memory import (
            DTYPE_BYTES,
            TARGET_MODULES,
            ModelShape,
            choose_rank,
            framework_overhead_mb,
        )

        config = hf_config(cfg.model)
        device, dtype = resolve_device(cfg.model)
        targets: tuple[str, ...]
        if cfg.lora.target_modules == (ALL_LINEAR,):
            targets = TARGET_MODULES
        else:
            targets = cfg.lora.target_modules or default_target_modules(config.model_type)
        try:
            return choose_rank(
                ModelShape.from_hf_config(config),
                task.memory_mb,
                cfg.lora.rank_choices,
                targets,
                cfg.train.batch_size,
                cfg.model.max_length,
                bytes_per_param=DTYPE_BYTES[dtype],
                framework_overhead_mb=framework_overhead_mb(device),
            )
        except ValueError as err:
            raise ValueError(f"tasks.{task.name}.memory_mb: {err}") from err
    return cfg.lora.rank
