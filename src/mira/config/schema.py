"""The one configuration schema of mira: its sections, every key's type, default and help.

Every default lives here. :mod:`mira.config.load` reads a TOML document into these frozen
dataclasses and :mod:`mira.config.checks` validates it once; the resulting :class:`Config` is
trusted everywhere else.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
