"""Where a base model runs and in what precision (README, "Devices and precision").

:func:`resolve_device` turns ``model.device`` and ``model.dtype`` into a device and the dtype
of the frozen base weights (:data:`TORCH_DTYPES` maps that name to torch's dtype). It creates
no CUDA context: the GPU's compute capability comes from NVML, the driver's management
library, so the server process can ask what its clients will use.
"""

from __future__ import annotations

import ctypes
import os

import torch

from mira.client.errors import ModelError
from mira.config import AUTO, ModelConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
