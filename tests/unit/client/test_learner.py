"""The local training loop: defaults reproduce the plain AdamW loop bit for bit; gradient
accumulation, clipping, the learning-rate schedule and gradient checkpointing do what they say."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mira.client import learner
from mira.client.lora import lora_model
from mira.config import Config, TrainConfig
from mira.data import load_client_data


def reference_train_steps(model, parameters, encoded, cfg, pad_id, seed) -> float:
    """The loop as it was before accumulation, clipping and schedules existed, written out."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(
        parameters, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay
    )
    model.train()
    order: list[int] = []
    losses = []
    for _ in range(cfg.federation.local_steps):
        if len(order) < cfg.train.batch_size:
            order.extend(rng.permutation(len(encoded)).tolist())
        picked, order = order[: cfg.train.batch_size], order[cfg.train.batch_size :]
        batch = learner.collate([encoded[i] for i in picked], pad_id)
        nll, count = learner.target_nll(model, batch)
        loss = nll / max(count, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return float(np.mean(losses))


def train(cfg: Config, trainer=learner.train_steps, **options):
    """Train client 0 of ``cfg`` from the shared init; (trained adapter, mean loss)."""
    model = lora_model(cfg.model)
    model.shared_init(cfg.lora, cfg.lora.rank, cfg.federation.seed)
    name = model.activate(cfg.lora, cfg.lora.rank)
    tokenizer = model.tokenizer
    encoded = [
        learner.encode(tokenizer, e, cfg.model.max_length) for e in load_client_data(cfg, 0).train
    ]
    loss = trainer(
        model.peft,
        model.lora_parameters(name),
        encoded,
        cfg,
        pad_id=tokenizer.pad_token_id,
        seed=11,
        **options,
    )
    return model.get_adapter(name), loss


class StepRecorder:
    """Records, at every optimizer step, the learning rate and the gradients' global norm."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.norms: list[float] = []

    def __enter__(self) -> StepRecorder:
        def hook(optimizer, args, kwargs):
            group = optimizer.param_groups[0]
            self.rates.append(group["lr"])
            grads = [p.grad.flatten() for p in group["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize("overrides", [(), ("lora.dropout=0.1", "federation.local_steps=3")])
def test_defaults_reproduce_the_plain_adamw_loop_exactly(tiny_config, overrides) -> None:
    cfg = tiny_config("model.device=cpu", *overrides)
    expected, expected_loss = train(cfg, reference_train_steps)
    for server_round in (1, 3):  # a constant schedule does not depend on the round
        got, loss = train(cfg, server_round=server_round)
        assert loss == expected_loss
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_learning_rate_schedules_by_hand() -> None:
    def rates(schedule: str) -> list[float]:
        train = TrainConfig(learning_rate=0.1, lr_schedule=schedule, warmup_steps=2)
        return [learner.learning_rate(train, position, 10) for position in range(10)]

    warm = [0.0, 0.05]  # linear warmup from 0 (transformers' convention)
    assert rates("constant") == pytest.approx([*warm] + [0.1] * 8)
    # After warmup, progress = (position - 2) / 8 of the remaining 8 steps.
    cosine = [0.05 * (1 + math.cos(math.pi * (p - 2) / 8)) for p in range(2, 10)]
    assert rates("cosine") == pytest.approx([*warm, *cosine])
    assert rates("cosine")[6] == pytest.approx(0.05)  # halfway: half the rate
    assert rates("linear") == pytest.approx([*warm] + [0.1 * (10 - p) / 8 for p in range(2, 10)])
    no_warmup = TrainConfig(learning_rate=0.1)
    assert learner.learning_rate(no_warmup, 7, 10) == 0.1  # exactly the configured rate


def test_the_schedule_continues_across_rounds(tiny_config) -> None:
    """Round 2 of 2 with 3 local steps runs global steps 3, 4, 5 of 6."""
    cfg = tiny_config(
        "model.device=cpu",
        "federation.local_steps=3",
        "train.lr_schedule='cosine'",
        "train.warmup_steps=2",
    )
    with StepRecorder() as recorder:
        train(cfg, server_round=2)
    expected = [learner.learning_rate(cfg.train, position, 6) for position in (3, 4, 5)]
    assert recorder.rates == pytest.approx(expected)
    assert recorder.rates[0] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_grad_accum_equals_one_batch_of_all_its_micro_batches(tiny_config) -> None:
    """Two micro-batches of 2 draw the same examples as one batch of 4 (the same data
    stream), and the step's loss is normalised by all their target tokens together."""
    whole, whole_loss = train(tiny_config("model.device=cpu", "train.batch_size=4"))
    split, split_loss = train(
        tiny_config("model.device=cpu", "train.batch_size=2", "train.grad_accum=2")
    )
    assert split_loss == pytest.approx(whole_loss, abs=1e-5)
    for key in whole:
        np.testing.assert_allclose(split[key], whole[key], rtol=0, atol=1e-5)
    single, _ = train(tiny_config("model.device=cpu", "train.batch_size=2"))
    assert not np.allclose(single[next(iter(single))], split[next(iter(split))], atol=1e-5)


def test_clipping_bounds_the_gradient_norm_at_every_step(tiny_config) -> None:
    with StepRecorder() as free:
        train(tiny_config("model.device=cpu"))
    limit = min(free.norms) / 4
    with StepRecorder() as clipped:
        train(tiny_config("model.device=cpu", f"train.max_grad_norm={limit}"))
    assert max(clipped.norms) == pytest.approx(limit, rel=1e-5)
    assert all(n <= limit * (1 + 1e-5) for n in clipped.norms)


def test_gradient_checkpointing_gives_the_same_training(tiny_config) -> None:
    plain, plain_loss = train(tiny_config("model.device=cpu"))
    cfg = tiny_config("model.device=cpu", "train.gradient_checkpointing=true")
    checkpointed, loss = train(cfg)
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    for key in plain:
        np.testing.assert_allclose(checkpointed[key], plain[key], rtol=0, atol=1e-6)
    base = lora_model(cfg.model).base.model
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    again, _ = train(tiny_config("model.device=cpu"))  # switched off for a config without it
    assert not any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    assert not base.get_input_embeddings()._forward_hooks  # nothing of it is left
    assert all(np.array_equal(again[key], plain[key]) for key in plain)


def full_logits_nll(model, batch) -> torch.Tensor:
    """Per-sequence target NLL from every position's logits: the loss written out the long way."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        shifted.transpose(1, 2), labels, ignore_index=learner.IGNORE, reduction="none"
    )
    return per_token.sum(dim=1)


class EveryPosition(torch.nn.Module):
    """A model whose forward ignores ``logits_to_keep`` and returns every position's logits."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, **ignored):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_the_loss_forms_logits_only_where_a_target_follows(tiny_config) -> None:
    cfg = tiny_config()
    model = lora_model(cfg.model)
    model.activate(cfg.lora, cfg.lora.rank)
    tokenizer = model.tokenizer
    examples = load_client_data(cfg, 0).train[:5]
    batch = learner.collate(
        [learner.encode(tokenizer, e, cfg.model.max_length) for e in examples],
        tokenizer.pad_token_id,
    )
    net = model.peft.eval()
    logits, targets, rows = learner.target_logits(net, batch)
    following = batch["labels"][:, 1:]
    assert logits.shape == (learner.target_count(batch), net.config.vocab_size)
    assert targets.tolist() == following[following != learner.IGNORE].tolist()
    assert rows.tolist() == sorted(rows.tolist())
    assert logits.shape[0] < batch["labels"].numel() // 2  # the prompts' positions are skipped
    with torch.no_grad():
        expected = full_logits_nll(net, batch)
        per_sequence = learner.sequence_nll(net, batch)
        total, count = learner.target_nll(net, batch)
        unsliced = learner.sequence_nll(EveryPosition(net), batch)
    torch.testing.assert_close(per_sequence, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unsliced, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, expected.sum(), rtol=1e-5, atol=1e-5)
    assert count == learner.target_count(batch)
    # The gradient of the loss is that of the long way too (eval mode: no dropout).
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    learner.target_nll(net, batch)[0].backward()
    short = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    full_logits_nll(net, batch).sum().backward()
    for a, b in zip(short, (p.grad for p in params), strict=True):
        # float32 rounding of the same sums in another order, relative to the gradient's size
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    for p in params:
        p.grad = None
