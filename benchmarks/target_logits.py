"""What forming logits only where a target follows saves: the loss's way against the long way.

The loss of every pass (training, evaluation, validation, label scoring, fingerprints) needs
the output layer's logits only at the positions whose next token is a target
(:func:`mira.client.learner.target_logits`); the long way forms them at every position of
the batch and masks the prompt's out of the loss. This script times both on the real model,
one client of each task of configs/headline.toml, for an evaluation pass (the client's first
``train.eval_batch_size`` eval examples, no gradient) and a training step (a forward and
backward pass of ``train.batch_size`` training examples), alternating the two ways so that
both see the same machine, and reports the median of each and their ratio, with the largest
difference of the losses they compute.

    .venv/bin/python benchmarks/target_logits.py --repeats 5 --out docs/target_logits.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CONFIG = "configs/headline.toml"


def long_way(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed target NLL from every position's logits, prompt positions masked."""
    from mira.client.learner import IGNORE

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def targets_only(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from mira.client.learner import target_nll

    return target_nll(model, batch)[0]


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure_client(view: str, repeats: int) -> dict[str, Any]:
    """Both ways on one client (its config view): medians of each, and the loss difference."""
    from mira.client import learner
    from mira.federation import client_app

    client = client_app._config(view)
    encoded = client_app._client_data(view, 0)
    model = client_app._lora_model(client)
    name = model.activate(client.lora, client.lora.rank)
    net, pad = model.peft, model.tokenizer.pad_token_id
    params = model.lora_parameters(name)
    evaluation = learner.collate(encoded.eval[: client.train.eval_batch_size], pad)
    training = learner.collate(encoded.train[: client.train.batch_size], pad)

    def eval_pass(way: Callable[..., torch.Tensor]) -> torch.Tensor:
        net.eval()
        with torch.no_grad():
            return way(net, evaluation)

    def train_step(way: Callable[..., torch.Tensor]) -> None:
        net.train()
        for p in params:
            p.grad = None
        way(net, training).backward()
        net.eval()

    difference = float(abs(eval_pass(targets_only) - eval_pass(long_way)))
    times: dict[str, list[float]] = {k: [] for k in ("eval_t", "eval_l", "step_t", "step_l")}
    for _ in range(repeats):
        times["eval_l"].append(timed(lambda: eval_pass(long_way)))
        times["eval_t"].append(timed(lambda: eval_pass(targets_only)))
        times["step_l"].append(timed(lambda: train_step(long_way)))
        times["step_t"].append(timed(lambda: train_step(targets_only)))
    return {
        "task": client.tasks[0].name,
        "eval_positions": int(evaluation["labels"][:, 1:].numel()),
        "eval_targets": learner.target_count(evaluation),
        "train_positions": int(training["labels"][:, 1:].numel()),
        "train_targets": learner.target_count(training),
        "difference": difference,
        **{k: statistics.median(v) for k, v in times.items()},
    }


def measure(repeats: int) -> list[dict[str, Any]]:
    """:func:`measure_client` for the first client of every task of the headline config."""
    from mira.config import load_config
    from mira.federation.messages import client_view

    torch.set_num_threads(1)  # as a client process of the headline config (2 workers, 2 cores)
    cfg = load_config(CONFIG)
    rows, first = [], 0
    for task in cfg.tasks:
        rows.append(measure_client(client_view(cfg, first), repeats))
        first += task.clients
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict[str, Any]], repeats: int, model: str) -> str:
    lines = [
        "| task | eval pass: targets / positions | long way (s) | targets only (s) | ratio "
        "| training step: targets / positions | long way (s) | targets only (s) | ratio "
        "| loss difference |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['eval_targets']} / {r['eval_positions']} | {r['eval_l']:.3f} "
            f"| {r['eval_t']:.3f} | {r['eval_t'] / r['eval_l']:.2f} "
            f"| {r['train_targets']} / {r['train_positions']} | {r['step_l']:.3f} "
            f"| {r['step_t']:.3f} | {r['step_t'] / r['step_l']:.2f} | {r['difference']:.1e} |"
        )
    eval_ratio = statistics.mean(r["eval_t"] / r["eval_l"] for r in rows)
    step_ratio = statistics.mean(r["step_t"] / r["step_l"] for r in rows)
    lines.append(f"| **mean ratio** | | | | **{eval_ratio:.2f}** | | | | **{step_ratio:.2f}** | |")
    load = os.getloadavg()[0]
    lines += [
        "",
        f"{model}, one thread (as a client process of the headline config), median of "
        f"{repeats} alternating repeats; ratio = targets only / long way (below 1: faster). "
        f"{os.cpu_count()} cores ({platform.machine()}), load average (1 min) {load:.2f} after. "
        "Loss difference: the summed NLL of the evaluation batch, the two ways (float32 "
        "rounding of the same sums).",
    ]
    return "\n".join(lines)


START, END = "<!-- target-logits:start -->", "<!-- target-logits:end -->"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="markdown file whose measured block to write")
    args = parser.parse_args()
    from mira.config import load_config

    rows = measure(args.repeats)
    body = "\n".join(
        [
            START,
            "Measured with:",
            "",
            f"    .venv/bin/python benchmarks/target_logits.py --repeats {args.repeats}"
            + (f" --out {args.out}" if args.out else ""),
            "",
            table(rows, args.repeats, load_config(CONFIG).model.name),
            END,
        ]
    )
    if not args.out:
        print(body)
        return 0
    text = args.out.read_text() if args.out.exists() else ""
    if START in text and END in text:
        text = text[: text.index(START)] + body + text[text.index(END) + len(END) :]
    else:
        text = (text.rstrip() + "\n\n" if text else "") + body + "\n"
    args.out.write_text(text)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
