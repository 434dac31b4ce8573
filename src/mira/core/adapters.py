"""LoRA adapters as the server sees them: peft's tensor names, the two views of one adapter,
and the checks an adapter from a client must pass.

An adapter is a dict of numpy arrays keyed like peft's saved adapter files
(``...q_proj.lora_A.weight`` [r, in], ``...q_proj.lora_B.weight`` [out, r]). Factor-space rules
use it as it is; product-space rules use the module view {module: (A, B)}.
"""

from __future__ import annotations

import numpy as np

Adapter = dict[str, np.ndarray]
"""peft state-dict key -> array."""

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor s that peft applies to B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (rank**0.5 if rslora else rank)


def to_modules(adapter: Adapter) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """peft state-dict keys -> {module: (A [r, in], B [out, r])}."""
    modules = {}
    for key in adapter:
        if key.endswith(LORA_A):
            module = key[: -len(LORA_A)]
            b_key = module + LORA_B
            if b_key not in adapter:
                raise ValueError(f"adapter has {key} but no {b_key}")
            modules[module] = (adapter[key], adapter[b_key])
    if 2 * len(modules) != len(adapter):
        raise ValueError("adapter keys are not pairs of lora_A / lora_B weights")
    return modules


def from_modules(modules: dict[str, tuple[np.ndarray, np.ndarray]]) -> Adapter:
    """{module: (A, B)} -> peft state-dict keys."""
    adapter: Adapter = {}
    for module, (a, b) in modules.items():
        adapter[module + LORA_A] = a
        adapter[module + LORA_B] = b
    return adapter


def adapter_rank(adapter: Adapter) -> int:
    """The LoRA rank r of an adapter (rows of its A factors); ValueError if they disagree."""
    ranks = {value.shape[0] for key, value in adapter.items() if key.endswith(LORA_A)}
    if len(ranks) != 1:
        raise ValueError(f"adapter has A factors of ranks {sorted(ranks)}")
    return ranks.pop()


def adapter_norm(adapter: Adapter) -> float:
    """Euclidean norm of all of an adapter's numbers together (float64)."""
    return float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in adapter.values()))
    )


def nbytes(adapter: Adapter) -> int:
    """Bytes of an adapter's arrays, as they travel."""
    return int(sum(v.nbytes for v in adapter.values()))
