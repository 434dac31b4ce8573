"""Peak training memory of SmolLM2-135M with LoRA, measured, against mira.client.memory's estimate.

Every run is a fresh Python process (so one run's peak cannot carry over into the next) that:

1. imports torch, transformers, peft and mira, sets torch's thread count, and records its
   resident set size (RSS): the baseline, the Python/torch runtime, which the estimate excludes;
2. loads the cached converted SmolLM2-135M-Instruct through ``mira.client.lora.lora_model`` and
   activates a LoRA adapter of the given rank on the given target modules;
3. runs ``--steps`` AdamW steps of ``mira.client.learner.train_steps`` on random token sequences of
   exactly ``seq_len`` tokens (or, for the padded rows, lengths drawn from [seq_len/2, seq_len]
   with one full-length sequence per batch, so every batch carries a padding mask);
4. reports its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) minus the baseline.

The estimate is ``mira.client.memory.estimate_training_memory`` for the same configuration,
built from
the loaded model's config (``ModelShape.from_hf_config``, whose parameter count is checked
against the model's). The ratio estimate / measured should lie in [0.75, 1.25].

Allocator. glibc's malloc serves a request of at least M_MMAP_THRESHOLD bytes with its own
mmap and gives it back on free, but raises that threshold to the size of any such block freed
(up to 32 MiB): after the first few tensors every activation (at most a few MiB here) comes
from the heap, whose freed memory stays resident. Each run therefore chooses an allocator mode:
``bounded`` (mallopt(M_MMAP_THRESHOLD, 128 KiB) at process start: the threshold stays at
glibc's initial value, so resident memory follows the live tensors the estimate counts) or
``glibc-default`` (untouched). docs/memory.md explains the difference. Example (the table in
docs/memory.md):

    python benchmarks/memory.py --out docs/memory.md
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mira.client.memory import (
    FRAMEWORK_OVERHEAD_MB,
    MiB,
    ModelShape,
    estimate_training_memory,
    lora_parameter_count,
)

MODEL = "smollm2-135m-instruct"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
BOUNDED_MMAP_THRESHOLD = 128 * 1024  # glibc's initial (and minimum dynamic) value
SEED = 0
BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"


@dataclass(frozen=True)
class Run:
    rank: int
    batch_size: int
    seq_len: int
    padded: bool
    allocator: str  # "bounded" or "glibc-default"


@dataclass(frozen=True)
class Measured:
    baseline_mb: float  # RSS after imports
    loaded_mb: float  # RSS after loading (weights are mapped lazily) minus the baseline
    peak_mb: float  # peak RSS minus the baseline
    end_mb: float  # RSS after training minus the baseline
    seconds_per_step: float
    attention: str  # config._attn_implementation
    shape: dict[str, Any]  # ModelShape.from_hf_config of the loaded model


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def random_sequences(run: Run, steps: int, vocab_size: int) -> list[Any]:
    """``steps`` batches of random token sequences, every batch exactly ``seq_len`` wide.

    Unpadded: every sequence has ``seq_len`` tokens. Padded: the sequence that comes first in
    its batch (train_steps draws batches from a permutation seeded by ``seed`` alone) has
    ``seq_len`` tokens, the others between seq_len / 2 and seq_len, so the batch gets a
    padding mask; :func:`measure` checks the batches it actually trained on.
    """
    import numpy as np

    from mira.client.learner import Encoded

    count = steps * run.batch_size
    rng = np.random.default_rng(SEED)
    lengths = [run.seq_len] * count
    if run.padded:
        for position, index in enumerate(np.random.default_rng(SEED).permutation(count)):
            if position % run.batch_size:
                lengths[index] = int(rng.integers(run.seq_len // 2, run.seq_len))
    sequences = []
    for length in lengths:
        ids = rng.integers(3, vocab_size, size=length).tolist()
        sequences.append(Encoded(input_ids=ids, labels=ids))
    return sequences


def measure(run: Run, steps: int, targets: tuple[str, ...], threads: int) -> Measured:
    """One run, in this (fresh) process; see the module docstring."""
    if run.allocator == "bounded":
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(M_MMAP_THRESHOLD, BOUNDED_MMAP_THRESHOLD) != 1:
            raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")
    import peft  # noqa: F401  (imported before the baseline: part of the runtime)
    import torch
    import transformers  # noqa: F401

    from mira.client import learner
    from mira.client.learner import collate
    from mira.client.lora import lora_model
    from mira.config import Config, FederationConfig, LoraConfig, ModelConfig, TrainConfig

    torch.set_num_threads(threads)
    baseline = rss_bytes()
    # Process memory on the CPU in float32: the case the calibrated overhead describes.
    model_cfg = ModelConfig(name=MODEL, max_length=run.seq_len, device="cpu", dtype="float32")
    lora = LoraConfig(rank=run.rank, target_modules=targets)
    lm = lora_model(model_cfg)
    name = lm.activate(lora, run.rank)
    parameters = lm.lora_parameters(name)
    loaded = rss_bytes() - baseline

    base = lm.base.model
    shape = ModelShape.from_hf_config(base.config)
    base_count = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    if shape.num_parameters != base_count:
        raise RuntimeError(
            f"ModelShape counts {shape.num_parameters} parameters, model {base_count}"
        )
    if sum(p.numel() for p in parameters) != lora_parameter_count(shape, run.rank, targets):
        raise RuntimeError(
            "LoRA parameter count differs from mira.client.memory.lora_parameter_count"
        )

    encoded = random_sequences(run, steps, shape.vocab_size)
    cfg = Config(
        model=model_cfg,
        lora=lora,
        train=TrainConfig(batch_size=run.batch_size),
        federation=FederationConfig(local_steps=steps),
    )
    widths: list[tuple[int, int]] = []  # (padded width, padding positions) of every batch

    def recording_collate(batch: Any, pad_id: int) -> Any:
        """learner.collate, recording each batch's width and padding for the check below."""
        tensors = collate(batch, pad_id)
        mask = tensors["attention_mask"]
        widths.append((mask.shape[1], int((mask == 0).sum())))
        return tensors

    learner.collate = recording_collate
    started = time.perf_counter()
    learner.train_steps(lm.peft, parameters, encoded, cfg, lm.tokenizer.pad_token_id, seed=SEED)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    if len(widths) != steps or any(
        w != run.seq_len or (pads > 0) != run.padded for w, pads in widths
    ):
        raise RuntimeError(f"batches were not as intended: (width, padding) = {widths}")
    return Measured(
        baseline_mb=baseline / MiB,
        loaded_mb=loaded / MiB,
        peak_mb=(peak - baseline) / MiB,
        end_mb=(rss_bytes() - baseline) / MiB,
        seconds_per_step=seconds / steps,
        attention=str(base.config._attn_implementation),
        shape=asdict(shape),
    )


def estimate_mb(run: Run, shape: ModelShape, targets: tuple[str, ...]) -> dict[str, float]:
    return estimate_training_memory(
        shape, run.rank, targets, run.batch_size, run.seq_len, padded=run.padded
    ).as_mb()


def markdown_table(rows: list[tuple[Run, Measured, dict[str, float]]]) -> str:
    header = [
        "rank",
        "batch x tokens",
        "padding mask",
        "allocator",
        "estimate MiB",
        "measured MiB",
        "estimate / measured",
        "measured - estimate + overhead",
        "activations + logits (est.)",
        "s / step",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, measured, estimate in rows:
        cells = [
            str(run.rank),
            f"{run.batch_size} x {run.seq_len}",
            "yes" if run.padded else "no",
            run.allocator,
            f"{estimate['total']:.0f}",
            f"{measured.peak_mb:.0f}",
            f"{estimate['total'] / measured.peak_mb:.2f}",
            f"{measured.peak_mb - estimate['total'] + estimate['framework_overhead']:.0f}",
            f"{estimate['activations']:.0f} + {estimate['logits']:.0f}",
            f"{measured.seconds_per_step:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.machine()
    memory = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        total = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        memory = f", {int(total.group(1)) / 2**20:.0f} GiB RAM" if total else ""
    except OSError:
        pass
    libc = " ".join(platform.libc_ver())
    return f"{os.cpu_count()} cores ({cpu}){memory}, {libc}, Python {platform.python_version()}"


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "peft"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument(
        "--shapes", nargs="+", default=["4x64", "8x128"], help="batch x tokens (default 4x64 8x128)"
    )
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (default 1; the client app uses cores / workers)",
    )
    parser.add_argument(
        "--padded-rank",
        type=int,
        default=8,
        help="also run padded batches at this rank, for every shape (0: no)",
    )
    parser.add_argument(
        "--glibc-default-rank",
        type=int,
        default=8,
        help="also run glibc's default allocator at this rank, for every shape (0: no)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the table into this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def runs(args: argparse.Namespace) -> list[Run]:
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    planned = [Run(r, b, s, False, "bounded") for b, s in shapes for r in args.ranks]
    if args.padded_rank:
        planned += [Run(args.padded_rank, b, s, True, "bounded") for b, s in shapes]
    if args.glibc_default_rank:
        planned += [Run(args.glibc_default_rank, b, s, False, "glibc-default") for b, s in shapes]
    return planned


def write_section(path: Path, text: str) -> None:
    """Replace the text between the benchmark markers of ``path`` (or create the file)."""
    block = f"{BEGIN}\n{text}\n{END}"
    if path.is_file() and BEGIN in (old := path.read_text()) and END in old:
        head, rest = old.split(BEGIN, 1)
        path.write_text(head + block + rest.split(END, 1)[1])
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    targets = tuple(args.targets)
    if args.child is not None:  # one run in this fresh process; one JSON line out
        measured = measure(Run(**json.loads(args.child)), args.steps, targets, args.threads)
        print(json.dumps(asdict(measured)))
        return
    load_before = os.getloadavg()
    rows = []
    for run in runs(args):
        child = [sys.executable, __file__, "--child", json.dumps(asdict(run))]
        child += ["--steps", str(args.steps), "--threads", str(args.threads)]
        child += ["--targets", *targets]
        started = time.perf_counter()
        completed = subprocess.run(child, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            sys.exit(f"run {run} failed:\n{completed.stderr}")
        measured = Measured(**json.loads(completed.stdout.strip().splitlines()[-1]))
        estimate = estimate_mb(run, ModelShape(**measured.shape), targets)
        rows.append((run, measured, estimate))
        print(
            f"{run}: measured {measured.peak_mb:.0f} MiB, estimate {estimate['total']:.0f} MiB "
            f"({time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
        )
    first = rows[0][1]
    command = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    note = "\n".join(
        [
            f"Command: `{command.strip()}`",
            "",
            f"Machine: {machine()}; {versions()}; torch threads per run: {args.threads}. "
            f"Load average (1, 5, 15 min) before: "
            f"{', '.join(f'{x:.2f}' for x in load_before)}; after: "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (another job shared the cores: "
            "the seconds per step are indicative only).",
            "",
            f"Model: {MODEL}, attention implementation `{first.attention}`, "
            f"{first.shape['num_parameters']:,} parameters; LoRA on {', '.join(targets)}, "
            f"{args.steps} AdamW steps per run, each run a fresh process. Measured: peak RSS "
            f"(ru_maxrss) minus the RSS after imports (runtime baseline "
            f"{min(m.baseline_mb for _, m, _ in rows):.0f}-"
            f"{max(m.baseline_mb for _, m, _ in rows):.0f} MiB, excluded). Estimated: "
            "`mira.client.memory.estimate_training_memory` (weights, LoRA factors, gradients, "
            "AdamW "
            f"moments, saved activations, loss working set, and the {FRAMEWORK_OVERHEAD_MB:.0f} "
            "MiB framework overhead). The column 'measured - estimate + overhead' is what the "
            "one calibrated constant, the framework overhead, stands for in each run.",
        ]
    )
    text = markdown_table(rows) + "\n\n" + note
    print(text)
    if args.out is not None:
        write_section(args.out, text)


if __name__ == "__main__":
    main()
