"""Any causal LM peft can adapt: tiny random models of six families, built locally.

Fast checks: lora.target_modules = [] resolves to each family's attention projections,
['all-linear'] to every linear layer but the output head, and a name that matches nothing
stops the run with the modules that exist. Slow: one round of mira and of fedit with mixed
ranks on four families through the Simulation Engine; every personalised adapter reloads
with peft to the eval loss the run recorded, and the server process never touched CUDA.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from mira.client.errors import ModelError
from mira.client.lora import check_target_modules, lora_model
from mira.config import LoraConfig, ModelConfig
from mira.federation.simulation import run_simulation
from mira.results.schema import AdapterFiles, RunLayout
from test_federation import assert_reloads_to_recorded_eval_loss

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


# --- one round per family and method, through the Simulation Engine ------------------------

RANKS = [2, 4, 2, 4]
FAMILIES = {  # family: lora.target_modules (['all-linear'] once, the default elsewhere)
    "llama": "[]",
    "qwen2": "['all-linear']",
    "gpt2": "[]",
    "phi3": "[]",
}


@pytest.fixture(scope="module")
def runs(tiny_config, tmp_path_factory):
    cuda_before = torch.cuda.is_initialized()
    out = {}
    for family, targets in FAMILIES.items():
        for method in ("mira", "fedit"):
            cfg = tiny_config(
                f"model.name=tiny-random-{family}",
                "model.device=cpu",
                f"lora.target_modules={targets}",
                f"lora.ranks={RANKS}",
                f"server.method={method}",
                "federation.rounds=1",
            )
            folder = tmp_path_factory.mktemp(f"{family}-{method}")
            run_simulation(cfg, folder)
            out[f"{family}-{method}"] = (cfg, folder)
    out["cuda"] = (cuda_before, torch.cuda.is_initialized())
    return out


RUNS = [f"{family}-{method}" for family in FAMILIES for method in ("mira", "fedit")]


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_personalised_adapters_reload_with_peft_to_the_recorded_eval_loss(runs, run) -> None:
    assert_reloads_to_recorded_eval_loss(run, runs, (0, 1))  # ranks 2 and 4


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_each_client_keeps_its_rank_on_the_familys_modules(runs, run) -> None:
    family = run.split("-")[0]
    cfg, folder = runs[run]
    expected = ATTENTION[family] + (MLP[family] if FAMILIES[family] == "['all-linear']" else ())
    for client, rank in zip(cfg.client_ids, RANKS, strict=True):
        path = RunLayout(folder).adapter(client).dir
        settings = json.loads(AdapterFiles(path).config.read_text())
        assert settings["r"] == rank
        adapter = load_file(str(AdapterFiles(path).weights))
        # 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> 'self_attn.q_proj'
        modules = {re.sub(r"^.*\.\d+\.", "", key.split(".lora_")[0]) for key in adapter}
        assert modules == set(expected)
        for key, value in adapter.items():
            assert value.dtype == np.float32
            assert value.shape[0 if ".lora_A." in key else 1] == rank, key


def products(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """B @ A of every module."""
    return {
        key: adapter[key.replace("lora_A", "lora_B")] @ adapter[key]
        for key in adapter
        if ".lora_A." in key
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fedit_hands_equal_ranks_one_model_and_mira_keeps_clients_apart(runs, family) -> None:
    def adapters(run: str) -> dict[str, dict[str, np.ndarray]]:
        folder = RunLayout(runs[run][1]).adapters
        return {p.name: load_file(str(AdapterFiles(p).weights)) for p in folder.iterdir()}

    fedit, mira = adapters(f"{family}-fedit"), adapters(f"{family}-mira")
    for first, second in (("polarity-0", "subject-0"), ("polarity-1", "subject-1")):  # r 2, 4
        one, other = products(fedit[first]), products(fedit[second])
        for module in one:
            np.testing.assert_allclose(one[module], other[module], rtol=0, atol=1e-6)
        one, other = products(mira[first]), products(mira[second])
        assert any(not np.allclose(one[m], other[m], rtol=0, atol=1e-6) for m in one)


@pytest.mark.slow
def test_the_server_process_never_initialised_cuda(runs) -> None:
    before, after = runs["cuda"]
    if before:
        pytest.skip("an earlier test in this process initialised CUDA")
    assert not after
