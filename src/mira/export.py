"""``mira export``: one client's personalised model of a run as a standalone folder.

Every ``adapters/<client>/`` folder of a run is already a Hugging Face adapter repository
(:meth:`mira.results.rundir.RunWriter.write_adapter`, with :mod:`mira.client.sharing`): the
peft weights, an ``adapter_config.json`` naming the base portably, the base's tokenizer
files and a model card (README.md). :func:`export_client` copies one of them into a
standalone folder, or with ``merge`` loads the base the run trained on, adds the LoRA update
into its weights (peft's ``merge_and_unload``) and saves a plain transformers model that
``AutoModelForCausalLM.from_pretrained`` loads; a merged export carries the exact weights
the run trained on. A base on no hub (a ``tiny-random-*`` model mira builds, a local folder)
is named in an exported ``adapter_config.json`` by its path relative to the exported folder,
and the card says so (:func:`exported_base`): the folder then loads offline wherever that
base is.

This command reads a run directory (:mod:`mira.results`) and loads models
(:mod:`mira.client`), so it sits above both (docs/design.md, "Package layout").

Loading and saving models prints progress bars and library warnings (transformers, peft,
huggingface_hub); ``mira export`` keeps them off the console unless ``verbose``
(:func:`library_output`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from mira.client.base import model_source
from mira.client.quiet import library_output
from mira.client.sharing import base_identity, tokenizer_files
from mira.client.tiny import TINY_RANDOM
from mira.config import Config, ConfigError, load_config
from mira.errors import MiraError
from mira.results.card import hub_id, model_card
from mira.results.errors import RunDirError
from mira.results.rundir import graph_description, read_metrics
from mira.results.schema import AdapterFiles, RunLayout


class ExportError(MiraError, ValueError):
    """``mira export`` cannot make the folder asked for (no such run, client, adapter or base)."""


def exported_base(cfg: Config, base: str | None, out: Path) -> tuple[str, str, bool]:
    """How an exported adapter names its base: (``base_model_name_or_path``, the card's note,
    whether that name is a path relative to the exported folder ``out``).

    A base the hub holds (the packaged model's hub id, a user's hub id) keeps its id. A base on
    no hub is a local folder: ``--base``'s, the cached copy of a ``tiny-random-*`` model (built
    here from its seed if it is not cached yet), or the folder the run's config names; it is
    named by its path relative to ``out``, so that the two can move together.
    """
    name, note = base_identity(cfg.model.name, "")
    if hub_id(name):
        return name, note, False
    if base and not Path(base).expanduser().is_dir():
        return base, note, False  # --base names a hub id for a model the run built locally
    if base:
        folder = Path(base).expanduser()
    elif cfg.model.name.startswith(TINY_RANDOM):
        folder = Path(_base_source(cfg, None))
    else:
        folder = Path(cfg.model.name).expanduser()
    folder = folder.resolve()
    relative = os.path.relpath(folder, Path(out).resolve())
    where = f"exported from `{folder}`, named by its path relative to this folder"
    return relative, f"{note}; {where}" if note else f"a local folder, {where}", True


# ------------------------------------------------------------------------------ mira export
def export_client(
    run_dir: Path,
    client: str,
    out: Path,
    merge: bool = False,
    base: str | None = None,
    verbose: bool = False,
) -> Path:
    """Write client ``client``'s personalised model of run ``run_dir`` as a standalone
    Hugging Face folder ``out`` (new or empty); return ``out``.

    Without ``merge``: the adapter folder (weights, portable ``adapter_config.json``, model
    card, tokenizer), for ``PeftModel.from_pretrained(base, out)`` or
    ``AutoModelForCausalLM.from_pretrained(out)``. With ``merge``: the base weights with the
    LoRA update merged in, saved with ``save_pretrained`` in the base's own dtype, plus the
    tokenizer and a card. ``base`` (a local folder or hub id) replaces the base the run's
    config names, for a run made on another machine. ``verbose`` shows the libraries' progress
    bars and warnings (:func:`library_output`).
    """
    run_dir, out = Path(run_dir), Path(out)
    cfg = _run_config(run_dir)
    adapter = _adapter_folder(run_dir, cfg, client)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.resolve().with_name(f".{out.resolve().name}.{uuid.uuid4().hex[:12]}.partial")
    tmp.mkdir()  # not mkdtemp: the folder gets the usual permissions, not 0o700
    try:
        with library_output(verbose):
            if merge:
                _write_merged(cfg, run_dir, client, adapter, tmp, base)
            else:
                _write_adapter_copy(cfg, run_dir, client, adapter, tmp, base, out)
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _run_config(run_dir: Path) -> Config:
    path = RunLayout(run_dir).config
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a run directory: it has no {path.name}")
    try:
        return load_config(path)
    except ConfigError as err:
        raise ExportError(f"{path} cannot be read: {err}") from None


def _adapter_folder(run_dir: Path, cfg: Config, client: str) -> Path:
    if client not in cfg.client_ids:
        raise ExportError(
            f"{run_dir} has no client {client!r}; its clients are: {', '.join(cfg.client_ids)}"
        )
    layout = RunLayout(run_dir)
    saved = layout.saved_adapters()
    if not saved:
        raise ExportError(
            f"{run_dir} holds no adapters ({layout.adapters} is empty or missing): its run "
            "completed no round; continue it with `mira run --resume` first"
        )
    files = layout.adapter(client)
    if not files.weights.is_file() or not files.config.is_file():
        raise ExportError(
            f"{files.dir} lacks {files.weights.name} or {files.config.name}; clients with "
            f"adapters: {', '.join(saved)}"
        )
    return files.dir


def _base_source(cfg: Config, base: str | None) -> str:
    """Where the base weights are on this machine: ``base``, or the run's (mira's cache)."""
    if base:
        return base
    try:
        return model_source(cfg.model)
    except MiraError as err:
        raise _missing_base(cfg.model.name, err) from None


def _missing_base(name: str, err: BaseException) -> ExportError:
    return ExportError(
        f"cannot load the run's base model {name!r} ({err}); pass --base with a local folder "
        "or hub id of that model"
    )


def _adapter_settings(cfg: Config, adapter: Path) -> dict[str, Any]:
    """adapter_config.json with the portable base name (older runs recorded a local path)."""
    settings = json.loads(AdapterFiles(adapter).config.read_text())
    settings["base_model_name_or_path"] = base_identity(cfg.model.name, "")[0]
    return settings


def _card(
    cfg: Config,
    run_dir: Path,
    client: str,
    settings: dict[str, Any],
    note: str,
    merged: bool,
    relative_base: bool = False,
) -> str | None:
    """The card of the client's last recorded round (None when metrics.jsonl has none)."""
    try:
        rows = [r for r in read_metrics(run_dir).clients if r.client == client]
    except RunDirError:
        return None
    if not rows:
        return None
    graph = graph_description(run_dir, cfg)
    return model_card(cfg, rows[-1], settings, graph, note, merged, relative_base)


def _write_tokenizer(
    cfg: Config, adapter: Path, folder: Path, base: str | None, source: str | None = None
) -> None:
    saved = AdapterFiles(adapter)
    names = [
        p.name
        for p in adapter.iterdir()
        if p.is_file() and not p.name.startswith(".") and p not in saved.own_files()
    ]
    if saved.tokenizer_config.is_file():  # written by the run: copy as it is
        for name in names:
            shutil.copyfile(adapter / name, folder / name)
        return
    source = source or _base_source(cfg, base)  # a run from before adapters carried them
    try:
        files = tokenizer_files(source)
    except (OSError, ValueError) as err:
        raise _missing_base(source, err) from None
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _write_adapter_copy(
    cfg: Config,
    run_dir: Path,
    client: str,
    adapter: Path,
    folder: Path,
    base: str | None,
    out: Path,
) -> None:
    """The adapter's weights and tokenizer as the run saved them, its config naming the base
    as :func:`exported_base` says (``out``: where ``folder`` will be), and a card that says
    so (the run's own card when metrics.jsonl has no row of the client)."""
    settings = _adapter_settings(cfg, adapter)
    name, note, relative = exported_base(cfg, base, out)
    settings["base_model_name_or_path"] = name
    source, target = AdapterFiles(adapter), AdapterFiles(folder)
    shutil.copyfile(source.weights, target.weights)
    target.config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    card = _card(cfg, run_dir, client, settings, note, False, relative)
    if card is not None:
        target.card.write_text(card)
    elif source.card.is_file():
        shutil.copyfile(source.card, target.card)
    _write_tokenizer(cfg, adapter, folder, base)


def _write_merged(
    cfg: Config, run_dir: Path, client: str, adapter: Path, folder: Path, base: str | None
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source = _base_source(cfg, base)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    except (OSError, ValueError) as err:
        raise _missing_base(source, err) from None
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (KeyError, ValueError, RuntimeError) as err:
        raise ExportError(
            f"the adapter in {adapter} does not fit the base model {source!r}: {err}"
        ) from None
    merged = peft_model.merge_and_unload(safe_merge=True)  # safe: refuses a non-finite result
    merged.save_pretrained(folder)
    _write_tokenizer(cfg, adapter, folder, base, source)
    settings = _adapter_settings(cfg, adapter)
    card = _card(cfg, run_dir, client, settings, base_identity(cfg.model.name, source)[1], True)
    if card is not None:
        AdapterFiles(folder).card.write_text(card)
