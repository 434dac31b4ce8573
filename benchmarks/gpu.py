"""The quickstart on a GPU against the same on the CPU: round wall time, tokens per second,
peak GPU memory.

Two measurements, each in fresh processes, so neither inherits the other's memory or CUDA state
(this process never touches CUDA itself):

1. The federation. ``mira run`` of the packaged quickstart (src/mira/configs/quickstart.toml:
   SmolLM2-135M, 9 clients, its rounds), once with the clients on the GPU
   (``model.device=cuda``, ``model.dtype`` as given, default ``auto``: bfloat16 on compute
   capability 8.0 or newer; ``--gpu-workers`` client processes at once, each reserving
   1 / gpu-workers of the GPU through ``federation.gpus_per_client``) and once on the CPU
   (``model.device=cpu``, float32, ``--cpu-workers`` processes). Reported: the wall time of
   every round (``seconds`` of the round rows of metrics.jsonl) and of the whole run.
2. One client's training. The quickstart's base model and LoRA layout (rank, target modules,
   batch size, ``model.max_length``) trained with mira.client.learner.train_steps for
   ``--steps`` AdamW steps on random sequences of exactly ``model.max_length`` tokens, after one
   warm-up step, on the GPU and on the CPU. Reported: training tokens per second
   (batch x tokens x steps / seconds), the peak GPU memory torch allocated
   (``torch.cuda.max_memory_allocated``; the CUDA context is not included) and what its
   caching allocator reserved, next to mira.client.memory's estimate for the same
   configuration; on the CPU, the peak resident memory above the imported runtime.

It needs a CUDA GPU and refuses to run without one. The results, the card's name and the
software versions replace the marked block of ``--out``:

    .venv/bin/python benchmarks/gpu.py --out docs/gpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"
MiB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_training(device: str, dtype: str, steps: int, overrides: list[str]) -> dict[str, Any]:
    """One client's training steps in this (fresh) process; see the module docstring."""
    import numpy as np
    import torch

    from mira.client import learner
    from mira.client.devices import resolve_device
    from mira.client.learner import Encoded
    from mira.client.lora import check_target_modules, lora_model
    from mira.client.memory import (
        DTYPE_BYTES,
        ModelShape,
        estimate_training_memory,
        framework_overhead_mb,
    )
    from mira.config import load_config

    cfg = load_config(None, [*overrides, f"model.device={device}", f"model.dtype={dtype}"])
    device, dtype = resolve_device(cfg.model)
    cuda = device.startswith("cuda")
    baseline = rss_bytes()
    lm = lora_model(cfg.model)
    name = lm.activate(cfg.lora, cfg.lora.rank)
    parameters = lm.lora_parameters(name)
    shape = ModelShape.from_hf_config(lm.base.model.config)
    length, batch = cfg.model.max_length, cfg.train.batch_size * cfg.train.grad_accum
    rng = np.random.default_rng(0)
    encoded = [
        Encoded(input_ids=ids, labels=ids)
        for ids in rng.integers(3, shape.vocab_size, size=(batch * (steps + 1), length)).tolist()
    ]
    warm_up = replace(cfg, federation=replace(cfg.federation, local_steps=1))
    timed = replace(cfg, federation=replace(cfg.federation, local_steps=steps))
    pad = lm.tokenizer.pad_token_id
    learner.train_steps(lm.peft, parameters, encoded, warm_up, pad, seed=0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    learner.train_steps(lm.peft, parameters, encoded, timed, pad, seed=1)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    targets = check_target_modules(cfg.model, cfg.lora)
    estimate = estimate_training_memory(
        shape,
        cfg.lora.rank,
        targets,
        cfg.train.batch_size,
        length,
        DTYPE_BYTES[dtype],
        padded=False,
        framework_overhead_mb=framework_overhead_mb(device),
    )
    result: dict[str, Any] = {
        "device": device,
        "dtype": dtype,
        "tokens_per_second": batch * length * steps / seconds,
        "seconds_per_step": seconds / steps,
        "estimate_mb": estimate.total / MiB,
        "shape": f"{cfg.train.batch_size} x {length}, rank {cfg.lora.rank}, {', '.join(targets)}",
        "threads": torch.get_num_threads(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        result |= {
            "peak_mb": torch.cuda.max_memory_allocated() / MiB,
            "reserved_mb": torch.cuda.max_memory_reserved() / MiB,
            "card": props.name,
            "card_memory_mb": props.total_memory / MiB,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        result["peak_mb"] = (peak - baseline) / MiB
    return result


def run_child(device: str, dtype: str, steps: int, overrides: list[str]) -> dict[str, Any]:
    child = json.dumps({"device": device, "dtype": dtype, "steps": steps, "overrides": overrides})
    done = subprocess.run(
        [sys.executable, __file__, "--child", child], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"training measurement on {device} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_federation(overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """``mira run`` of the quickstart with ``overrides``; the round times it recorded."""
    from mira.results.rundir import read_metrics

    mira = Path(sys.executable).with_name("mira")
    command = [str(mira), "run", "--out", str(out_dir)]
    for override in overrides:
        command += ["--set", override]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    total = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    rounds = read_metrics(out_dir).rounds
    return {"total": total, "rounds": [float(r.seconds) for r in rounds]}


def table(
    gpu: dict[str, Any], cpu: dict[str, Any], fed_gpu: dict[str, Any], fed_cpu: dict[str, Any]
) -> list[str]:
    lines = [
        f"| | GPU: {gpu['card']}, {gpu['dtype']} | CPU, {cpu['dtype']} |",
        "| --- | --- | --- |",
    ]
    for index, (g, c) in enumerate(zip(fed_gpu["rounds"], fed_cpu["rounds"], strict=False)):
        lines.append(f"| quickstart round {index + 1}, wall time | {g:.1f} s | {c:.1f} s |")
    lines += [
        f"| quickstart `mira run`, whole | {fed_gpu['total']:.0f} s | {fed_cpu['total']:.0f} s |",
        f"| clients training at once | {fed_gpu['workers']} | {fed_cpu['workers']} |",
        f"| one client's training: tokens / s ({gpu['shape']}) | "
        f"{gpu['tokens_per_second']:.0f} | {cpu['tokens_per_second']:.0f} |",
        f"| one client's training: s / step | {gpu['seconds_per_step']:.3f} | "
        f"{cpu['seconds_per_step']:.3f} |",
        f"| one client's peak memory, measured | {gpu['peak_mb']:.0f} MiB allocated on the GPU "
        f"({gpu['reserved_mb']:.0f} reserved) | {cpu['peak_mb']:.0f} MiB resident |",
        f"| the same, mira.client.memory's estimate | {gpu['estimate_mb']:.0f} MiB | "
        f"{cpu['estimate_mb']:.0f} MiB |",
    ]
    return lines


def write_section(path: Path, text: str) -> None:
    """Replace the text between the benchmark markers of ``path`` (or create the file)."""
    block = f"{BEGIN}\n{text}\n{END}"
    if path.is_file() and BEGIN in (old := path.read_text()) and END in old:
        head, rest = old.split(BEGIN, 1)
        path.write_text(head + block + rest.split(END, 1)[1])
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results into this file")
    parser.add_argument("--dtype", default="auto", help="model.dtype on the GPU (default auto)")
    parser.add_argument(
        "--gpu-workers", type=int, default=3, help="clients training at once on the GPU (3)"
    )
    parser.add_argument(
        "--cpu-workers", type=int, default=1, help="clients training at once on the CPU (1)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed training steps (20)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a config override for every run (repeatable), as `mira run --set`",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:  # one measurement in this fresh process; one JSON line out
        print(json.dumps(measure_training(**json.loads(args.child))))
        return
    import torch

    if torch.cuda.device_count() == 0:  # NVML: creates no CUDA context here
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
        raise SystemExit(
            f"benchmarks/gpu.py measures a GPU against the CPU and needs a CUDA GPU: torch "
            f"{torch.__version__} ({build}) sees none on this machine"
        )
    load_before = os.getloadavg()
    gpu = run_child("cuda", args.dtype, args.steps, args.overrides)
    cpu = run_child("cpu", "float32", args.steps, args.overrides)
    share = round(1.0 / args.gpu_workers, 4)
    with tempfile.TemporaryDirectory(prefix="mira-gpu-") as tmp:
        fed_gpu = run_federation(
            [
                *args.overrides,
                "model.device=cuda",
                f"model.dtype={args.dtype}",
                f"federation.workers={args.gpu_workers}",
                f"federation.gpus_per_client={share}",
            ],
            Path(tmp) / "gpu",
        )
        fed_cpu = run_federation(
            [
                *args.overrides,
                "model.device=cpu",
                "model.dtype=float32",
                f"federation.workers={args.cpu_workers}",
            ],
            Path(tmp) / "cpu",
        )
    fed_gpu["workers"], fed_cpu["workers"] = args.gpu_workers, args.cpu_workers
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "peft", "flwr"))
    text = "\n".join(
        [
            *table(gpu, cpu, fed_gpu, fed_cpu),
            "",
            f"Card: {gpu['card']} ({gpu['card_memory_mb']:.0f} MiB, compute capability "
            f"{gpu['capability']}, CUDA {gpu['cuda']}); base weights in {gpu['dtype']}, LoRA in "
            f"float32; GPU clients reserve {share} of the GPU each. CPU: {os.cpu_count()} cores "
            f"({platform.processor() or platform.machine()}), {cpu['threads']} torch threads in "
            f"the training measurement. {versions}. Load average before (1, 5, 15 min): "
            + ", ".join(f"{x:.2f}" for x in load_before)
            + f". {args.steps} timed steps after one warm-up step.",
            "",
            f"Command: `python benchmarks/gpu.py {shlex.join(argv or sys.argv[1:])}`",
        ]
    )
    print(text)
    if args.out:
        write_section(args.out, text)


if __name__ == "__main__":
    main()
