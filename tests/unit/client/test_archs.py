"""Any causal LM peft can adapt: tiny random models of six families, built locally.

lora.target_modules = [] resolves to each family's attention projections, ['all-linear'] to
every linear layer but the output head, and a name that matches nothing stops the run with the
modules that exist. One round per family through the Simulation Engine:
tests/e2e/test_archs_runs.py.
"""

from __future__ import annotations

import pytest

from mira.client.errors import ModelError
from mira.client.lora import check_target_modules, lora_model
from mira.config import LoraConfig, ModelConfig

ATTENTION = {
    "llama": ("self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"),
    "qwen2": ("self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"),
    "mistral": ("self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"),
    "gemma": ("self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"),
    "phi3": ("self_attn.o_proj", "self_attn.qkv_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
}
MLP = {
    "llama": ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"),
    "qwen2": ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"),
    "phi3": ("mlp.down_proj", "mlp.gate_up_proj"),
    "gpt2": ("mlp.c_fc", "mlp.c_proj"),
}


def tiny(family: str, cache_dir) -> ModelConfig:
    return ModelConfig(name=f"tiny-random-{family}", cache_dir=str(cache_dir), device="cpu")


@pytest.mark.parametrize("family", sorted(ATTENTION))
def test_an_empty_target_list_is_the_familys_attention(cache_dir, family: str) -> None:
    assert check_target_modules(tiny(family, cache_dir), LoraConfig()) == ATTENTION[family]


@pytest.mark.parametrize("family", sorted(MLP))
def test_all_linear_is_every_linear_layer_but_the_head(cache_dir, family: str) -> None:
    lora = LoraConfig(target_modules=("all-linear",))
    expected = tuple(sorted(ATTENTION[family] + MLP[family]))
    assert check_target_modules(tiny(family, cache_dir), lora) == expected


def test_a_target_that_matches_nothing_names_the_modules_that_exist(cache_dir) -> None:
    lora = LoraConfig(target_modules=("q_proj", "attn", "c_attn"))
    with pytest.raises(ModelError) as error:
        check_target_modules(tiny("gpt2", cache_dir), lora)
    message = str(error.value)
    assert "model.name = 'tiny-random-gpt2' (model_type gpt2)" in message
    assert "'q_proj' matches no module" in message
    assert "'attn' names GPT2Attention modules, which LoRA cannot adapt" in message
    assert "'c_attn'" not in message.split("Modules LoRA can adapt there")[0]
    for module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head"):
        assert module in message


def test_the_client_refuses_the_same_before_touching_its_model(cache_dir) -> None:
    model = lora_model(tiny("phi3", cache_dir))
    with pytest.raises(ModelError, match=r"'q_proj' matches no module.*self_attn\.qkv_proj"):
        model.activate(LoraConfig(target_modules=("q_proj", "v_proj")), 4)
    assert model.peft is None
