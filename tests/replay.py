"""A federation replayed in one process without Flower, as a reference for the real runs.

The server rules are written out densely here (weighted means, I - step * L) instead of
calling mira.core.rules, so a simulated run is checked against an independent implementation.
"""

from __future__ import annotations

import numpy as np
import torch

from mira.client import learner
from mira.client.lora import lora_model
from mira.config import Config, LearnedMix
from mira.core.adapters import Adapter
from mira.data import load_client_data
from mira.federation.client_app import training_seed


def _dense_rule(cfg: Config, trained: list[Adapter], weights: list[int]) -> list[Adapter]:
    k = len(trained)
    tasks = cfg.client_tasks
    method = cfg.server.method
    if method == "local":
        return trained
    if method == "fedit":
        w = np.array(weights, dtype=float) / sum(weights)
        avg = {
            key: sum(w[i] * trained[i][key].astype(float) for i in range(k)) for key in trained[0]
        }
        return [{key: v.astype(np.float32) for key, v in avg.items()} for _ in range(k)]
    if method == "cluster-fedavg":
        out = []
        for i in range(k):
            members = [j for j in range(k) if tasks[j] == tasks[i]]
            total = sum(weights[j] for j in members)
            out.append(
                {
                    key: sum(
                        weights[j] / total * trained[j][key].astype(float) for j in members
                    ).astype(np.float32)
                    for key in trained[0]
                }
            )
        return out
    if method == "mira":
        adjacency = np.array(
            [
                [
                    1.0 / (tasks.count(tasks[i]) - 1) if i != j and tasks[i] == tasks[j] else 0.0
                    for j in range(k)
                ]
                for i in range(k)
            ]
        )
        laplacian = np.diag(adjacency.sum(1)) - adjacency
        mixing = np.eye(k) - cfg.server.step * laplacian
        return [
            {
                key: sum(mixing[i, j] * trained[j][key].astype(float) for j in range(k)).astype(
                    np.float32
                )
                for key in trained[0]
            }
            for i in range(k)
        ]
    raise ValueError(method)


def _same_task_mean(tasks: list[str], trained: list[Adapter], k: int) -> Adapter:
    """The plain mean of the other clients of k's task, in float64, stored as float32."""
    others = [j for j in range(len(tasks)) if j != k and tasks[j] == tasks[k]]
    return {
        key: (sum(trained[j][key].astype(float) for j in others) / len(others)).astype(np.float32)
        for key in trained[k]
    }


def _one_by_one(model, examples: list, pad_id: int) -> tuple[list[float], list[int]]:
    """Summed target NLL and target-token count of each example, one forward pass each."""
    nll, tokens = [], []
    with torch.no_grad():
        model.peft.eval()
        for example in examples:
            total, count = learner.target_nll(model.peft, learner.collate([example], pad_id))
            nll.append(float(total))
            tokens.append(count)
    return nll, tokens


def _tolerant_choice(
    losses: dict[float, float],
    per_example: dict[float, tuple[list[float], list[int]]],
    tolerance: float,
    anchor: float,
) -> tuple[float, dict[float, float]]:
    """server.auto.tolerance written out: the standard error of each candidate's loss minus the
    best one's from the paired per-example differences, and the candidate nearest ``anchor``
    among those within ``tolerance`` standard errors of the best (ties to the smaller)."""
    best = min(sorted(losses), key=lambda a: losses[a])
    n = len(per_example[best][0])
    total_tokens = sum(per_example[best][1])
    errors = {}
    for alpha, (nll, _) in per_example.items():
        d = [nll[i] - per_example[best][0][i] for i in range(n)]
        mean_d = sum(d) / n
        sd = (sum((x - mean_d) ** 2 for x in d) / (n - 1)) ** 0.5
        errors[alpha] = n**0.5 * sd / total_tokens
    eligible = [a for a in sorted(losses) if losses[a] - losses[best] <= tolerance * errors[a]]
    return min(eligible, key=lambda a: (abs(a - anchor), a)), errors


def _auto_rule(
    cfg: Config,
    trained: list[Adapter],
    model,
    name: str,
    val: list,
    trace: list[dict],
    priors: dict[int, float],
) -> list[Adapter]:
    """server.step = "auto" on the declared-task graph, written out: every client tries
    (1 - alpha) W_k + alpha M_k for its candidates on its validation split, takes the best, and
    applies s * (what it applied last time) + (1 - s) * best (``priors`` keeps the former)."""
    tasks = cfg.client_tasks
    tok = model.tokenizer
    auto = cfg.server.auto
    chosen = []
    for k in range(len(trained)):
        mean = _same_task_mean(tasks, trained, k)
        neighbours = tasks.count(tasks[k]) - 1
        anchor = neighbours / (neighbours + 1)
        candidates = set(auto.grid)
        if auto.equal_share:
            candidates.add(anchor)
        order = sorted(candidates)
        measured = order
        if 0 < auto.evaluations < len(order):  # the ends, the one nearest the anchor, ...
            measured = [order[0], order[-1], min(order[1:-1], key=lambda a: (abs(a - anchor), a))]
            while len(measured) < auto.evaluations:  # ... then the farthest from those
                rest = [a for a in order if a not in measured]
                measured.append(max(rest, key=lambda a: (min(abs(a - m) for m in measured), -a)))
            measured.sort()
        losses = {}
        per_example = {}
        for alpha in measured:
            mixed = {
                key: (
                    (1 - alpha) * trained[k][key].astype(float) + alpha * mean[key].astype(float)
                ).astype(np.float32)
                for key in trained[k]
            }
            model.set_adapter(name, mixed)
            if auto.tolerance > 0:
                per_example[alpha] = _one_by_one(model, val[k], tok.pad_token_id)
                nll, tokens = per_example[alpha]
                losses[alpha] = float(sum(nll) / sum(tokens))
            else:
                losses[alpha] = learner.eval_loss(
                    model.peft, val[k], cfg.train.eval_batch_size, tok.pad_token_id
                )
        for alpha in [a for a in order if a not in measured]:  # Lagrange, in log space
            w = {m: np.prod([(alpha - o) / (m - o) for o in measured if o != m]) for m in measured}
            if auto.tolerance > 0:  # example by example
                tokens = per_example[measured[0]][1]
                nll = [
                    float(
                        np.exp(
                            sum(w[m] * np.log(max(per_example[m][0][i], 1e-6)) for m in measured)
                        )
                    )
                    for i in range(len(tokens))
                ]
                per_example[alpha] = (nll, tokens)
                losses[alpha] = float(sum(nll) / sum(tokens))
            else:
                losses[alpha] = float(np.exp(sum(w[m] * np.log(losses[m]) for m in measured)))
        best = min(sorted(losses), key=lambda a: losses[a])
        errors = {}
        if auto.tolerance > 0:
            best, errors = _tolerant_choice(losses, per_example, auto.tolerance, anchor)
        s = auto.smoothing
        applied = best if k not in priors else s * priors[k] + (1 - s) * best
        priors[k] = applied
        trace.append(
            {
                "client": cfg.client_ids[k],
                "choice": best,
                "alpha": applied,
                "losses": losses,
                "errors": errors,
            }
        )
        chosen.append(
            {
                key: ((1 - applied) * trained[k][key].astype(float) + applied * mean[key]).astype(
                    np.float32
                )
                for key in trained[k]
            }
        )
    return chosen


def replay(cfg: Config, trace: list[dict] | None = None) -> tuple[list[Adapter], list[float]]:
    """Final adapters and final eval losses of every client (full participation).

    ``trace`` receives, for server.step = "auto", every round's choice of every client.
    """
    torch.set_num_threads(1)
    model = lora_model(cfg.model)
    init = model.shared_init(cfg.lora, cfg.lora.rank, cfg.federation.seed)
    name = model.activate(cfg.lora, cfg.lora.rank)
    data = [load_client_data(cfg, p) for p in range(cfg.num_clients)]
    tok = model.tokenizer
    encoded = [[learner.encode(tok, e, cfg.model.max_length) for e in d.train] for d in data]
    val = [[learner.encode(tok, e, cfg.model.max_length) for e in d.val] for d in data]
    adapters = [dict(init) for _ in range(cfg.num_clients)]
    priors: dict[int, float] = {}
    for server_round in range(1, cfg.federation.rounds + 1):
        trained = []
        for p in range(cfg.num_clients):
            model.set_adapter(name, adapters[p])
            learner.train_steps(
                model.peft,
                model.lora_parameters(name),
                encoded[p],
                cfg,
                pad_id=tok.pad_token_id,
                seed=training_seed(cfg.federation.seed, p, server_round),
            )
            trained.append(model.get_adapter(name))
        if isinstance(cfg.server.policy, LearnedMix):
            adapters = _auto_rule(
                cfg, trained, model, name, val, trace if trace is not None else [], priors
            )
        else:
            adapters = _dense_rule(cfg, trained, [len(d.train) for d in data])
    losses = []
    for p in range(cfg.num_clients):
        model.set_adapter(name, adapters[p])
        ev = [learner.encode(tok, e, cfg.model.max_length) for e in data[p].eval]
        losses.append(
            learner.eval_loss(model.peft, ev, cfg.train.eval_batch_size, tok.pad_token_id)
        )
    return adapters, losses
