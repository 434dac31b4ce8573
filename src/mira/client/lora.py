"""The LoRA wrapper around a base model: which modules get LoRA, peft's config for a layout,
and the one LoRA-wrapped model of a process (:class:`LoraModel`).

Which modules get LoRA: ``lora.target_modules`` names them (peft's suffix match), ``[]``
means the attention projections of the model's family (:data:`ATTENTION_PROJECTIONS`) and
``["all-linear"]`` every linear layer but the output head. :func:`check_target_modules`
refuses, before training, a name that matches nothing and lists the modules that exist.

Precision (README, "Devices and precision"): the frozen base weights are in the dtype
:func:`mira.client.devices.resolve_device` chose; LoRA weights, their gradients and the
optimizer state stay float32 (peft's ``autocast_adapter_dtype``, enforced here), and adapters
leave the client as float32 numpy arrays on the CPU, so the server's maths and the saved
files do not depend on where a client trained.

A process wraps its one base model (:func:`mira.client.base.base_model`) once and reuses it
across rounds and clients; each LoRA rank gets its own named adapter on that one model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, cast

import numpy as np
import torch

from mira.client.base import base_model, hf_config, hf_config_at, model_source
from mira.client.devices import resolve_device
from mira.client.errors import ModelError
from mira.config import ALL_LINEAR, LoraConfig, ModelConfig
from mira.core.adapters import Adapter

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
        model_type = str(hf_config_at(base_source).model_type)
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
        (docs/design.md, "The algorithm": all clients start from one shared initialisation).
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
