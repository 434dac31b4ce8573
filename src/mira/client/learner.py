"""Local LoRA training and evaluation on one client's data, read top to bottom.

An example is a prompt followed by a target; the loss is the mean cross-entropy of the
target tokens only (prompt tokens are masked with -100), computed in float32 whatever the
base model's dtype. With ``data.chat_template`` on, the prompt is one user turn of the
tokenizer's chat template and the target the assistant's reply (:mod:`mira.client.chat`);
training, evaluation, label scoring and generation all see the same rendering. Prompts are
truncated from the left so the target always fits in ``model.max_length`` tokens (the
chat framing comes on top). Batches
are built on the CPU and moved to the model's device; everything handed back (losses,
scores, fingerprint signals) is on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mira.client import scoring as metrics
from mira.client.chat import (
    ChatFormat,
    chat_format,
    example_parts,
    fit_prompt,
    prompt_parts,
    reply_text,
)
from mira.config import Config, TrainConfig
from mira.data import Example, Task

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens


def encode(
    tokenizer: Any, example: Example, max_length: int, chat: ChatFormat | None = None
) -> Encoded:
    """Tokenise prompt and target; keep all of the target, cut the prompt from the left.

    Without ``chat`` (:func:`~mira.client.chat.chat_format`) both are raw text, the target
    followed by end-of-text, together at most ``max_length`` tokens. With it the prompt is the
    rendered user turn ending in the generation prompt and the target the assistant's reply
    with its end of turn; ``max_length`` budgets the user's text and the reply, the template's
    framing comes on top, and the cut takes the user's text only
    (:func:`~mira.client.chat.fit_prompt`), so the same examples keep the same text with the
    template on or off.
    """
    head, user, tail, target_ids = example_parts(tokenizer, example.prompt, example.target, chat)
    target_ids = target_ids[: max_length - 1]
    # max_length budgets the example's own tokens; the template's framing comes on top.
    room = max_length - len(target_ids) + len(head) + len(tail)
    prompt_ids = fit_prompt(head, user, tail, room)
    return Encoded(
        input_ids=prompt_ids + target_ids,
        labels=[IGNORE] * len(prompt_ids) + target_ids,
    )


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions are masked out of attention and loss."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Target tokens a batch is scored on (every labelled token but a first one)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def target_logits(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits a loss needs: at the positions whose next token is a target.

    Returns float32 logits [n, vocab], the n target tokens and each one's row in the batch,
    in row-major order. Only those positions go through the output layer (transformers'
    ``logits_to_keep`` with a boolean mask): the prompt's positions, most of a sequence,
    never form a vocabulary-wide row, which saves the output layer's and the loss's work on
    them and their memory. A model whose forward returns every position anyway has them
    picked here, so the numbers are the same either way.
    """
    labels = batch["labels"]
    following = torch.full_like(labels, IGNORE)
    following[:, :-1] = labels[:, 1:]
    keep = following != IGNORE
    device = device_of(model)
    logits = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        logits_to_keep=keep.to(device),
    ).logits
    if logits.dim() == 3:  # not sliced: [batch, width, vocab]
        logits = logits[keep.to(logits.device)]
    rows = keep.nonzero()[:, 0]
    return logits.float(), following[keep].to(logits.device), rows.to(logits.device)


def target_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the target tokens, and how many there are."""
    logits, targets, _ = target_logits(model, batch)
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return nll, int(targets.numel())


def learning_rate(train: TrainConfig, position: int, total: int) -> float:
    """The learning rate at global step ``position`` (from 0) of ``total``.

    transformers' schedules (get_constant/cosine/linear_schedule_with_warmup): linear warmup
    from 0 over ``train.warmup_steps``, then constant, or a half cosine or a straight line
    down to 0 at ``total``.
    """
    base, warmup = train.learning_rate, train.warmup_steps
    if position < warmup:
        return base * position / warmup
    if train.lr_schedule == "constant":
        return base
    progress = (position - warmup) / max(1, total - warmup)
    if train.lr_schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base * max(0.0, 1.0 - progress)


def _set_gradient_checkpointing(model: Any, enabled: bool) -> None:
    """Recompute each decoder layer in the backward pass (transformers' non-reentrant
    checkpointing), or stop; switching it off also removes the hook that transformers adds
    to make the embeddings' output require gradients, so nothing outlives the setting."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    renamed = hasattr(base, "activation_checkpointing_enable")  # the name since transformers 5
    active = base.is_activation_checkpointing if renamed else base.is_gradient_checkpointing
    if active == enabled:
        return
    kwargs = {"use_reentrant": False}
    if enabled and renamed:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif enabled:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        if renamed:
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()
        base.disable_input_require_grads()


def _frozen_dtype(model: Any) -> torch.dtype:
    """Dtype of the base weights (the parameters that do not train)."""
    return next((p.dtype for p in model.parameters() if not p.requires_grad), torch.float32)


def train_steps(
    model: Any,
    parameters: list[torch.nn.Parameter],
    encoded: Sequence[Encoded],
    cfg: Config,
    pad_id: int,
    seed: int,
    *,
    server_round: int = 1,
) -> float:
    """``federation.local_steps`` AdamW steps of round ``server_round``.

    Each step accumulates ``train.grad_accum`` micro-batches of ``train.batch_size``
    examples drawn without replacement; its loss is the summed target NLL over the target
    tokens of all of them. The data order comes from ``seed`` alone, so a client's training
    is reproducible whatever process runs it. A fresh optimizer each round: its state never
    leaves the client and stays comparable across server rules; the learning rate follows
    ``train.lr_schedule`` at the client's global step (round - 1) * local_steps + step of
    rounds * local_steps, so the schedule continues across rounds. Gradients are clipped to
    ``train.max_grad_norm`` (0 = off). With float16 base weights the loss is scaled
    (torch.amp.GradScaler, fresh each round) so small gradients do not underflow; a step
    whose scaled gradients overflow is skipped. Returns the mean training loss of the steps.
    """
    train = cfg.train
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(
        parameters, lr=train.learning_rate, weight_decay=train.weight_decay
    )
    scaler = torch.amp.GradScaler(
        device_of(model).type, enabled=_frozen_dtype(model) == torch.float16
    )
    _set_gradient_checkpointing(model, train.gradient_checkpointing)
    local_steps = cfg.federation.local_steps
    total_steps = cfg.federation.rounds * local_steps
    model.train()
    order: list[int] = []
    losses = []
    for step in range(local_steps):
        batches = []
        for _ in range(train.grad_accum):
            if len(order) < train.batch_size:
                order.extend(rng.permutation(len(encoded)).tolist())
            picked, order = order[: train.batch_size], order[train.batch_size :]
            batches.append(collate([encoded[i] for i in picked], pad_id))
        tokens = max(sum(target_count(batch) for batch in batches), 1)
        step_loss = 0.0
        for index, batch in enumerate(batches):
            nll, _ = target_nll(model, batch)
            loss = nll / tokens
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} (learning rate "
                    f"{train.learning_rate} may be too high)"
                )
            if index == 0:  # after the forward: the old gradients are freed as late as ever
                optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            step_loss += loss.item()
        if train.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, train.max_grad_norm)
        rate = learning_rate(train, (server_round - 1) * local_steps + step, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = rate
        scaler.step(optimizer)
        scaler.update()
        losses.append(step_loss)
    model.eval()
    return float(np.mean(losses))


@torch.no_grad()
def eval_loss(model: Any, encoded: Sequence[Encoded], batch_size: int, pad_id: int) -> float:
    """Token-weighted mean target NLL over the whole evaluation split."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        nll, n = target_nll(model, collate(encoded[start : start + batch_size], pad_id))
        total += nll.item()
        count += n
    return total / count if count else math.nan


@torch.no_grad()
def example_nll(
    model: Any, encoded: Sequence[Encoded], batch_size: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Summed target NLL of every example and its number of target tokens (two [n] arrays);
    their sums' ratio is :func:`eval_loss` up to rounding."""
    model.eval()
    nll, tokens = [], []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad_id)
        nll.append(sequence_nll(model, batch).double().cpu().numpy())
        tokens.append((batch["labels"][:, 1:] != IGNORE).sum(dim=1).double().numpy())
    if not nll:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(nll), np.concatenate(tokens)


def sequence_nll(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed target NLL of each sequence of a batch, shape [batch]."""
    logits, targets, rows = target_logits(model, batch)
    per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    sums = torch.zeros(batch["labels"].shape[0], dtype=per_token.dtype, device=per_token.device)
    return sums.index_add(0, rows, per_token)


@torch.no_grad()
def label_scores(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    verbalisers: Sequence[str],
    max_length: int,
    batch_size: int,
    chat: ChatFormat | None = None,
) -> np.ndarray:
    """Log-likelihood of every label verbaliser after every prompt, shape [n, labels].

    Classification is scored, never generated: the predicted label is the verbaliser the
    model finds most likely (summed over its tokens, end-of-text included; with ``chat``,
    the verbaliser as the assistant's reply, end of turn included).
    """
    model.eval()
    encoded = [
        encode(tokenizer, Example(prompt=e.prompt, target=v), max_length, chat)
        for e in examples
        for v in verbalisers
    ]
    scores = []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], tokenizer.pad_token_id)
        scores.append(-sequence_nll(model, batch))
    scores_cpu = torch.cat(scores).reshape(len(examples), len(verbalisers)).cpu()
    return scores_cpu.numpy().astype(np.float64)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_length: int,
    max_new_tokens: int,
    batch_size: int,
    chat: ChatFormat | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), up to end-of-text; with
    ``chat``, of the rendered user turns, up to the end of the assistant's turn. The prompt
    is cut from the left as in :func:`encode`, to leave room for the new tokens."""
    model.eval()
    device = device_of(model)
    keep = max(1, max_length - max_new_tokens)
    stop = tokenizer.eos_token_id if chat is None else list(chat.stop_ids) or None
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = [
            fit_prompt(head, user, tail, keep + len(head) + len(tail))
            for head, user, tail in (
                prompt_parts(tokenizer, p, chat) for p in prompts[start : start + batch_size]
            )
        ]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop,
        )
        for row in generated[:, width:].cpu():
            outputs.append(reply_text(tokenizer.decode(row, skip_special_tokens=True), chat))
    return outputs


def task_metrics(
    model: Any, tokenizer: Any, task: Task, examples: Sequence[Example], cfg: Config
) -> dict[str, float]:
    """The task's own metrics on ``examples``: accuracy, ROUGE-L, exact match, token F1."""
    if not task.metrics or not examples:
        return {}
    chat = chat_format(tokenizer, cfg.data.chat_template)
    if task.kind == "classification":
        scores = label_scores(
            model,
            tokenizer,
            examples,
            task.verbalisers,
            cfg.model.max_length,
            cfg.train.eval_batch_size,
            chat,
        )
        labels = [e.label if e.label is not None else -1 for e in examples]
        return {"accuracy": metrics.accuracy_from_scores(scores, labels)}
    predictions = generate(
        model,
        tokenizer,
        [e.prompt for e in examples],
        cfg.model.max_length,
        cfg.train.max_new_tokens,
        cfg.train.eval_batch_size,
        chat,
    )
    references = [e.target.strip() for e in examples]
    return metrics.score_texts(task.metrics, predictions, references)


def fingerprint_signal(
    model: Any,
    probe_parameters: dict[str, torch.nn.Parameter],
    encoded: Sequence[Encoded],
    cfg: Config,
    pad_id: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """What a client's fingerprint is made of, before the random projection.

    ``server.fingerprint = "gradient"``: the probe LoRA's B-factor gradient of the mean
    target loss over ``server.fingerprint_batches`` local batches (at B = 0 the A gradient
    is zero). ``"update"``: the probe's change (A and B) after as many AdamW steps from its
    init. The probe has the same rank and init on every client, so the vectors are
    comparable whatever rank a client trains. The probe is reset afterwards.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(encoded)).tolist()
    size = cfg.train.batch_size
    batches = [
        [encoded[order[(i * size + j) % len(order)]] for j in range(size)]
        for i in range(cfg.server.fingerprint_batches)
    ]
    start = {k: p.detach().clone() for k, p in probe_parameters.items()}
    params = list(probe_parameters.values())
    if cfg.server.fingerprint == "gradient":
        model.eval()
        for p in params:
            p.grad = None
        for batch in batches:
            nll, count = target_nll(model, collate(batch, pad_id))
            (nll / max(count, 1) / len(batches)).backward()
        signal = {
            k: p.grad.detach().to("cpu", torch.float32).numpy().copy()
            for k, p in probe_parameters.items()
            if ".lora_B." in k and p.grad is not None
        }
    else:
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate)
        model.train()
        for batch in batches:
            nll, count = target_nll(model, collate(batch, pad_id))
            optimizer.zero_grad(set_to_none=True)
            (nll / max(count, 1)).backward()
            optimizer.step()
        model.eval()
        signal = {
            k: (p.detach() - start[k]).to("cpu", torch.float32).numpy().copy()
            for k, p in probe_parameters.items()
        }
    with torch.no_grad():
        for k, p in probe_parameters.items():
            p.copy_(start[k])
            p.grad = None
    return signal
