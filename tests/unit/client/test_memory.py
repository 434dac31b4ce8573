"""The training-memory estimate against hand-computed terms and real peft/autograd counts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mira.client.learner import Encoded, collate
from mira.client.lora import lora_model
from mira.client.memory import (
    DTYPE_BYTES,
    FRAMEWORK_OVERHEAD_MB,
    MiB,
    ModelShape,
    choose_rank,
    estimate_training_memory,
    framework_overhead_mb,
    lora_parameter_count,
)
from mira.config import LoraConfig

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_SEVEN = (*ATTENTION, "gate_proj", "up_proj", "down_proj")

# A hand-made shape small enough to add up by hand: 2 layers, hidden 8, MLP 16, 2 query heads
# and 1 key/value head of size 4, vocabulary 32.
TINY = ModelShape(
    num_layers=2,
    hidden_size=8,
    intermediate_size=16,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=32,
    tie_word_embeddings=True,
    num_parameters=1000,
)

SMOLLM2 = ModelShape(
    num_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    num_parameters=134_515_008,
    head_dim=64,
)


def test_estimate_equals_the_hand_computed_terms() -> None:
    est = estimate_training_memory(
        TINY, 2, ["q_proj", "v_proj"], batch_size=3, seq_len=5, padded=False,
        framework_overhead_mb=1.0,
    )  # fmt: skip
    assert est.base_weights == 1000 * 4
    # q_proj 8 -> 8: 2 * (8 + 8) = 32; v_proj 8 -> 4: 2 * (8 + 4) = 24; 56 per layer, 2 layers.
    assert est.lora_parameters == 112 * 4
    assert est.lora_gradients == 112 * 4
    assert est.optimizer_state == 2 * 112 * 4
    # Per token per layer: norm inputs 2 * 8 + 2 rms = 18, attention input 8, queries 2 * 4 = 8,
    # keys and values 2 * 1 * 4 = 8, sdpa output 8 + log-sum-exp 2, MLP 3 * 16 = 48,
    # LoRA A outputs 2 * 2 = 4: 104. Two layers of 3 * 5 tokens, plus RoPE cos/sin 2 * 5 * 4.
    assert est.activations == (2 * 15 * 104 + 40) * 4
    # Forward: lm_head output 3 * 5 * 32 * 4 + two float32 copies 2 * 3 * 4 * 32 * 4 = 4992,
    # more than the backward's three 3 * 4 * 32 * 4 = 4608.
    assert est.logits == 4992
    assert est.framework_overhead == MiB
    assert est.total == 4000 + 448 + 448 + 896 + 12640 + 4992 + MiB
    assert est.as_mb()["total"] == pytest.approx(est.total / MiB)


def test_half_precision_terms_by_hand() -> None:
    """bfloat16 weights: the frozen weights and most activations take 2 bytes; the LoRA
    factors, gradients, AdamW moments and the float32 tensors of the LoRA path do not."""
    est = estimate_training_memory(
        TINY, 2, ["q_proj", "v_proj"], batch_size=3, seq_len=5, bytes_per_param=2,
        padded=False, framework_overhead_mb=0.0,
    )  # fmt: skip
    full = estimate_training_memory(
        TINY, 2, ["q_proj", "v_proj"], batch_size=3, seq_len=5, padded=False,
        framework_overhead_mb=0.0,
    )  # fmt: skip
    assert DTYPE_BYTES["bfloat16"] == DTYPE_BYTES["float16"] == 2
    assert est.base_weights == 1000 * 2
    assert (est.lora_parameters, est.lora_gradients, est.optimizer_state) == (448, 448, 896)
    assert (est.lora_parameters, est.optimizer_state) == (
        full.lora_parameters,
        full.optimizer_state,
    )
    # Per token per layer, in bfloat16: queries 8, keys and values 2 * 1 * 4 = 8, sdpa output
    # 8, MLP 3 * 16 = 48: 72 * 2 bytes. In float32: the two norms' upcast inputs and 1/rms
    # 2 * 8 + 2 = 18, log-sum-exp 2, LoRA A outputs 2 * 2 = 4, and a float32 copy of the
    # input of each LoRA module (q 8, v 8): 40 * 4 bytes. RoPE cos/sin 2 * 5 * 4 * 2 bytes.
    assert est.activations == 2 * 15 * (72 * 2 + 40 * 4) + 2 * 5 * 4 * 2
    # lm_head output 3 * 5 * 32 * 2 + two float32 copies 2 * 1536 = 4032 < backward's 3 * 1536.
    assert est.logits == 3 * 3 * 4 * 32 * 4


def test_framework_overhead_is_process_memory_on_the_cpu_only() -> None:
    assert framework_overhead_mb("cpu") == FRAMEWORK_OVERHEAD_MB
    assert framework_overhead_mb("cuda") == framework_overhead_mb("cuda:1") == 0.0


def test_padding_mask_and_eager_attention_terms() -> None:
    def activations(**options: Any) -> int:
        return estimate_training_memory(
            TINY, 2, ["q_proj", "v_proj"], 3, 5, framework_overhead_mb=0.0, **options
        ).activations

    # A padding mask: K and V repeated to both heads (+2 * 1 * 4) and a mask row (+5).
    assert activations(padded=True) - activations(padded=False) == 2 * 15 * 13 * 4
    # Eager: queries 8, repeated keys and values 2 * 2 * 4 = 16, probabilities 2 heads * 5
    # positions = 10, and no o_proj input (no LoRA there): 34, against sdpa's 8 + 8 + 8 + 2.
    assert activations(attention="eager") - activations(padded=False) == 2 * 15 * 8 * 4
    with pytest.raises(ValueError, match="attention"):
        activations(attention="flash")


def test_estimate_grows_with_rank_batch_and_length() -> None:
    def total(rank: int = 8, batch: int = 4, seq_len: int = 64) -> int:
        return estimate_training_memory(SMOLLM2, rank, ATTENTION, batch, seq_len).total

    assert total(4) < total(8) < total(16) < total(32)
    assert total(batch=1) < total(batch=2) < total(batch=4) < total(batch=8)
    assert total(seq_len=16) < total(seq_len=32) < total(seq_len=64) < total(seq_len=128)
    # Rank 8 -> 16 adds 8 * (576+576 + 576+192 + 576+192 + 576+576) = 30,720 LoRA parameters per
    # layer (x 4: factor, gradient, two moments; 4 bytes) and 4 modules * 8 saved A outputs
    # per token per layer.
    assert total(16) - total(8) == 30 * (4 * 4 * 30_720 + 4 * (4 * 64) * 4 * 8)
    # The loss's working set: lm_head output plus two float32 copies of the shifted logits.
    est = estimate_training_memory(SMOLLM2, 16, ATTENTION, 8, 128)
    assert est.logits == 8 * 49152 * (128 + 2 * 127) * 4


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_from_hf_config_counts_the_other_llama_layout_families(family: str) -> None:
    import transformers

    config = getattr(transformers, f"{family}Config")(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, head_dim=8,
    )  # fmt: skip
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    shape = ModelShape.from_hf_config(config)
    assert shape.num_parameters == sum(p.numel() for p in model.parameters())


def test_from_hf_config_refuses_another_architecture() -> None:
    from transformers import GPT2Config

    with pytest.raises(ValueError, match=r"Llama-layout models .* not 'gpt2'; give the clients"):
        ModelShape.from_hf_config(GPT2Config())


def test_from_hf_config_reproduces_smollm2() -> None:
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    shape = ModelShape.from_hf_config(config)
    assert shape == SMOLLM2
    assert shape.num_parameters == pytest.approx(134.5e6, rel=1e-3)
    assert shape.module_features("q_proj") == (576, 576)
    assert shape.module_features("model.layers.3.self_attn.k_proj") == (576, 192)
    assert shape.module_features("down_proj") == (1536, 576)
    with pytest.raises(ValueError, match="unknown target module 'c_attn'"):
        shape.module_features("c_attn")


@pytest.mark.parametrize(
    "options",
    [
        {"tie_word_embeddings": True},
        {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True},
        {"tie_word_embeddings": True, "head_dim": 12},  # head_dim != hidden / heads
    ],
)
def test_parameter_count_and_features_match_a_real_llama(options: dict[str, Any]) -> None:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        **options,
    )
    model = LlamaForCausalLM(config)
    shape = ModelShape.from_hf_config(config)
    assert shape.num_parameters == sum(p.numel() for p in model.parameters())
    for name, module in model.model.layers[0].named_modules():
        if isinstance(module, torch.nn.Linear):
            assert shape.module_features(name) == (module.in_features, module.out_features)


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_lora_parameter_count_matches_peft(tiny_config, rank: int) -> None:
    cfg = tiny_config("model.device=cpu")
    model = lora_model(cfg.model)
    shape = ModelShape.from_hf_config(model.base.model.config)
    name = model.activate(LoraConfig(rank=rank, target_modules=ALL_SEVEN), rank)
    counted = sum(p.numel() for p in model.lora_parameters(name))
    assert lora_parameter_count(shape, rank, ALL_SEVEN) == counted
    estimate = estimate_training_memory(shape, rank, ALL_SEVEN, 2, 8)
    assert estimate.lora_parameters == 4 * counted


def random_batch(vocab_size: int, batch_size: int, seq_len: int, padded: bool) -> dict:
    """Random sequences of seq_len tokens; padded: the later rows shorter (a padding mask)."""
    generator = torch.Generator().manual_seed(0)
    encoded = []
    for row in range(batch_size):
        length = seq_len - 3 * row if padded else seq_len
        ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
        encoded.append(Encoded(input_ids=ids, labels=ids))
    return collate(encoded, pad_id=0)


def saved_for_backward(model: torch.nn.Module, batch: dict) -> int:
    """Bytes autograd saves during one training forward pass, parameters excluded."""
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in frozen:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        model.train(was_training)
    return sum(saved.values())


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ALL_SEVEN])
def test_activations_equal_what_autograd_saves(tiny_config, padded: bool, targets) -> None:
    """Every byte the decoder saves for backward (sdpa), counted with saved-tensor hooks."""
    model = lora_model(tiny_config("model.device=cpu").model)
    assert model.base.model.config._attn_implementation == "sdpa"  # transformers' CPU default
    shape = ModelShape.from_hf_config(model.base.model.config)
    model.activate(LoraConfig(rank=4, target_modules=targets), 4)
    batch = random_batch(shape.vocab_size, 3, 10, padded)
    estimate = estimate_training_memory(shape, 4, targets, 3, 10, padded=padded)
    assert saved_for_backward(model.peft, batch) == estimate.activations


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ALL_SEVEN])
def test_bfloat16_activations_equal_what_autograd_saves(tiny_config, padded, targets) -> None:
    """Mixed precision (bfloat16 weights, float32 LoRA) saves other tensors in other
    dtypes; the estimate still counts them to the byte."""
    model = lora_model(tiny_config("model.device=cpu", "model.dtype=bfloat16").model)
    assert model.base.model.dtype == torch.bfloat16
    shape = ModelShape.from_hf_config(model.base.model.config)
    model.activate(LoraConfig(rank=4, target_modules=targets), 4)
    batch = random_batch(shape.vocab_size, 3, 10, padded)
    estimate = estimate_training_memory(shape, 4, targets, 3, 10, 2, padded=padded)
    assert saved_for_backward(model.peft, batch) == estimate.activations


@pytest.mark.parametrize("targets", [ATTENTION, ALL_SEVEN])
def test_eager_activations_equal_what_autograd_saves(targets) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(config), PeftLoraConfig(r=4, target_modules=list(targets))
    )
    assert model.config._attn_implementation == "eager"
    shape = ModelShape.from_hf_config(config)
    for padded in (False, True):
        estimate = estimate_training_memory(
            shape, 4, targets, 3, 10, attention="eager", padded=padded
        )
        assert saved_for_backward(model, random_batch(100, 3, 10, padded)) == estimate.activations


def test_choose_rank_picks_the_largest_rank_that_fits() -> None:
    def total_mb(rank: int) -> float:
        return estimate_training_memory(SMOLLM2, rank, ATTENTION, 4, 64).total / MiB

    choose = lambda budget: choose_rank(SMOLLM2, budget, [16, 4, 8], ATTENTION, 4, 64)  # noqa: E731
    assert choose(total_mb(16) + 100) == 16
    assert choose(total_mb(16)) == 16  # a budget equal to the estimate fits
    assert choose((total_mb(8) + total_mb(16)) / 2) == 8
    assert choose(total_mb(8)) == 8
    assert choose(total_mb(4) + 0.1) == 4
    smaller_batch = choose_rank(SMOLLM2, total_mb(4) - 1, [4, 8], ATTENTION, 2, 64)
    assert smaller_batch == 8  # halving the batch frees far more than rank 4 -> 8 costs


def test_choose_rank_names_the_budget_and_the_smallest_estimate() -> None:
    smallest = estimate_training_memory(SMOLLM2, 4, ATTENTION, 8, 128).total / MiB
    with pytest.raises(ValueError) as error:
        choose_rank(SMOLLM2, 500, [8, 4, 16], ATTENTION, 8, 128)
    message = str(error.value)
    assert "budget of 500 MB" in message
    assert f"{smallest:.0f} MB at rank 4" in message
    with pytest.raises(ValueError, match="at least one rank"):
        choose_rank(SMOLLM2, 500, [], ATTENTION, 8, 128)
