"""Any causal LM peft can adapt, through the Simulation Engine: one round of mira and of fedit
with mixed ranks on four families of tiny random models; every personalised adapter reloads
with peft to the eval loss the run recorded, and the server process never touched CUDA. The
quick checks of the same families: tests/unit/client/test_archs.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from mira.federation.simulation import run_simulation
from mira.results.schema import AdapterFiles, RunLayout
from test_archs import ATTENTION, MLP
from test_federation import assert_reloads_to_recorded_eval_loss

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
