"""The tiny random models: ``tiny-random-<family>`` (llama, qwen2, mistral, gemma, phi3,
gpt2), a two-layer model of that architecture with random weights and a small byte-level BPE
tokenizer they all share, built locally from a fixed seed, for tests and smoke runs (the
README's smoke run uses ``model.name = "tiny-random-llama"``).

:func:`build_tiny_model` builds one in memory; :mod:`mira.client.base` saves it once into the
cache and loads it like any other base model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

TINY_RANDOM = "tiny-random-"
TINY_RANDOM_LLAMA = "tiny-random-llama"


# A fixed corpus for the tiny tokenizer: enough English to give sensible merges.
_TINY_CORPUS = [
    "the movie was great and i loved it positive negative review sentiment",
    "topic category news sport science politics computer religion question answer",
    "summarise the article in one sentence the claim is supported refuted",
    "what is the answer to the question given the context emotion joy anger",
] * 8


def _tiny_tokenizer() -> Any:
    """The small byte-level BPE tokenizer every tiny model shares (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _tiny_llama_like(config_class: str, model_class: str, **extra: Any) -> Callable[[int], Any]:
    """Two decoder layers, hidden 32, 4 query and 2 key/value heads, tied embeddings."""

    def build(vocab_size: int) -> Any:
        import transformers

        config = getattr(transformers, config_class)(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True,
            **extra,
        )
        return getattr(transformers, model_class)(config)

    return build


def _tiny_gpt2(vocab_size: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config)


# tiny-random-<family>: how to build the random model, given the tokenizer's vocabulary size.
TINY_FAMILIES: dict[str, Callable[[int], Any]] = {
    TINY_RANDOM_LLAMA: _tiny_llama_like("LlamaConfig", "LlamaForCausalLM"),
    f"{TINY_RANDOM}qwen2": _tiny_llama_like("Qwen2Config", "Qwen2ForCausalLM"),
    f"{TINY_RANDOM}mistral": _tiny_llama_like(
        "MistralConfig", "MistralForCausalLM", sliding_window=None
    ),
    f"{TINY_RANDOM}gemma": _tiny_llama_like("GemmaConfig", "GemmaForCausalLM", head_dim=8),
    f"{TINY_RANDOM}phi3": _tiny_llama_like(
        "Phi3Config", "Phi3ForCausalLM", original_max_position_embeddings=256
    ),
    f"{TINY_RANDOM}gpt2": _tiny_gpt2,
}


def build_tiny_model(name: str) -> tuple[Any, Any]:
    """(model, tokenizer) of the tiny model ``name`` (a key of :data:`TINY_FAMILIES`): the
    shared tokenizer, then the weights drawn right after ``torch.manual_seed(0)``, so every
    build of a name holds the same numbers."""
    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    model = TINY_FAMILIES[name](len(tokenizer))
    return model, tokenizer
