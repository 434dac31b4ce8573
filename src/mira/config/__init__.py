"""The one configuration schema of mira.

Every default lives here. A config is a TOML document with the sections below; it is
validated once, before any work starts, by :func:`load_config` / :func:`config_from_dict`,
and the resulting frozen :class:`Config` is trusted everywhere else.

An unknown key, a value of the wrong type or outside its allowed set raises
:class:`ConfigError` with a message naming the key (``section.key``) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from mira.errors import MiraError

METHODS = ("mira", "fedit", "cluster-fedavg", "cluster-merge", "local")
GRAPH_SOURCES = ("clusters", "tasks", "random", "full", "knn")
FINGERPRINT_GRAPHS = ("clusters", "knn")
CLUSTER_METHODS = ("kmeans", "agglomerative")
EDGE_WEIGHTS = ("uniform", "rbf")
FINGERPRINTS = ("gradient", "update")
PULL_SPACES = ("auto", "factor", "product")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:[0-9]+)?"
LR_SCHEDULES = ("constant", "cosine", "linear")
ALL_LINEAR = "all-linear"
TASK_KINDS = ("classification", "generation")
WANDB_MODES = ("offline", "online")
CHAT_TEMPLATES = ("auto", "on", "off")
TASK_METRICS = ("accuracy", "rouge_l", "exact_match", "token_f1")
"""Task metrics a client may report, all higher-is-better, in the order tables show them."""
AUTO = "auto"
QUICKSTART = "quickstart"


class ConfigError(MiraError, ValueError):
    """A configuration value is missing, unknown or not allowed."""


def _help(text: str, **choices: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"help": text}
    meta.update(choices)
    return meta


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(
        default="smollm2-135m-instruct",
        metadata=_help(
            "Base causal LM: 'smollm2-135m-instruct' (packaged, offline), "
            "'tiny-random-llama' (built locally, for tests and smoke runs; also "
            "tiny-random-qwen2, -mistral, -gemma, -phi3, -gpt2), "
            "a Hugging Face model id or a local directory."
        ),
    )
    max_length: int = field(
        default=64,
        metadata=_help(
            "Tokens per example (prompt + target), the prompt truncated from the left; the chat "
            "template's framing of the prompt (data.chat_template) comes on top."
        ),
    )
    cache_dir: str = field(
        default="",
        metadata=_help(
            "Where converted models and fetched packages are cached; '' = ~/.cache/mira."
        ),
    )
    device: str = field(
        default="auto",
        metadata=_help(
            "Where clients train: 'auto' (a CUDA GPU when one is visible, else Apple's mps, "
            "else the CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'."
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=_help(
            "Dtype of the frozen base weights; LoRA weights, gradients, optimizer state, the "
            "loss and the exchanged adapters stay float32. 'auto' = bfloat16 where the device "
            "supports it natively (CUDA compute capability >= 8.0, mps on macOS >= 14), "
            "float32 otherwise (always on the CPU).",
            choices=DTYPES,
        ),
    )


@dataclass(frozen=True)
class LoraConfig:
    rank: int = field(
        default=8,
        metadata=_help("LoRA rank r of every client without a rank of its own (see below)."),
    )
    ranks: tuple[int, ...] = field(
        default=(),
        metadata=_help(
            "Per-client ranks in client order (overrides tasks[].rank and memory budgets)."
        ),
    )
    rank_choices: tuple[int, ...] = field(
        default=(4, 8, 16),
        metadata=_help(
            "Ranks a client with a memory budget (tasks[].memory_mb) chooses from: the "
            "largest whose estimated training memory fits."
        ),
    )
    alpha: float = field(default=16.0, metadata=_help("LoRA alpha; the scale is alpha / r."))
    rslora: bool = field(
        default=False, metadata=_help("rsLoRA scaling alpha / sqrt(r) instead of alpha / r.")
    )
    dropout: float = field(default=0.0, metadata=_help("LoRA dropout probability."))
    target_modules: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "Module names (suffixes) that get LoRA adapters; [] = the attention projections "
            "of the model's family (q/k/v/o_proj for Llama, Qwen2, Mistral, Gemma; qkv_proj "
            "and o_proj for Phi-3; attn.c_attn and attn.c_proj for GPT-2; ...); "
            "['all-linear'] = every linear layer but the output head (peft's meaning)."
        ),
    )


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = field(
        default=4,
        metadata=_help(
            "Examples per micro-batch (one forward and backward pass); an optimizer step "
            "sees batch_size * grad_accum examples."
        ),
    )
    grad_accum: int = field(
        default=1,
        metadata=_help(
            "Micro-batches per optimizer step (gradient accumulation); the step's loss is the "
            "mean over all their target tokens."
        ),
    )
    learning_rate: float = field(default=3e-4, metadata=_help("AdamW learning rate."))
    lr_schedule: str = field(
        default="constant",
        metadata=_help(
            "Learning-rate schedule across the whole federation (position: the client's "
            "global step (round - 1) * local_steps + step, of rounds * local_steps), after "
            "train.warmup_steps of linear warmup from 0; cosine and linear decay to 0.",
            choices=LR_SCHEDULES,
        ),
    )
    warmup_steps: int = field(
        default=0,
        metadata=_help("Global steps of linear learning-rate warmup (see train.lr_schedule)."),
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    max_grad_norm: float = field(
        default=0.0,
        metadata=_help("Clip the LoRA gradients' global norm to this before a step; 0 = off."),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help(
            "Recompute each decoder layer's activations in the backward pass instead of "
            "keeping them: less memory, about a third more compute."
        ),
    )
    eval_batch_size: int = field(default=8, metadata=_help("Examples per evaluation batch."))
    max_new_tokens: int = field(
        default=24,
        metadata=_help("Generation tasks: greedy tokens generated per evaluation example."),
    )


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = field(default=3, metadata=_help("Federated rounds."))
    local_steps: int = field(default=5, metadata=_help("Local optimizer steps per round."))
    fraction: float = field(
        default=1.0, metadata=_help("Fraction of clients sampled per round, in (0, 1].")
    )
    seed: int = field(
        default=0,
        metadata=_help("Seed of the shared LoRA initialisation, client sampling and data order."),
    )
    workers: int = field(
        default=1,
        metadata=_help("Simulation Engine: client processes running at once (cores are shared)."),
    )
    gpus_per_client: float = field(
        default=0.0,
        metadata=_help(
            "Simulation Engine: the share of a GPU each client process reserves (Ray's "
            "num_gpus): 0.25 lets four clients share one GPU; a whole number gives each "
            "several. 0 = none reserved (clients still use a visible GPU, as model.device says)."
        ),
    )
    timeout: float = field(
        default=3600.0,
        metadata=_help(
            "Seconds the server waits for the SuperNodes of the config to connect and to "
            "answer first contact (which includes loading the base model)."
        ),
    )
    round_timeout: float = field(
        default=3600.0,
        metadata=_help(
            "Seconds each client has to answer an exchange, from when it can start on it (clients "
            "sharing a simulation worker start when the one before them answers); a client that "
            "has not answered by then is abandoned, recorded as timed out for that round, keeps "
            "its adapter and is asked again next round (its late reply is discarded)."
        ),
    )
    min_replies: float = field(
        default=0.5,
        metadata=_help(
            "Fraction of the clients contacted in an exchange that must answer with a usable "
            "reply for the round to complete; below it the run stops, its last checkpoint intact."
        ),
    )
    max_norm_ratio: float = field(
        default=10.0,
        metadata=_help(
            "A trained update (adapter minus the one sent) whose norm exceeds this many times "
            "the median update norm of the round (or of the last accepted updates) is rejected."
        ),
    )
    metrics_every: int = field(
        default=1,
        metadata=_help(
            "Task metrics (accuracy, ROUGE-L, exact match, F1) every N rounds and always after "
            "the last; the eval loss is measured every round."
        ),
    )


@dataclass(frozen=True)
class ServerConfig:
    method: str = field(
        default="mira",
        metadata=_help("Server rule.", choices=METHODS),
    )
    step: float | str = field(
        default=0.1,
        metadata=_help(
            "MIRA server step gamma = eta * lambda (gamma * max degree must be < 1), or 'auto': "
            "every round each client chooses its own mix weight alpha_k from server.auto_grid "
            "by its loss on its validation split (data.val_size), W_k <- (1 - alpha_k) W_k + "
            "alpha_k M_k with M_k its neighbours' weighted mean.",
            words=(AUTO,),
        ),
    )
    auto_grid: tuple[float, ...] = field(
        default=(0.0, 0.25, 0.5, 0.75, 1.0),
        metadata=_help(
            "server.step = 'auto': the mix weights alpha in [0, 1] every client tries "
            "(0 = keep its own adapter, 1 = take its neighbours' mean)."
        ),
    )
    auto_equal_share: bool = field(
        default=True,
        metadata=_help(
            "server.step = 'auto': also try each client's equal-share point n / (n + 1) for its "
            "n neighbours (on a uniform cluster, exactly cluster-fedavg)."
        ),
    )
    auto_smoothing: float = field(
        default=0.5,
        metadata=_help(
            "server.step = 'auto': weight in [0, 1) of the previous rounds in the mix weight a "
            "client applies, alpha_t = s * alpha_(t-1) + (1 - s) * (this round's choice); "
            "0 = apply each round's choice as it is."
        ),
    )
    auto_tolerance: float = field(
        default=1.0,
        metadata=_help(
            "server.step = 'auto': how many standard errors of the validation loss a candidate "
            "may lie above the best one and still count as good as it; among those, the client "
            "chooses the one nearest its equal-share point n / (n + 1). 0 = the argmin "
            "(docs/results.md measures both)."
        ),
    )
    graph: str = field(
        default="clusters",
        metadata=_help(
            "Task graph: 'clusters' (clustering of client fingerprints), 'tasks' (declared task "
            "labels, an oracle), 'random' (symmetric uniform weights above a threshold, the "
            "MIRA paper's setting), 'full', 'knn' (nearest fingerprints), or the path of a K x K "
            "matrix (.json, .csv or .npy) in client order. "
            "Every graph except a matrix file is scaled to max degree 1."
        ),
    )
    cluster_method: str = field(
        default="kmeans",
        metadata=_help("Clustering of fingerprints.", choices=CLUSTER_METHODS),
    )
    num_clusters: int = field(
        default=0,
        metadata=_help("Clusters for server.graph = 'clusters'; 0 = chosen by silhouette."),
    )
    edge_weights: str = field(
        default="uniform",
        metadata=_help(
            "Edge weights inside a cluster: uniform, or an RBF kernel of fingerprint distance "
            "(median-heuristic bandwidth).",
            choices=EDGE_WEIGHTS,
        ),
    )
    knn: int = field(
        default=1,
        metadata=_help(
            "'knn' graph: neighbours per client; 'clusters': a client left alone in its "
            "cluster gets edges to this many nearest clients (0 = leave it alone)."
        ),
    )
    random_threshold: float = field(
        default=0.5,
        metadata=_help("'random' graph: weights below this are dropped (in [0, 1))."),
    )
    graph_refresh: int = field(
        default=0,
        metadata=_help("Recompute fingerprints and the graph every N rounds; 0 = only once."),
    )
    fingerprint: str = field(
        default="gradient",
        metadata=_help(
            "Client fingerprint: the gradient of a fixed probe LoRA on a few local batches, "
            "or the probe's update after as many local steps.",
            choices=FINGERPRINTS,
        ),
    )
    fingerprint_dim: int = field(
        default=256, metadata=_help("Size of the randomly projected fingerprint.")
    )
    fingerprint_batches: int = field(
        default=4, metadata=_help("Local batches (or steps) a fingerprint is computed from.")
    )
    fingerprint_rank: int = field(
        default=8,
        metadata=_help("Rank of the probe LoRA: the same for every client, whatever its rank."),
    )
    pull_space: str = field(
        default="auto",
        metadata=_help(
            "Where the pull acts: 'factor' (A and B separately, equal ranks), "
            "'product' (B @ A, any ranks), 'auto' (factor when all ranks are equal).",
            choices=PULL_SPACES,
        ),
    )

    @property
    def auto_step(self) -> bool:
        """server.step = 'auto': each client chooses its own mix weight."""
        return self.step == AUTO


@dataclass(frozen=True)
class DataConfig:
    train_size: int = field(default=64, metadata=_help("Training examples per client."))
    eval_size: int = field(default=16, metadata=_help("Held-out evaluation examples per client."))
    val_size: int = field(
        default=0,
        metadata=_help(
            "Validation examples carved out of each client's training examples, for every "
            "method (so all train on the same examples); server.step = 'auto' chooses on them. "
            "Disjoint from the eval split, which never influences any choice."
        ),
    )
    dir: str = field(
        default="",
        metadata=_help("Folder of prepared task data; '' = the cache (see model.cache_dir)."),
    )
    label_skew: float = field(
        default=0.0,
        metadata=_help(
            "Dirichlet alpha of label skew among one classification task's clients; 0 = IID."
        ),
    )
    chat_template: str = field(
        default="auto",
        metadata=_help(
            "Render each prompt as one user turn of the tokenizer's chat template, with the "
            "generation prompt, and each target as the assistant's reply closed by the "
            "template's end of turn; the loss stays on the reply (mira.client.chat). 'auto' = "
            "on when the tokenizer has a chat template; 'on' = refuse a tokenizer without one; "
            "'off' = raw prompt text.",
            choices=CHAT_TEMPLATES,
        ),
    )


@dataclass(frozen=True)
class OutputConfig:
    tensorboard: bool = field(
        default=False,
        metadata=_help(
            "Also write TensorBoard event files (DIR/tensorboard) with the metrics.jsonl "
            "scalars; needs the tensorboard package (pip install 'mira[tensorboard]')."
        ),
    )
    wandb: bool = field(
        default=False,
        metadata=_help(
            "Also log the metrics.jsonl scalars (per round and per client) and the config to "
            "Weights & Biases, files under DIR/wandb; needs the wandb package "
            "(pip install 'mira[wandb]')."
        ),
    )
    wandb_project: str = field(
        default="mira", metadata=_help("output.wandb: the W&B project the run is logged to.")
    )
    wandb_mode: str = field(
        default="offline",
        metadata=_help(
            "output.wandb: 'offline' writes the run under DIR/wandb only, with no network "
            "(upload it later with `wandb sync DIR/wandb/offline-run-*`); 'online' also "
            "streams it to the W&B server (needs `wandb login`).",
            choices=WANDB_MODES,
        ),
    )


@dataclass(frozen=True)
class PrivacyConfig:
    clip_norm: float = field(
        default=0.0,
        metadata=_help(
            "Client-side differential privacy: each uploaded update (trained minus start "
            "adapter) is clipped to this L2 norm and gets Gaussian noise; 0 = off "
            "(docs/privacy.md)."
        ),
    )
    noise_multiplier: float = field(
        default=1.0,
        metadata=_help("Noise standard deviation as a multiple of privacy.clip_norm."),
    )
    delta: float = field(
        default=1e-5,
        metadata=_help("The delta of the (epsilon, delta) guarantee each run reports."),
    )


@dataclass(frozen=True)
class TaskConfig:
    name: str = field(default="", metadata=_help("Task name: a built-in task or your own."))
    clients: int = field(default=1, metadata=_help("Number of clients holding this task."))
    path: str = field(
        default="",
        metadata=_help(
            "User task: a local .jsonl, .csv, .parquet or .arrow file, a folder written by "
            "datasets' save_to_disk, or a Hugging Face dataset 'hf:NAME' / 'hf:NAME:CONFIG' "
            "for users with a hub ('' for built-ins)."
        ),
    )
    split: str = field(
        default="train",
        metadata=_help("User task from the hub or a save_to_disk folder of splits: the split."),
    )
    kind: str = field(
        default="",
        metadata=_help("User task kind: 'classification' or 'generation'."),
    )
    input_column: str = field(default="input", metadata=_help("User task: input column."))
    target_column: str = field(default="target", metadata=_help("User task: target column."))
    verbalisers: tuple[str, ...] = field(
        default=(), metadata=_help("User classification task: the label words.")
    )
    template: str = field(
        default="",
        metadata=_help("User task prompt template with '{input}'; '' = a default template."),
    )
    rank: int = field(default=0, metadata=_help("LoRA rank of this task's clients; 0 = lora.rank."))
    memory_mb: float = field(
        default=0.0,
        metadata=_help(
            "Training-memory budget of this task's clients in MB; their rank is the largest "
            "of lora.rank_choices that fits (0 = no budget)."
        ),
    )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    tasks: tuple[TaskConfig, ...] = ()

    @property
    def client_tasks(self) -> list[str]:
        """Task name of every client, in client (partition) order."""
        return [t.name for t in self.tasks for _ in range(t.clients)]

    @property
    def client_ids(self) -> list[str]:
        """Stable client identities, e.g. 'sentiment-0', in partition order."""
        return [f"{t.name}-{i}" for t in self.tasks for i in range(t.clients)]

    @property
    def num_clients(self) -> int:
        return sum(t.clients for t in self.tasks)

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "server": ServerConfig,
    "data": DataConfig,
    "output": OutputConfig,
    "privacy": PrivacyConfig,
}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(key: str, value: Any, annotation: Any, words: tuple[str, ...] = ()) -> Any:
    """Check one value against its annotated type; ints are accepted for floats.

    A ``float | str`` field takes a number or one of its ``words`` (e.g. server.step = "auto").
    """
    if annotation == (float | str):
        if isinstance(value, str):
            if value not in words:
                raise ConfigError(
                    f"{key} must be a number or one of: {', '.join(words)}; got {value!r}"
                )
            return value
        return _coerce(key, value, float)
    if get_origin(annotation) is tuple:
        (item_type, _ellipsis) = get_args(annotation)
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key} must be a list of {item_type.__name__}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {annotation!r} for {key}")


def _build_section(section: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{section}] must be a table of keys, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(
                f"unknown key {section}.{key}; allowed keys: {allowed}"
                + _did_you_mean(key, fields, f"{section}.")
            )
        choices = fields[key].metadata.get("choices")
        words = fields[key].metadata.get("words", ())
        try:
            coerced = _coerce(f"{section}.{key}", value, hints[key], words)
        except ConfigError as err:
            if isinstance(value, str) and words:  # e.g. server.step = "atuo"
                raise ConfigError(f"{err}{_did_you_mean(value, words)}") from None
            raise
        if choices is not None and coerced not in choices:
            raise ConfigError(
                f"{section}.{key} = {coerced!r} is not allowed; choose one of: "
                + ", ".join(choices)
                + _did_you_mean(str(coerced), choices)
            )
        values[key] = coerced
    return cls(**values)


def _check_ranges(cfg: Config) -> None:
    def positive(key: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value!r}")

    positive("model.max_length", cfg.model.max_length)
    positive("lora.rank", cfg.lora.rank)
    for i, rank in enumerate(cfg.lora.ranks):
        positive(f"lora.ranks[{i}]", rank)
    if cfg.lora.ranks and len(cfg.lora.ranks) != cfg.num_clients:
        raise ConfigError(
            f"lora.ranks has {len(cfg.lora.ranks)} entries but the tasks declare "
            f"{cfg.num_clients} clients; give one rank per client or leave it empty"
        )
    if not cfg.lora.rank_choices:
        raise ConfigError("lora.rank_choices must list at least one rank")
    for i, rank in enumerate(cfg.lora.rank_choices):
        positive(f"lora.rank_choices[{i}]", rank)
    positive("lora.alpha", cfg.lora.alpha)
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout!r}")
    if ALL_LINEAR in cfg.lora.target_modules and len(cfg.lora.target_modules) > 1:
        raise ConfigError(
            f"lora.target_modules: '{ALL_LINEAR}' stands alone (every linear layer); got "
            f"{list(cfg.lora.target_modules)}"
        )
    if not re.fullmatch(DEVICE_PATTERN, cfg.model.device):
        raise ConfigError(
            f"model.device = {cfg.model.device!r} is not allowed; choose one of: auto, cpu, "
            "cuda, cuda:N (N a GPU index), mps"
        )
    positive("train.batch_size", cfg.train.batch_size)
    positive("train.learning_rate", cfg.train.learning_rate)
    positive("train.eval_batch_size", cfg.train.eval_batch_size)
    positive("train.max_new_tokens", cfg.train.max_new_tokens)
    positive("train.grad_accum", cfg.train.grad_accum)
    if cfg.train.max_grad_norm < 0:
        raise ConfigError(
            f"train.max_grad_norm must be >= 0 (0 = no clipping), got {cfg.train.max_grad_norm!r}"
        )
    total_steps = cfg.federation.rounds * cfg.federation.local_steps
    if not 0 <= cfg.train.warmup_steps < max(total_steps, 1):
        raise ConfigError(
            f"train.warmup_steps = {cfg.train.warmup_steps} must be >= 0 and below "
            f"federation.rounds * federation.local_steps = {total_steps}"
        )
    if cfg.train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay must be >= 0, got {cfg.train.weight_decay!r}")
    positive("federation.rounds", cfg.federation.rounds)
    positive("federation.local_steps", cfg.federation.local_steps)
    positive("federation.workers", cfg.federation.workers)
    gpus = cfg.federation.gpus_per_client
    if gpus < 0 or (gpus > 1 and not gpus.is_integer()):
        raise ConfigError(
            f"federation.gpus_per_client must be a fraction in [0, 1] or a whole number of "
            f"GPUs, got {gpus!r}"
        )
    positive("federation.metrics_every", cfg.federation.metrics_every)
    positive("federation.timeout", cfg.federation.timeout)
    positive("federation.round_timeout", cfg.federation.round_timeout)
    if not 0.0 < cfg.federation.min_replies <= 1.0:
        raise ConfigError(
            f"federation.min_replies must be in (0, 1], got {cfg.federation.min_replies!r}"
        )
    if cfg.federation.max_norm_ratio <= 1.0:
        raise ConfigError(
            f"federation.max_norm_ratio must be > 1, got {cfg.federation.max_norm_ratio!r}"
        )
    if not 0.0 < cfg.federation.fraction <= 1.0:
        raise ConfigError(f"federation.fraction must be in (0, 1], got {cfg.federation.fraction!r}")
    if cfg.federation.seed < 0:
        raise ConfigError(f"federation.seed must be >= 0, got {cfg.federation.seed!r}")
    if not cfg.server.auto_step and float(cfg.server.step) < 0:
        raise ConfigError(f"server.step must be >= 0, got {cfg.server.step!r}")
    for i, alpha in enumerate(cfg.server.auto_grid):
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"server.auto_grid[{i}] = {alpha!r} must be in [0, 1]")
    if cfg.server.auto_step and not (cfg.server.auto_grid or cfg.server.auto_equal_share):
        raise ConfigError(
            "server.step = 'auto' needs candidates: list some in server.auto_grid or set "
            "server.auto_equal_share = true"
        )
    if not 0.0 <= cfg.server.auto_smoothing < 1.0:
        raise ConfigError(
            f"server.auto_smoothing must be in [0, 1), got {cfg.server.auto_smoothing!r}"
        )
    if not (math.isfinite(cfg.server.auto_tolerance) and cfg.server.auto_tolerance >= 0):
        raise ConfigError(
            f"server.auto_tolerance must be a finite number >= 0, got {cfg.server.auto_tolerance!r}"
        )
    if cfg.server.num_clusters < 0:
        raise ConfigError(f"server.num_clusters must be >= 0, got {cfg.server.num_clusters!r}")
    if cfg.server.knn < 0:
        raise ConfigError(f"server.knn must be >= 0, got {cfg.server.knn!r}")
    if cfg.server.graph == "knn" and cfg.server.knn < 1:
        raise ConfigError("server.graph = 'knn' needs server.knn >= 1")
    if not 0.0 <= cfg.server.random_threshold < 1.0:
        raise ConfigError(
            f"server.random_threshold must be in [0, 1), got {cfg.server.random_threshold!r}"
        )
    if cfg.server.graph_refresh < 0:
        raise ConfigError(f"server.graph_refresh must be >= 0, got {cfg.server.graph_refresh!r}")
    positive("server.fingerprint_dim", cfg.server.fingerprint_dim)
    positive("server.fingerprint_batches", cfg.server.fingerprint_batches)
    positive("server.fingerprint_rank", cfg.server.fingerprint_rank)
    if cfg.server.graph not in GRAPH_SOURCES and not cfg.server.graph.endswith(
        (".json", ".csv", ".npy")
    ):
        raise ConfigError(
            f"server.graph = {cfg.server.graph!r} is not allowed; choose one of: "
            + ", ".join(GRAPH_SOURCES)
            + ", or a matrix file ending in .json, .csv or .npy"
        )
    if cfg.privacy.clip_norm < 0:
        raise ConfigError(f"privacy.clip_norm must be >= 0, got {cfg.privacy.clip_norm!r}")
    if cfg.privacy.noise_multiplier < 0:
        raise ConfigError(
            f"privacy.noise_multiplier must be >= 0, got {cfg.privacy.noise_multiplier!r}"
        )
    if not 0.0 < cfg.privacy.delta < 1.0:
        raise ConfigError(f"privacy.delta must be in (0, 1), got {cfg.privacy.delta!r}")
    positive("data.train_size", cfg.data.train_size)
    positive("data.eval_size", cfg.data.eval_size)
    if not 0 <= cfg.data.val_size < cfg.data.train_size:
        raise ConfigError(
            f"data.val_size = {cfg.data.val_size} must be >= 0 and below data.train_size = "
            f"{cfg.data.train_size} (validation examples are carved out of the training ones)"
        )
    if cfg.server.method == "mira" and cfg.server.auto_step and cfg.data.val_size == 0:
        raise ConfigError(
            "server.step = 'auto' chooses each client's mix weight on its validation split: "
            "set data.val_size > 0 (for example 8)"
        )
    if cfg.data.label_skew < 0:
        raise ConfigError(f"data.label_skew must be >= 0, got {cfg.data.label_skew!r}")
    if not re.fullmatch(r"[^/\\#?%:]{1,128}", cfg.output.wandb_project):
        raise ConfigError(
            f"output.wandb_project = {cfg.output.wandb_project!r} is not a W&B project name: "
            "1 to 128 characters, none of / \\ # ? % :"
        )
    if not cfg.tasks:
        raise ConfigError("at least one [[tasks]] entry is required")
    seen: set[str] = set()
    for i, task in enumerate(cfg.tasks):
        where = f"tasks[{i}]"
        if not task.name:
            raise ConfigError(f"{where}.name is required")
        if task.name in seen:
            raise ConfigError(f"{where}.name = {task.name!r} is declared twice")
        seen.add(task.name)
        positive(f"{where}.clients", task.clients)
        if task.rank < 0:
            raise ConfigError(f"{where}.rank must be >= 0 (0 = lora.rank), got {task.rank!r}")
        if task.memory_mb < 0:
            raise ConfigError(f"{where}.memory_mb must be >= 0, got {task.memory_mb!r}")
        if task.path and task.kind not in TASK_KINDS:
            raise ConfigError(
                f"{where}.kind = {task.kind!r} is not allowed for a user task; choose one of: "
                + ", ".join(TASK_KINDS)
            )


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a parsed TOML mapping."""
    if not isinstance(raw, Mapping):
        raise ConfigError("a config must be a TOML table")
    allowed = [*SECTIONS, "tasks"]
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "tasks":
            continue
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}]; allowed sections: {', '.join(allowed)}")
        sections[name] = _build_section(name, SECTIONS[name], value)
    raw_tasks = raw.get("tasks", [])
    if not isinstance(raw_tasks, Sequence) or isinstance(raw_tasks, str):
        raise ConfigError("tasks must be an array of tables ([[tasks]])")
    tasks = tuple(_build_section(f"tasks[{i}]", TaskConfig, t) for i, t in enumerate(raw_tasks))
    cfg = Config(**sections, tasks=tasks)
    _check_ranges(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse 'section.key=value'; the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, value_text = text.split("=", 1)
    path = [p.strip() for p in dotted.strip().split(".")]
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override {text!r} must name section.key")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each 'section.key=value' applied.

    ``tasks.N.key=value`` addresses the N-th task entry.
    """
    result = json.loads(json.dumps(raw))
    for text in overrides:
        path, value = parse_override(text)
        node: Any = result
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {text!r}: no entry {part} in {'.'.join(path[:i])}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {text!r} does not address a key")
        node[path[-1]] = value
    return result


def read_raw(source: str | Path | None) -> dict[str, Any]:
    """Read a TOML config file, or the packaged quickstart when ``source`` is None."""
    if source is None or str(source) == QUICKSTART:
        text = resources.files("mira.configs").joinpath("quickstart.toml").read_text()
        return tomllib.loads(text)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate a config; ``source=None`` is the packaged quickstart."""
    return config_from_dict(apply_overrides(read_raw(source), overrides))


def describe() -> list[tuple[str, str, str]]:
    """(key, default, help) for every key of the schema, for the README and ``mira config``."""
    rows = []
    for section, cls in [*SECTIONS.items(), ("tasks[]", TaskConfig)]:
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = getattr(defaults, f.name)
            help_text = f.metadata.get("help", "")
            if "choices" in f.metadata:
                help_text += " One of: " + ", ".join(f.metadata["choices"]) + "."
            rows.append((f"{section}.{f.name}", json.dumps(_plain(default)), help_text))
    return rows


def _did_you_mean(word: str, known: Sequence[str] | Mapping[str, Any], prefix: str = "") -> str:
    """'; did you mean server.step?' for the closest known word, or '' if none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def to_toml(cfg: Config) -> str:
    """The config as TOML, every key filled in; :func:`load_config` reads it back to an equal
    :class:`Config` (``mira config --show`` prints it, a run directory keeps it)."""
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())


# Keys that change how fast a run goes and how it waits, not what it computes: a finished run
# stays reusable when only these differ (mira compare), and a resumed run may change them.
OPERATIONAL_KEYS = (
    "federation.workers",
    "federation.timeout",
    "federation.round_timeout",
    "federation.min_replies",
)
# What a resumed run may change: how long it goes on, and the operational keys.
RESUME_KEYS = ("federation.rounds", *OPERATIONAL_KEYS)


# Keys added after run directories were first written, with the value that reproduces what a
# run written before them computed: its config.toml lacks the key, and today's default could
# compute something else (before data.chat_template every prompt went to the model raw).
WRITTEN_BEFORE = {"data.chat_template": "off"}


def load_run_config(run_config: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config a run directory's ``config.toml`` records, a key it predates taking the value
    of :data:`WRITTEN_BEFORE` (so resuming or comparing it changes nothing silently)."""
    return run_config_from_dict(read_raw(run_config), overrides)


def run_config_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """:func:`load_run_config` of a config a run recorded as a dict (its checkpoint keeps one)."""
    filled: dict[str, Any] = json.loads(json.dumps(raw))  # a copy, to fill in what it predates
    for dotted, value in WRITTEN_BEFORE.items():
        section, key = dotted.split(".")
        if isinstance(filled.get(section, {}), dict):
            filled.setdefault(section, {}).setdefault(key, value)
    return config_from_dict(apply_overrides(filled, overrides))


def load_resumed(run_config: str | Path, overrides: Sequence[str]) -> Config:
    """The config of a run being resumed: its own ``config.toml``, with only the overrides a
    resumed run may take (:data:`RESUME_KEYS`)."""
    allowed = tuple(f"{key}=" for key in RESUME_KEYS)
    for override in overrides:
        if not override.strip().startswith(allowed):
            raise ConfigError(
                f"--set {override}: a resumed run keeps its config; only "
                f"{', '.join(RESUME_KEYS)} may change"
            )
    return load_run_config(run_config, overrides)


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every key two config dicts disagree on, in order;
    a section that is not a table on both sides (the task list) counts as one key."""
    found = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            found += [
                (f"{section}.{key}", a.get(key), b.get(key))
                for key in sorted(set(a) | set(b))
                if a.get(key) != b.get(key)
            ]
        elif a != b:
            found.append((section, a, b))
    return found


def resume_changes(stored: Config, resumed: Config) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every key outside :data:`RESUME_KEYS` on which a
    resumed run's config differs from the run it continues; empty when it may resume."""
    return [
        change
        for change in differing_keys(stored.to_dict(), resumed.to_dict())
        if change[0] not in RESUME_KEYS
    ]


def describe_changes(changes: Sequence[tuple[str, Any, Any]]) -> str:
    """'server.step 0.3 -> 0.9, ...' (long values cut short)."""

    def shown(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return ", ".join(f"{key} {shown(old)} -> {shown(new)}" for key, old, new in changes)


def check_resumable(stored: Config, resumed: Config, where: str = "the run's config.toml") -> None:
    """A resumed run may differ from the run it continues (``stored``, as ``where`` records it)
    only in :data:`RESUME_KEYS`."""
    changes = resume_changes(stored, resumed)
    if changes:
        raise ConfigError(
            f"a resumed run keeps its config, but {', '.join(c[0] for c in changes)} differ "
            f"from {where} ({describe_changes(changes)}); only {', '.join(RESUME_KEYS)} may "
            "change"
        )
