"""Time and memory of one product-space MIRA server step against the number of clients.

One server step is :func:`mira.core.spaces.product_step` on SmolLM2-135M-shaped adapters: 30
layers of q_proj (576 -> 576), k_proj (576 -> 192), v_proj (576 -> 192) and o_proj (576 -> 576),
float32 factors, ranks drawn from {4, 8, 16}, scale lora_alpha / r, on a sparse random
symmetric task graph with about 8 neighbours per client and server.step * max degree = 0.5.

At 1000 clients the adapters alone are several GB, so the step is streamed `--layers-per-call`
layers at a time through :func:`mira.core.spaces.product_mix` (modules are independent, so
product_step is exactly this loop over module groups), which spreads each group's modules over
its thread pool (`--step-workers`, default: product_mix's own default, one thread per core) and
limits BLAS to one thread per call itself. The synthetic factors (a shared A initialisation
plus a per-client drift, random B) are generated per module from a seed; their generation time
is reported apart from the step. The layers can also be split over `--processes` processes;
each times its calls, then reruns its first call under tracemalloc for the numpy peak
(tracemalloc slows numpy down, so it stays out of the timing).

For small client counts the modules of the first `--dense-layers` layers are also aggregated
densely (form each out x in target, full SVD, truncate) in the same process, both at one BLAS
thread, and the time ratio dense / stacked is reported with the largest relative difference of
the products s_k B_k' A_k' (both float32 outputs compared in float64).

Each client count runs in a fresh process so that its peak RSS is its own. Example:

    python benchmarks/aggregation.py --clients 10 100 1000 --out docs/aggregation_table.md
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import resource
import subprocess
import sys
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from mira.core import eigen
from mira.core import spaces as laplacian
from mira.core.spaces import mixing_matrix, product_mix, product_mix_module

HIDDEN = 576
KV_WIDTH = 192
MODULES = (
    ("q_proj", HIDDEN, HIDDEN),
    ("k_proj", HIDDEN, KV_WIDTH),
    ("v_proj", HIDDEN, KV_WIDTH),
    ("o_proj", HIDDEN, HIDDEN),
)
LORA_ALPHA = 16.0
STEP_TIMES_MAX_DEGREE = 0.5


@dataclass(frozen=True)
class Setup:
    clients: int
    layers: int
    degree: int
    ranks: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class WorkerResult:
    step_seconds: float  # wall time inside product_mix, summed over this process's calls
    step_cpu_seconds: float  # CPU time of this process (all its threads) over the same calls
    generate_seconds: float
    max_rss_bytes: int  # this process, after its timed calls
    tracemalloc_peak_bytes: int  # numpy peak over its first call, factors included


def module_list(layers: int) -> list[tuple[str, int, int]]:
    """(name, in, out) of every LoRA target module, layer by layer."""
    return [
        (f"layers.{i}.{name}", fan_in, fan_out)
        for i in range(layers)
        for name, fan_in, fan_out in MODULES
    ]


def client_ranks(setup: Setup) -> np.ndarray:
    return np.random.default_rng([setup.seed, 0]).choice(setup.ranks, size=setup.clients)


def client_scales(setup: Setup) -> np.ndarray:
    return LORA_ALPHA / client_ranks(setup)


def random_graph(setup: Setup) -> np.ndarray:
    """Sparse random symmetric graph: each client links to degree/2 random others."""
    rng = np.random.default_rng([setup.seed, 1])
    k = setup.clients
    adjacency = np.zeros((k, k))
    for client in range(k):
        partners = rng.choice(k - 1, size=min(setup.degree // 2, k - 1), replace=False)
        partners[partners >= client] += 1  # skip self
        weights = rng.uniform(0.5, 1.0, size=partners.size)
        adjacency[client, partners] = weights
        adjacency[partners, client] = weights
    return adjacency


def module_factors(setup: Setup, index: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One module's float32 factors for every client: shared A init + drift, random B."""
    _, fan_in, fan_out = module_list(setup.layers)[index]
    ranks = client_ranks(setup)
    rng = np.random.default_rng([setup.seed, 2, index])
    bound = 1.0 / np.sqrt(fan_in)  # peft's kaiming-uniform bound for lora_A
    shared_a = rng.uniform(-bound, bound, size=(max(ranks), fan_in)).astype(np.float32)
    a_factors, b_factors = [], []
    for rank in ranks:
        drift = rng.standard_normal((rank, fan_in), dtype=np.float32) * np.float32(0.1 * bound)
        a_factors.append(shared_a[:rank] + drift)
        b_factors.append(rng.standard_normal((fan_out, rank), dtype=np.float32) * np.float32(0.01))
    return a_factors, b_factors


def layer_adapters(setup: Setup, layers: list[int]) -> list[dict[str, tuple[np.ndarray, ...]]]:
    """Every client's adapter restricted to these layers: module name -> (A, B)."""
    names = module_list(setup.layers)
    adapters: list[dict[str, tuple[np.ndarray, ...]]] = [{} for _ in range(setup.clients)]
    for layer in layers:
        for index in range(4 * layer, 4 * layer + 4):
            a_factors, b_factors = module_factors(setup, index)
            for k in range(setup.clients):
                adapters[k][names[index][0]] = (a_factors[k], b_factors[k])
    return adapters


def use_eigensolver(name: str) -> None:
    """Make the pull use `name` for the top eigenpairs of each row's R x R core.

    "lapack" is what mira uses (:func:`mira.core.eigen.top_eigenpairs`: only the kept eigenvectors,
    GIL released); "numpy" is the reference, numpy's full ``eigh`` then a slice.
    """
    if name == "lapack" and not eigen.lapack_available():
        sys.exit("--eigensolvers lapack: scipy's cython_lapack could not be loaded")
    solvers = {"lapack": eigen.top_eigenpairs, "numpy": eigen.top_eigenpairs_numpy}
    laplacian.top_eigenpairs = solvers[name]  # type: ignore[attr-defined]


def run_worker(
    setup: Setup,
    mixing: np.ndarray,
    calls: list[list[int]],
    step_workers: int | None,
    eigensolver: str,
) -> WorkerResult:
    """One product_mix call per group of layers (timed), then the first group under tracemalloc."""
    use_eigensolver(eigensolver)
    scales = client_scales(setup)
    step = step_cpu = generate = 0.0
    for layers in calls:
        start = time.perf_counter()
        adapters = layer_adapters(setup, layers)
        generate += time.perf_counter() - start
        start, start_cpu = time.perf_counter(), time.process_time()
        product_mix(adapters, mixing, scales, workers=step_workers)
        step += time.perf_counter() - start
        step_cpu += time.process_time() - start_cpu
        del adapters
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    tracemalloc.start()
    adapters = layer_adapters(setup, calls[0])
    product_mix(adapters, mixing, scales, workers=step_workers)
    del adapters
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return WorkerResult(step, step_cpu, generate, max_rss, peak)


def dense_mix(
    a_factors: list[np.ndarray], b_factors: list[np.ndarray], mixing: np.ndarray, scales: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Dense reference: form each out x in target, full SVD, truncate to rank r_k."""
    result = []
    for k in range(len(a_factors)):
        target = np.zeros((b_factors[k].shape[0], a_factors[k].shape[1]))
        for j in np.flatnonzero(mixing[k]):
            b, a = b_factors[j].astype(np.float64), a_factors[j].astype(np.float64)
            target += (mixing[k, j] * scales[j]) * (b @ a)
        u, s, vt = np.linalg.svd(target, full_matrices=False)
        rank = a_factors[k].shape[0]
        root = np.sqrt(s[:rank] / scales[k])
        new_a, new_b = root[:, None] * vt[:rank], u[:, :rank] * root
        result.append((new_a.astype(np.float32), new_b.astype(np.float32)))
    return result


def dense_check(setup: Setup, mixing: np.ndarray, dense_layers: int) -> dict[str, float]:
    """Stacked and dense on the modules of the first layers: time ratio and largest difference.

    Both run in this thread with one BLAS thread (product_mix_module sets that limit itself).
    """
    scales = client_scales(setup)
    stacked_seconds = dense_seconds = worst = 0.0  # CPU time, robust to other load
    for index in range(4 * min(dense_layers, setup.layers)):
        a_factors, b_factors = module_factors(setup, index)
        start = time.process_time()
        new_a, new_b = product_mix_module(a_factors, b_factors, mixing, scales)
        stacked_seconds += time.process_time() - start
        start = time.process_time()
        with threadpool_limits(limits=1, user_api="blas"):
            reference = dense_mix(a_factors, b_factors, mixing, scales)
        dense_seconds += time.process_time() - start
        for k, (ref_a, ref_b) in enumerate(reference):
            ours = new_b[k].astype(np.float64) @ new_a[k].astype(np.float64)
            theirs = ref_b.astype(np.float64) @ ref_a.astype(np.float64)
            worst = max(worst, float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)))
    return {
        "dense_seconds": dense_seconds,
        "stacked_seconds": stacked_seconds,
        "max_relative_difference": worst,
    }


def eigen_share(setup: Setup, mixing: np.ndarray, eigensolver: str) -> float:
    """Fraction of one q_proj aggregation spent on the top eigenpairs of the R x R cores.

    Profiled (cProfile) on product_mix_module, which runs in the calling thread (cProfile sees
    one thread).
    """
    use_eigensolver(eigensolver)
    a_factors, b_factors = module_factors(setup, 0)
    profile = cProfile.Profile()
    profile.runcall(product_mix_module, a_factors, b_factors, mixing, client_scales(setup))
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = max(cumulative for (_, _, _, cumulative, _) in stats.values())
    solver = sum(
        cumulative
        for (path, _, function), (_, _, _, cumulative, _) in stats.items()
        if function.startswith("top_eigenpairs") and path.endswith("eigen.py")
    )
    return solver / total


def measure(
    setup: Setup,
    processes: list[int],
    step_workers: int | None,
    eigensolvers: list[str],
    layers_per_call: int,
    dense_layers: int,
    dense_max_clients: int,
) -> list[dict]:
    """One server step for setup.clients clients with each eigensolver and process count.

    The dense check runs once, with mira's own eigensolver.
    """
    adjacency = random_graph(setup)
    step = STEP_TIMES_MAX_DEGREE / adjacency.sum(axis=1).max()
    mixing = mixing_matrix(adjacency, step)
    degree = (adjacency > 0).sum(axis=1)
    stacked_rank = (mixing != 0).astype(int) @ client_ranks(setup)
    # float32 A and B of every client and module: what a server would hold without streaming.
    widths = sum(fan_in + fan_out for _, fan_in, fan_out in module_list(setup.layers))
    adapter_bytes = 4 * int(client_ranks(setup).sum()) * widths
    use_eigensolver("lapack" if eigen.lapack_available() else "numpy")
    dense = dense_check(setup, mixing, dense_layers) if setup.clients <= dense_max_clients else None
    calls = [
        list(range(first, min(first + layers_per_call, setup.layers)))
        for first in range(0, setup.layers, layers_per_call)
    ]
    rows = []
    for eigensolver, count in [(e, c) for e in eigensolvers for c in processes]:
        share = eigen_share(setup, mixing, eigensolver)
        parts = [calls[p::count] for p in range(count)]
        with ProcessPoolExecutor(count, mp_context=get_context("spawn")) as pool:
            futures = [
                pool.submit(run_worker, setup, mixing, part, step_workers, eigensolver)
                for part in parts
            ]
            results = [future.result() for future in futures]
        cpu = sum(r.step_cpu_seconds for r in results)
        rows.append(
            {
                "clients": setup.clients,
                "mean_degree": float(degree.mean()),
                "mean_stacked_rank": float(stacked_rank.mean()),
                "adapters_mb": adapter_bytes / 2**20,
                "eigensolver": eigensolver,
                "processes": count,
                "step_workers": os.cpu_count() if step_workers is None else step_workers,
                "layers_per_call": layers_per_call,
                # Processes run at the same time: the step lasts as long as the slowest one.
                "step_seconds": max(r.step_seconds for r in results),
                "cpu_seconds": cpu,
                "cpu_ms_per_client_module": 1e3 * cpu / (setup.clients * 4 * setup.layers),
                "generate_seconds": sum(r.generate_seconds for r in results),
                "tracemalloc_peak_mb_per_call": max(r.tracemalloc_peak_bytes for r in results)
                / 2**20,
                "max_rss_mb_per_process": max(r.max_rss_bytes for r in results) / 2**20,
                "eigen_share": share,
                "dense_layers": min(dense_layers, setup.layers) if dense else 0,
                **(dense or {}),
            }
        )
    return rows


EIGENSOLVER_LABELS = {
    "lapack": "LAPACK, kept vectors only",
    "numpy": "numpy eigh, all (reference)",
}


def markdown_table(rows: list[dict]) -> str:
    columns = [
        "clients",
        "mean degree",
        "mean stacked rank R",
        "all adapters, float32 (MB)",
        "top eigenpairs by",
        "processes x step workers (threads)",
        "step, wall (s)",
        "step, CPU of all threads (s)",
        "CPU ms per client-module",
        "numpy peak per call, tracemalloc (MB)",
        "max RSS per process (MB)",
        "share in top eigenpairs",
        "dense / stacked CPU time (layers)",
        "max rel. diff vs dense",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if row["dense_layers"]:
            ratio = row["dense_seconds"] / row["stacked_seconds"]
            dense = f"{ratio:.1f}x ({row['dense_layers']})"
            diff = f"{row['max_relative_difference']:.1e}"
        else:
            dense, diff = "not run", "-"
        cells = [
            f"{row['clients']}",
            f"{row['mean_degree']:.1f}",
            f"{row['mean_stacked_rank']:.1f}",
            f"{row['adapters_mb']:.0f}",
            EIGENSOLVER_LABELS[row["eigensolver"]],
            f"{row['processes']} x {row['step_workers']}",
            f"{row['step_seconds']:.2f}",
            f"{row['cpu_seconds']:.2f}",
            f"{row['cpu_ms_per_client_module']:.3f}",
            f"{row['tracemalloc_peak_mb_per_call']:.0f}",
            f"{row['max_rss_mb_per_process']:.0f}",
            f"{100 * row['eigen_share']:.0f}%",
            dense,
            diff,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    python = platform.python_version()
    return f"{os.cpu_count()} cores ({cpu}), Python {python}, numpy {np.__version__}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--layers", type=int, default=30, help="transformer layers (default 30)")
    parser.add_argument("--degree", type=int, default=8, help="target mean degree (default 8)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[1], help="processes (one row each)"
    )
    parser.add_argument(
        "--eigensolvers",
        nargs="+",
        choices=["lapack", "numpy"],
        default=["lapack"],
        help="top eigenpairs of each R x R core: lapack (mira's, default) and/or numpy (full "
        "eigh, the reference); one row each",
    )
    parser.add_argument(
        "--step-workers",
        type=int,
        default=None,
        help="threads of each product_mix call (default: its own default, os.cpu_count())",
    )
    parser.add_argument(
        "--layers-per-call",
        type=int,
        default=1,
        help="layers passed to one product_mix call (default 1: 4 modules of every client)",
    )
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="set OPENBLAS/OMP/MKL_NUM_THREADS (default: leave them; the step limits BLAS itself)",
    )
    parser.add_argument("--dense-max-clients", type=int, default=100)
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one is not None:  # child process: one client count, rows as JSON
        setup = Setup(args.one, args.layers, args.degree, tuple(args.ranks), args.seed)
        rows = measure(
            setup,
            args.processes,
            args.step_workers,
            args.eigensolvers,
            args.layers_per_call,
            args.dense_layers,
            args.dense_max_clients,
        )
        print(json.dumps(rows))
        return
    env = dict(os.environ)
    if args.blas_threads is not None:
        for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[variable] = str(args.blas_threads)
    load_before = os.getloadavg()
    rows = []
    load_after_each = []
    for clients in args.clients:
        child = [sys.executable, __file__, "--one", str(clients), "--layers", str(args.layers)]
        child += ["--degree", str(args.degree), "--seed", str(args.seed)]
        child += ["--ranks", *map(str, args.ranks), "--processes", *map(str, args.processes)]
        child += ["--layers-per-call", str(args.layers_per_call)]
        child += ["--eigensolvers", *args.eigensolvers]
        if args.step_workers is not None:
            child += ["--step-workers", str(args.step_workers)]
        child += ["--dense-max-clients", str(args.dense_max_clients)]
        child += ["--dense-layers", str(args.dense_layers)]
        started = time.perf_counter()
        completed = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            sys.exit(f"benchmark for {clients} clients failed:\n{completed.stderr}")
        rows += json.loads(completed.stdout.strip().splitlines()[-1])
        load_after_each.append(f"{clients} clients: {os.getloadavg()[0]:.2f}")
        print(f"{clients} clients done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    table = markdown_table(rows)
    blas = (
        f"{args.blas_threads} (environment)"
        if args.blas_threads is not None
        else "environment left as is; the step limits BLAS to 1 thread per call itself"
    )
    note = (
        f"Machine: {machine()}. BLAS threads: {blas}. Layers: {args.layers} "
        f"({args.layers_per_call} per product_mix call), target degree: {args.degree}, "
        f"ranks: {args.ranks}, seed: {args.seed}. Load average (1, 5, 15 min) before: "
        f"{', '.join(f'{x:.2f}' for x in load_before)}; after: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}. 1-min load average after each "
        f"client count: {'; '.join(load_after_each)}."
    )
    print(table + "\n\n" + note)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n\n" + note + "\n")


if __name__ == "__main__":
    main()
