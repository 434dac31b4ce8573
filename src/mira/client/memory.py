"""Training-memory estimate of one LoRA client, and the rank a memory budget allows.

Clients differ (heterogeneous LoRA ranks, docs/design.md, "Two spaces for the pull"): a phone trains
rank 4, a workstation rank 16. :func:`choose_rank` picks, for a client's memory budget, the
largest rank of a configured set whose :func:`estimate_training_memory` fits.

The estimate is derived from what the training step of :mod:`mira.client.learner` keeps alive at its
peak, for a Llama-layout causal LM (model_type llama, mistral or qwen2: SmolLM2, Llama,
Mistral, Qwen2) with frozen base weights in float32, bfloat16 or float16, LoRA (dropout 0)
in float32 on some of the seven projections, and transformers' ``sdpa`` attention.
docs/memory.md derives each term, and benchmarks/memory.py checks the total against the
measured peak resident memory of SmolLM2-135M on the CPU.

Where it is counted: on the CPU, the process's live memory (the framework overhead included);
on a GPU (:func:`framework_overhead_mb`), the device memory torch's allocator hands out for the
client's tensors (``torch.cuda.max_memory_allocated``), without the CUDA context and kernels
each process holds besides, nor what the caching allocator keeps reserved (docs/gpu.md).

Pure numbers in, numbers out: nothing here imports torch or reads a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

MiB = 2**20
FLOAT32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LLAMA_LAYOUT = ("llama", "mistral", "qwen2")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES

# Process memory the tensor accounting does not see, in MiB: the tokenizer, the model's Python
# objects, shared-library pages first touched by training, small tensors kept in malloc's
# heap. The one calibrated constant: benchmarks/memory.py reports, per run on SmolLM2-135M,
# measured peak minus the tensor terms: 51-60 MiB over batch x tokens from 4 x 64 to 8 x 128,
# 1 or 2 threads, with glibc's mmap threshold pinned (docs/memory.md).
FRAMEWORK_OVERHEAD_MB = 55.0


def framework_overhead_mb(device: str) -> float:
    """The non-tensor overhead a budget on ``device`` covers: :data:`FRAMEWORK_OVERHEAD_MB`
    of process memory on the CPU; 0 on an accelerator, where the budget counts the tensors
    torch allocates on the device (the CUDA context is not a tensor and is not counted)."""
    return FRAMEWORK_OVERHEAD_MB if device == "cpu" else 0.0


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-architecture causal LM that training memory depends on."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    num_parameters: int  # all base parameters, a tied embedding counted once
    head_dim: int = 0  # 0: hidden_size // num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelShape:
        """Read a transformers config of a Llama-layout model (:data:`LLAMA_LAYOUT`).

        The parameter count is the Llama one: embedding, an untied output head, per layer
        the four attention projections, the three MLP projections and two RMSNorm weights
        (plus biases where ``attention_bias`` / ``mlp_bias``, and Qwen2's q/k/v biases),
        and the final norm. Raises ValueError for another architecture.
        """
        model_type = getattr(config, "model_type", "llama")
        if model_type not in LLAMA_LAYOUT:
            raise ValueError(
                f"the training-memory estimate knows Llama-layout models (model_type "
                f"{', '.join(LLAMA_LAYOUT)}), not {model_type!r}; give the clients a rank "
                f"(tasks[].rank or lora.ranks) instead of a memory budget"
            )
        h = config.hidden_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        inter = config.intermediate_size
        tied = bool(getattr(config, "tie_word_embeddings", False))
        q, kv = heads * head_dim, kv_heads * head_dim
        attention = h * q + 2 * h * kv + q * h
        if getattr(config, "attention_bias", False):
            attention += q + 2 * kv + h
        elif model_type == "qwen2":
            attention += q + 2 * kv
        mlp = 3 * h * inter
        if getattr(config, "mlp_bias", False):
            mlp += 2 * inter + h
        layer = attention + mlp + 2 * h
        embeddings = config.vocab_size * h * (1 if tied else 2)
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=h,
            intermediate_size=inter,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=config.vocab_size,
            tie_word_embeddings=tied,
            num_parameters=embeddings + config.num_hidden_layers * layer + h,
            head_dim=head_dim,
        )

    def module_features(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a target module, by its name or dotted suffix."""
        short = name.rsplit(".", 1)[-1]
        h, inter = self.hidden_size, self.intermediate_size
        q = self.num_attention_heads * self.head_size
        kv = self.num_key_value_heads * self.head_size
        features = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, inter),
            "up_proj": (h, inter),
            "down_proj": (inter, h),
        }
        if short not in features:
            raise ValueError(
                f"unknown target module {name!r} for a Llama-architecture model; "
                f"known: {', '.join(TARGET_MODULES)}"
            )
        return features[short]


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak training memory of one client, in bytes, term by term (see the estimate)."""

    base_weights: int
    lora_parameters: int
    lora_gradients: int
    optimizer_state: int
    activations: int
    logits: int
    framework_overhead: int

    @property
    def total(self) -> int:
        return (
            self.base_weights
            + self.lora_parameters
            + self.lora_gradients
            + self.optimizer_state
            + self.activations
            + self.logits
            + self.framework_overhead
        )

    def as_mb(self) -> dict[str, float]:
        """Every term and the total in MiB (2**20 bytes)."""
        terms = {k: v / MiB for k, v in asdict(self).items()}
        terms["total"] = self.total / MiB
        return terms


def lora_parameter_count(shape: ModelShape, rank: int, target_modules: Iterable[str]) -> int:
    """r * (in + out) per targeted module per layer: A is [r, in], B is [out, r]."""
    per_layer = sum(rank * sum(shape.module_features(m)) for m in set(_short(target_modules)))
    return shape.num_layers * per_layer


def activation_bytes_per_token(
    shape: ModelShape,
    rank: int,
    target_modules: Iterable[str],
    seq_len: int,
    bytes_per_param: int = FLOAT32,
    attention: str = "sdpa",
    padded: bool = True,
) -> int:
    """Bytes one decoder layer saves for backward per token (see estimate_training_memory)."""
    targets = set(_short(target_modules))
    h, inter, d = shape.hidden_size, shape.intermediate_size, shape.head_size
    heads, kv_heads = shape.num_attention_heads, shape.num_key_value_heads
    # sdpa gets grouped K/V (enable_gqa) only without a mask; otherwise they are repeated.
    saved_kv_heads = kv_heads if attention == "sdpa" and not padded else heads
    # Elements saved in the model's dtype:
    model = heads * d + 2 * saved_kv_heads * d  # queries and keys after RoPE, values
    model += 3 * inter  # gate output (SiLU), SiLU output and up output (their product)
    # Elements saved in float32 whatever the model's dtype:
    full = 2 * h + 2  # the two RMSNorms' inputs (upcast to float32) and their 1/rms
    full += rank * len(targets)  # each LoRA A output, saved by its B
    if attention == "sdpa":
        model += heads * d  # output (also the o_proj LoRA input)
        full += heads  # log-sum-exp
        if padded:
            model += seq_len  # the mask row, one per layer
    else:
        full += heads * seq_len  # softmax probabilities, computed in float32
        if bytes_per_param != FLOAT32:
            model += heads * seq_len  # and their copy in the model's dtype
    if bytes_per_param == FLOAT32:
        # LoRA A reads the tensors the frozen path saved or made anyway: q/k/v share the
        # normalised input, gate/up the MLP input; sdpa's output is the o_proj input.
        if targets & {"q_proj", "k_proj", "v_proj"}:
            full += h
        if attention == "eager" and "o_proj" in targets:
            full += heads * d
        if targets & {"gate_proj", "up_proj"}:
            full += h
        if "down_proj" in targets:
            full += inter
    else:
        # peft casts each LoRA input to float32 (the adapter's dtype): one copy per module.
        full += sum(shape.module_features(m)[0] for m in targets)
    return model * bytes_per_param + full * FLOAT32


def estimate_training_memory(
    shape: ModelShape,
    rank: int,
    target_modules: Sequence[str],
    batch_size: int,
    seq_len: int,
    bytes_per_param: int = FLOAT32,
    *,
    attention: str = "sdpa",
    padded: bool = True,
    framework_overhead_mb: float = FRAMEWORK_OVERHEAD_MB,
) -> MemoryEstimate:
    """Peak memory of one LoRA training step, in bytes, above the imported Python runtime.

    ``attention`` is the model's ``config._attn_implementation``: "sdpa" (transformers' default,
    which SmolLM2 gets on CPU) or "eager". ``padded``: whether batches carry a padding mask;
    mira.client.learner.collate pads every batch of unequal lengths, so True (the default) is the
    realistic and the larger case. ``framework_overhead_mb`` defaults to the calibrated
    :data:`FRAMEWORK_OVERHEAD_MB` (CPU); :func:`framework_overhead_mb` gives it per device.
    ``bytes_per_param`` is the size of the base weights' dtype (:data:`DTYPE_BYTES`): 4 for
    float32, 2 for bfloat16 or float16, mira's mixed precision, where everything LoRA is
    float32.

    With b = batch_size, s = seq_len, p = bytes_per_param, L layers, hidden size h, MLP size
    I, H query heads and G key/value heads of d = head_dim, vocabulary V, and r the rank:

    - base_weights = num_parameters * p (frozen; a tied embedding once).
    - lora_parameters = 4 * L * r * sum over targets of (in + out); LoRA factors stay float32
      (peft upcasts adapters).
    - lora_gradients = lora_parameters (float32; the previous step's gradients are still held
      during the next forward pass, since mira.client.learner zeroes them after the forward).
    - optimizer_state = 2 * lora_parameters (AdamW's first and second moments).
    - activations = L * b * s * n + 2 * s * d * p, n the bytes one decoder layer saves for
      backward per token (the first layer saves no norm input, the final norm saves one: they
      cancel). In float32 (p = 4), n = 4 x:
        2h + 2         residual inputs of the two RMSNorms and their 1/rms
        + h            normalised attention input, if q, k or v carries LoRA
        + H d + 2 G' d queries and keys after RoPE and values; G' = G (sdpa without a mask:
                       grouped-query attention in the kernel) or H (a padding mask, or eager:
                       transformers repeats K/V to every head)
        sdpa:  + H d + H     attention output (also the o_proj LoRA input), log-sum-exp,
               + s           with a padding mask, the float mask row saved per layer
        eager: + H s         softmax probabilities (b x H x s x s per layer),
               + H d         the o_proj input, if o_proj carries LoRA
        + 3 I          gate output, SiLU output and up output (inputs of SiLU and the product)
        + h, + I       MLP input if gate/up carry LoRA, down input if down_proj does
        + r * #targets the LoRA A outputs (saved by B)
      With bfloat16 or float16 weights (p = 2) the same tensors, in two groups. In the model
      dtype (p bytes each): queries, keys, values, the sdpa output and mask row, the three
      MLP tensors (and, eager, a copy of the probabilities). In float32 (4 bytes each): the
      RMSNorm inputs and 1/rms (RMSNorm upcasts), the log-sum-exp or the probabilities, the
      LoRA A outputs, and every targeted module's input once per module (peft casts each
      LoRA input to float32, so q/k/v and gate/up no longer share one; in_features each).
      Frozen projections without LoRA save nothing (their weight gets no gradient). Plus
      2 * s * d * p for the RoPE cosines and sines all layers share.
    - logits = the loss's working set, b * V * max(s * p + 2 * (s - 1) * 4, 3 * (s - 1) * 4):
      the lm_head output, plus a float32 contiguous copy of the shifted logits and its
      log-softmax in the forward pass; in the backward pass the gradients of the log-softmax
      and of its input next to the saved log-softmax. At vocabulary 49,152 one token's logits
      weigh as much as 85 hidden states of SmolLM2. This is the worst case, a batch whose
      every position is followed by a target: the loss forms logits only at those positions
      (:func:`mira.client.learner.target_logits`), so a task with short replies holds far
      less (the estimate errs high by up to this term, and a memory budget errs safe).
    - framework_overhead = ``framework_overhead_mb`` MiB, the one measured constant: the
      tokenizer, model objects and library pages first touched by training (not tensors).

    The peak is at the end of the forward pass (or the start of backward): every saved
    activation, the logits and the previous step's gradients are alive together. Per-layer
    transients are negligible and not counted; the embedding is frozen and needs no gradient.
    The activations term equals, byte for byte, what autograd saves
    (tests/unit/client/test_memory.py) with sdpa whenever q, k or v carries LoRA, and with eager
    when q and k both do; otherwise the first layer, whose input needs no gradient, saves less
    and the estimate errs high by at most that one layer. The same holds with bfloat16 weights
    on the CPU (tests/unit/client/test_memory.py counts both). CUDA's attention kernels save
    about the same (output and log-sum-exp) but were not counted here.

    On the CPU the total is the process's live memory: glibc's malloc can keep much more
    resident unless its mmap threshold is pinned (docs/memory.md, "Allocator"). On a GPU it
    is the device memory of the client's tensors (:func:`framework_overhead_mb`).
    """
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention = {attention!r}; choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    for name, value in (("rank", rank), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    lora = FLOAT32 * lora_parameter_count(shape, rank, target_modules)
    tokens = batch_size * seq_len
    per_token = activation_bytes_per_token(
        shape, rank, target_modules, seq_len, bytes_per_param, attention=attention, padded=padded
    )
    shifted = batch_size * (seq_len - 1) * shape.vocab_size * FLOAT32
    forward_logits = tokens * shape.vocab_size * bytes_per_param + 2 * shifted
    return MemoryEstimate(
        base_weights=shape.num_parameters * bytes_per_param,
        lora_parameters=lora,
        lora_gradients=lora,
        optimizer_state=2 * lora,
        activations=shape.num_layers * tokens * per_token
        + 2 * seq_len * shape.head_size * bytes_per_param,
        logits=max(forward_logits, 3 * shifted),
        framework_overhead=round(framework_overhead_mb * MiB),
    )


def choose_rank(
    shape: ModelShape,
    budget_mb: float,
    rank_choices: Iterable[int],
    target_modules: Sequence[str],
    batch_size: int,
    seq_len: int,
    **estimate_options: Any,
) -> int:
    """The largest rank in ``rank_choices`` whose estimated training memory fits ``budget_mb``.

    ``budget_mb`` is in MiB; ``estimate_options`` go to :func:`estimate_training_memory`.
    Raises ValueError naming the budget, the smallest estimate and its rank when none fits.
    """
    ranks = sorted(set(rank_choices))
    if not ranks:
        raise ValueError("rank_choices must name at least one rank")
    totals = {
        r: estimate_training_memory(
            shape, r, target_modules, batch_size, seq_len, **estimate_options
        ).total
        / MiB
        for r in ranks
    }
    fitting = [r for r in ranks if totals[r] <= budget_mb]
    if not fitting:
        smallest = min(ranks, key=totals.__getitem__)
        raise ValueError(
            f"no LoRA rank fits the memory budget of {budget_mb:.0f} MB: the smallest estimate "
            f"is {totals[smallest]:.0f} MB at rank {smallest} (batch {batch_size}, "
            f"{seq_len} tokens); raise the budget or lower train.batch_size / model.max_length"
        )
    return fitting[-1]


def _short(names: Iterable[str]) -> list[str]:
    return [n.rsplit(".", 1)[-1] for n in names]
