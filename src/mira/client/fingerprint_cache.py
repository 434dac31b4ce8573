"""Base-model fingerprints kept on the client's own machine, so that a second run on the same
data (another method of ``mira compare``, a rerun of the quickstart, a resumed run that starts
over) skips the probe's forward and backward passes (docs/design.md, "Task graph").

A first-contact fingerprint depends only on what :func:`fingerprint_key` hashes: the base
model (its files' names, sizes and modification times, or the hub revision it was loaded
from), where and how it runs (device, dtype, torch's thread count, the library versions), the
probe and training settings that reach it, the seeds, and the exact tokens of the client's
training examples. On the same key the computation gives the same bits, so reading the file is
the same as computing it again. The file holds the projected vector the client sends anyway;
it stays in the client's cache folder (``model.cache_dir``, $MIRA_CACHE or ~/.cache/mira,
under ``fingerprints/``). ``server.fingerprint_cache = false`` turns it off; an unreadable
file is computed again and replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from mira.assets import cache_root
from mira.client.base import LoadedBase
from mira.client.learner import Encoded
from mira.config import Config

FORMAT = 1
"""Raised whenever what a fingerprint computes changes, so older files are never read."""


def _model_identity(source: str, model: Any) -> Any:
    """What names the base model's weights: the hub revision it was loaded from, or for a
    local folder every file's name, size and modification time."""
    folder = Path(source)
    if folder.is_dir():
        return sorted(
            (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")
            if p.is_file()
        )
    return {"hub": source, "revision": getattr(model.config, "_commit_hash", None)}


def fingerprint_key(
    cfg: Config, partition: int, base: LoadedBase, encoded: Sequence[Encoded]
) -> str:
    """The sha256 of everything a base-model fingerprint of client ``partition`` depends on:
    ``base`` is the loaded base model, ``encoded`` the client's encoded training examples."""
    import peft
    import torch
    import transformers

    tokens = hashlib.sha256()
    for example in encoded:
        tokens.update(json.dumps([example.input_ids, example.labels]).encode())
    server = cfg.server
    parts = {
        "format": FORMAT,
        "versions": [
            metadata.version("mira"),
            torch.__version__,
            transformers.__version__,
            peft.__version__,
        ],
        "model": _model_identity(base.source, base.model),
        "runs_on": [base.device, base.dtype, torch.get_num_threads()],
        "config": {
            "model": dataclasses.asdict(cfg.model),
            "lora": dataclasses.asdict(cfg.lora),
            "train": dataclasses.asdict(cfg.train),
            "fingerprint": [
                server.fingerprint,
                server.fingerprint_dim,
                server.fingerprint_batches,
                server.fingerprint_rank,
            ],
            "seed": cfg.federation.seed,
            "partition": partition,
        },
        "tokens": tokens.hexdigest(),
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cached_fingerprint(
    key: str, compute: Callable[[], np.ndarray], cache_dir: str = ""
) -> np.ndarray:
    """The fingerprint stored under ``key``, or ``compute()`` stored there first (atomically:
    a reader never sees half a file). A file that cannot be read is computed again."""
    folder = cache_root(cache_dir) / "fingerprints"
    path = folder / f"{key}.npy"
    try:
        stored = np.load(path, allow_pickle=False)
        if stored.ndim == 1 and stored.size and np.all(np.isfinite(stored)):
            return stored
    except (OSError, ValueError, EOFError):
        pass
    vector = compute()
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            np.save(out, np.asarray(vector), allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        # A read-only or full cache costs the next run the computation, nothing else.
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return vector
