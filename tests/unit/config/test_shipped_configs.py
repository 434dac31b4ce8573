"""Every config the project ships is valid and means what its comments say."""

from __future__ import annotations

from pathlib import Path

import pytest

from mira.client.memory import ModelShape, choose_rank
from mira.client.ranks import client_rank
from mira.config import load_config

ROOT = Path(__file__).parents[3]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    from mira.data.store import builtin

    cfg = load_config(path)
    assert cfg.num_clients >= 6
    assert cfg.model.name == "smollm2-135m-instruct"
    for task in cfg.tasks:  # every task is one a fresh machine can fetch (mira data check)
        assert task.path or builtin(task.name)


def test_quickstart_has_three_task_kinds_one_of_them_generation():
    from mira.data import REGISTRY

    cfg = load_config()
    names = [t.name for t in cfg.tasks]
    assert len(names) >= 3 and all(t.clients == 3 for t in cfg.tasks)
    assert any(REGISTRY[n].task.kind == "generation" for n in names)


def test_hetero_ranks_config_gives_phones_workstations_and_a_budget_rank():
    from transformers import LlamaConfig

    cfg = load_config(ROOT / "configs" / "hetero-ranks.toml")
    assert [client_rank(cfg, p) for p in range(6)] == [4, 4, 4, 16, 16, 16]
    smollm2 = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    boolq = cfg.task("boolq")
    rank = choose_rank(
        ModelShape.from_hf_config(smollm2),
        boolq.memory_mb,
        cfg.lora.rank_choices,
        cfg.lora.target_modules,
        cfg.train.batch_size,
        cfg.model.max_length,
    )
    assert rank == 8
