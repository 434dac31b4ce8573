"""The one configuration schema of mira: its sections, every key's type, default and help.

Every default lives here. Each key is a dataclass field whose metadata (:func:`_meta`) also
carries the rules its value follows (choices, :class:`Bounds`, :class:`Pattern`) and its roles
(:data:`RESUMABLE`, :data:`OPERATIONAL`), from which the key lists derive.
:mod:`mira.config.load` reads a TOML document into these frozen dataclasses and
:mod:`mira.config.checks` validates it once; the resulting :class:`Config` is trusted
everywhere else.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from mira.config.rules import RULES
from mira.errors import MiraError

METHODS = tuple(RULES)
"""The server rules, ``server.method``'s choices: the names of :data:`mira.config.rules.RULES`."""
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
POOLS = ("client", "cluster")
TASK_METRICS = ("accuracy", "rouge_l", "exact_match", "token_f1")
"""Task metrics a client may report, all higher-is-better, in the order tables show them."""
AUTO = "auto"
QUICKSTART = "quickstart"


class ConfigError(MiraError, ValueError):
    """A configuration value is missing, unknown or not allowed."""


@dataclass(frozen=True)
class Bounds:
    """The numbers a key, or each entry of a list key, may take.

    ``text`` says them in the error: ``"{key} must be {text}, got {value!r}"``, or
    ``"{key}[{i}] = {value!r} must be {text}"`` for an entry of a list.
    """

    text: str
    allows: Callable[[float], bool]

    @classmethod
    def parse(cls, text: str) -> Bounds:
        """Bounds written as the error says them: '> 0', '>= 0', '[0, 1)', '(0, 1]', ..., a note
        in parentheses after them if any ('>= 0 (0 = off)')."""
        found = _BOUNDS.fullmatch(text)
        if found is None:
            raise ValueError(f"bounds {text!r} are not written as '> 0' or '[0, 1)'")
        if found["op"]:
            bound, above = float(found["bound"]), _ABOVE[found["op"]]
            return cls(text, lambda v: above(v, bound))
        low, high = float(found["low"]), float(found["high"])
        above_low = _ABOVE[">" if found["open_low"] == "(" else ">="]
        below_high = _BELOW["<" if found["open_high"] == ")" else "<="]
        return cls(f"in {text}", lambda v: above_low(v, low) and below_high(v, high))


_BOUNDS = re.compile(
    r"(?:(?P<op>>=|>) (?P<bound>\S+)"
    r"|(?P<open_low>[\[(])(?P<low>\S+), (?P<high>\S+)(?P<open_high>[\])]))"
    r"(?: \(.+\))?"  # a note: '>= 0 (0 = off)'
)
_ABOVE: dict[str, Callable[[float, float], bool]] = {">": operator.gt, ">=": operator.ge}
_BELOW: dict[str, Callable[[float, float], bool]] = {"<": operator.lt, "<=": operator.le}


@dataclass(frozen=True)
class Pattern:
    """The strings a key may take: ``regex``, matched in full. ``says`` ends the error
    ``"{key} = {value!r} {says}"``."""

    regex: str
    says: str


OPERATIONAL = "operational"
"""Role of a key that changes how fast a run goes and how it waits, not what it computes: a
finished run stays reusable when only such keys differ (mira compare), and a resumed run may
change them."""
RESUMABLE = "resumable"
"""Role of a key a resumed run may change although it changes what the run computes."""


def _meta(
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    words: tuple[str, ...] = (),
    bounds: str | Bounds | None = None,
    pattern: Pattern | None = None,
    if_empty: str = "",
    role: str = "",
) -> dict[str, Any]:
    """A key's field metadata: its ``help`` (``mira config``, the README reference) and the rules
    :func:`mira.config.checks.check_key` enforces, the one place that does.

    - ``choices``: the only strings allowed ("{key} = 'x' is not allowed; choose one of: ...");
    - ``words``: strings a number key takes as well (server.step = 'auto'), checked with its type;
    - ``bounds``: the numbers allowed, of the key or of each entry of a list (:class:`Bounds`,
      or its text for :meth:`Bounds.parse`);
    - ``pattern``: the strings allowed (:class:`Pattern`);
    - ``if_empty``: '' and [] are refused with this error ("{key} is required");
    - ``role``: :data:`OPERATIONAL` or :data:`RESUMABLE`, from which the key lists derive.
    """
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if words:
        meta["words"] = words
    if bounds is not None:
        meta["bounds"] = Bounds.parse(bounds) if isinstance(bounds, str) else bounds
    if pattern is not None:
        meta["pattern"] = pattern
    if if_empty:
        meta["if_empty"] = if_empty
    if role:
        meta["role"] = role
    return meta


def _gpu_share(gpus: float) -> bool:
    return 0 <= gpus <= 1 or (gpus > 1 and gpus.is_integer())


def _not_negative(value: float) -> bool:
    return value >= 0


def _no_or_three(value: float) -> bool:
    return value == 0 or value >= 3


_GRAPH = Pattern(
    "|".join(GRAPH_SOURCES) + r"|(?s:.*)\.(json|csv|npy)",
    "is not allowed; choose one of: "
    + ", ".join(GRAPH_SOURCES)
    + ", or a matrix file ending in .json, .csv or .npy",
)


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(
        default="smollm2-135m-instruct",
        metadata=_meta(
            "Base causal LM: 'smollm2-135m-instruct' (packaged, offline), "
            "'tiny-random-llama' (built locally, for tests and smoke runs; also "
            "tiny-random-qwen2, -mistral, -gemma, -phi3, -gpt2), "
            "a Hugging Face model id or a local directory."
        ),
    )
    max_length: int = field(
        default=64,
        metadata=_meta(
            "Tokens per example (prompt + target), the prompt truncated from the left; the chat "
            "template's framing of the prompt (data.chat_template) comes on top.",
            bounds="> 0",
        ),
    )
    cache_dir: str = field(
        default="",
        metadata=_meta(
            "Where converted models and fetched packages are cached; '' = ~/.cache/mira."
        ),
    )
    device: str = field(
        default="auto",
        metadata=_meta(
            "Where clients train: 'auto' (a CUDA GPU when one is visible, else Apple's mps, "
            "else the CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'.",
            pattern=Pattern(
                DEVICE_PATTERN,
                "is not allowed; choose one of: auto, cpu, cuda, cuda:N (N a GPU index), mps",
            ),
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=_meta(
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
        metadata=_meta(
            "LoRA rank r of every client without a rank of its own (see below).", bounds="> 0"
        ),
    )
    ranks: tuple[int, ...] = field(
        default=(),
        metadata=_meta(
            "Per-client ranks in client order (overrides tasks[].rank and memory budgets).",
            bounds="> 0",
        ),
    )
    rank_choices: tuple[int, ...] = field(
        default=(4, 8, 16),
        metadata=_meta(
            "Ranks a client with a memory budget (tasks[].memory_mb) chooses from: the "
            "largest whose estimated training memory fits.",
            bounds="> 0",
            if_empty="must list at least one rank",
        ),
    )
    alpha: float = field(
        default=16.0, metadata=_meta("LoRA alpha; the scale is alpha / r.", bounds="> 0")
    )
    rslora: bool = field(
        default=False, metadata=_meta("rsLoRA scaling alpha / sqrt(r) instead of alpha / r.")
    )
    dropout: float = field(
        default=0.0, metadata=_meta("LoRA dropout probability.", bounds="[0, 1)")
    )
    target_modules: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
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
        metadata=_meta(
            "Examples per micro-batch (one forward and backward pass); an optimizer step "
            "sees batch_size * grad_accum examples.",
            bounds="> 0",
        ),
    )
    grad_accum: int = field(
        default=1,
        metadata=_meta(
            "Micro-batches per optimizer step (gradient accumulation); the step's loss is the "
            "mean over all their target tokens.",
            bounds="> 0",
        ),
    )
    learning_rate: float = field(default=3e-4, metadata=_meta("AdamW learning rate.", bounds="> 0"))
    lr_schedule: str = field(
        default="constant",
        metadata=_meta(
            "Learning-rate schedule across the whole federation (position: the client's "
            "global step (round - 1) * local_steps + step, of rounds * local_steps), after "
            "train.warmup_steps of linear warmup from 0; cosine and linear decay to 0.",
            choices=LR_SCHEDULES,
        ),
    )
    warmup_steps: int = field(
        default=0,
        metadata=_meta("Global steps of linear learning-rate warmup (see train.lr_schedule)."),
    )
    weight_decay: float = field(default=0.0, metadata=_meta("AdamW weight decay.", bounds=">= 0"))
    max_grad_norm: float = field(
        default=0.0,
        metadata=_meta(
            "Clip the LoRA gradients' global norm to this before a step; 0 = off.",
            bounds=">= 0 (0 = no clipping)",
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_meta(
            "Recompute each decoder layer's activations in the backward pass instead of "
            "keeping them: less memory, about a third more compute."
        ),
    )
    eval_batch_size: int = field(
        default=8, metadata=_meta("Examples per evaluation batch.", bounds="> 0")
    )
    max_new_tokens: int = field(
        default=24,
        metadata=_meta(
            "Generation tasks: greedy tokens generated per evaluation example.", bounds="> 0"
        ),
    )


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = field(
        default=3, metadata=_meta("Federated rounds.", bounds="> 0", role=RESUMABLE)
    )
    local_steps: int = field(
        default=5, metadata=_meta("Local optimizer steps per round.", bounds="> 0")
    )
    fraction: float = field(
        default=1.0,
        metadata=_meta("Fraction of clients sampled per round, in (0, 1].", bounds="(0, 1]"),
    )
    seed: int = field(
        default=0,
        metadata=_meta(
            "Seed of the shared LoRA initialisation, client sampling and data order.", bounds=">= 0"
        ),
    )
    workers: int = field(
        default=1,
        metadata=_meta(
            "Simulation Engine: client processes running at once (cores are shared).",
            bounds="> 0",
            role=OPERATIONAL,
        ),
    )
    gpus_per_client: float = field(
        default=0.0,
        metadata=_meta(
            "Simulation Engine: the share of a GPU each client process reserves (Ray's "
            "num_gpus): 0.25 lets four clients share one GPU; a whole number gives each "
            "several. 0 = none reserved (clients still use a visible GPU, as model.device says).",
            bounds=Bounds("a fraction in [0, 1] or a whole number of GPUs", _gpu_share),
        ),
    )
    timeout: float = field(
        default=3600.0,
        metadata=_meta(
            "Seconds the server waits for the SuperNodes of the config to connect and to "
            "answer first contact (which includes loading the base model).",
            bounds="> 0",
            role=OPERATIONAL,
        ),
    )
    round_timeout: float = field(
        default=3600.0,
        metadata=_meta(
            "Seconds each client has to answer an exchange, from when it can start on it (clients "
            "sharing a simulation worker start when the one before them answers); a client that "
            "has not answered by then is abandoned, recorded as timed out for that round, keeps "
            "its adapter and is asked again next round (its late reply is discarded).",
            bounds="> 0",
            role=OPERATIONAL,
        ),
    )
    min_replies: float = field(
        default=0.5,
        metadata=_meta(
            "Fraction of the clients contacted in an exchange that must answer with a usable "
            "reply for the round to complete; below it the run stops, its last checkpoint intact.",
            bounds="(0, 1]",
            role=OPERATIONAL,
        ),
    )
    max_norm_ratio: float = field(
        default=10.0,
        metadata=_meta(
            "A trained update (adapter minus the one sent) whose norm exceeds this many times "
            "the median update norm of the round (or of the last accepted updates) is rejected.",
            bounds="> 1",
        ),
    )
    metrics_every: int = field(
        default=1,
        metadata=_meta(
            "Task metrics (accuracy, ROUGE-L, exact match, F1) every N rounds and always after "
            "the last; the eval loss is measured every round.",
            bounds="> 0",
        ),
    )
    node_keys: str = field(
        default="",
        metadata=_meta(
            "Deployment Engine: a TOML file (a path on the server) binding each client to its "
            "SuperNode's key, partition-id = the public key file registered with `flwr "
            "supernode register` (or its text); a node claiming a partition-id its key is not "
            "bound to is refused before it is sent anything. '' = identities are not bound.",
            role=OPERATIONAL,
        ),
    )


@dataclass(frozen=True)
class FixedStep:
    """MIRA's pull with one step for every client: W_k <- W_k - step * sum_l a_kl (W_k - W_l)
    (``server.step`` a number)."""

    step: float


@dataclass(frozen=True)
class LearnedMix:
    """``server.step = 'auto'``: every round each client chooses its own mix weight alpha_k
    from its candidates by its validation loss, W_k <- (1 - alpha_k) W_k + alpha_k M_k
    (docs/design.md, "Personalisation strength"). The ``[server.auto]`` table."""

    grid: tuple[float, ...] = field(
        default=(0.0, 0.25, 0.5, 0.75, 1.0),
        metadata=_meta(
            "The mix weights alpha in [0, 1] every client may choose (0 = keep its own "
            "adapter, 1 = take its neighbours' mean).",
            bounds="[0, 1]",
        ),
    )
    equal_share: bool = field(
        default=True,
        metadata=_meta(
            "Also offer each client its equal-share point n / (n + 1) for its n neighbours "
            "(on a uniform cluster, exactly cluster-fedavg)."
        ),
    )
    smoothing: float = field(
        default=0.5,
        metadata=_meta(
            "Weight in [0, 1) of the previous rounds in the mix weight a client applies, "
            "alpha_t = s * alpha_(t-1) + (1 - s) * (this round's choice); 0 = apply each "
            "round's choice as it is.",
            bounds="[0, 1)",
        ),
    )
    tolerance: float = field(
        default=1.0,
        metadata=_meta(
            "How many standard errors of the validation loss a candidate may lie above the best "
            "one and still count as good as it; among those, the client chooses the one nearest "
            "its equal-share point n / (n + 1). 0 = the argmin (docs/results.md measures both).",
            bounds=Bounds("a finite number >= 0", _not_negative),
        ),
    )
    evaluations: int = field(
        default=4,
        metadata=_meta(
            "How many candidates a client evaluates on its validation split, one forward pass "
            "each: the smallest, the largest, the one nearest its equal-share point, then the "
            "ones farthest from those; the others' per-example losses are read off the curve "
            "through them in log space. 0 = every candidate.",
            bounds=Bounds("0 (every candidate) or at least 3", _no_or_three),
        ),
    )
    every: int = field(
        default=1,
        metadata=_meta(
            "How often a client chooses: every N-th time it trains; the times in between it "
            "applies the mix weight it applied last to its new neighbours' mean, without a "
            "validation pass (pooled by cluster: the cluster's last weight). 1 = every time.",
            bounds=">= 1",
        ),
    )
    pool: str = field(
        default="client",
        metadata=_meta(
            "Whose validation examples choose: 'client' = each client its own; 'cluster' = the "
            "server pools the validation losses of a cluster's clients and the cluster takes "
            "one mix weight, decided one round late (docs/design.md).",
            choices=POOLS,
        ),
    )

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The dotted keys of the table: ``server.auto.grid``, ..."""
        return tuple(f"server.auto.{f.name}" for f in dataclasses.fields(cls))


RENAMED_KEYS = {
    "server.auto_grid": "server.auto.grid",
    "server.auto_equal_share": "server.auto.equal_share",
    "server.auto_smoothing": "server.auto.smoothing",
    "server.auto_tolerance": "server.auto.tolerance",
}
"""Keys that moved, old name -> new: a config, an override or a run's config.toml that spells a
key the old way still loads, into the new key."""


@dataclass(frozen=True)
class ServerConfig:
    method: str = field(
        default="mira",
        metadata=_meta("Server rule.", choices=METHODS),
    )
    step: float | str = field(
        default=0.1,
        metadata=_meta(
            "MIRA server step gamma = eta * lambda (gamma * max degree must be < 1), or 'auto': "
            "every round each client chooses its own mix weight alpha_k by its loss on its "
            "validation split (data.val_size), W_k <- (1 - alpha_k) W_k + alpha_k M_k with M_k "
            "its neighbours' weighted mean; [server.auto] below says how.",
            words=(AUTO,),
            bounds=">= 0",
        ),
    )
    auto: LearnedMix = field(
        default_factory=LearnedMix,
        metadata=_meta("server.step = 'auto': how each client learns its mix weight."),
    )
    graph: str = field(
        default="clusters",
        metadata=_meta(
            "Task graph: 'clusters' (clustering of client fingerprints), 'tasks' (declared task "
            "labels, an oracle), 'random' (symmetric uniform weights above a threshold, the "
            "MIRA paper's setting), 'full', 'knn' (nearest fingerprints), or the path of a K x K "
            "matrix (.json, .csv or .npy) in client order. "
            "Every graph except a matrix file is scaled to max degree 1.",
            pattern=_GRAPH,
        ),
    )
    cluster_method: str = field(
        default="kmeans",
        metadata=_meta("Clustering of fingerprints.", choices=CLUSTER_METHODS),
    )
    num_clusters: int = field(
        default=0,
        metadata=_meta(
            "Clusters for server.graph = 'clusters'; 0 = chosen by silhouette.", bounds=">= 0"
        ),
    )
    edge_weights: str = field(
        default="uniform",
        metadata=_meta(
            "Edge weights inside a cluster: uniform, or an RBF kernel of fingerprint distance "
            "(median-heuristic bandwidth).",
            choices=EDGE_WEIGHTS,
        ),
    )
    knn: int = field(
        default=1,
        metadata=_meta(
            "'knn' graph: neighbours per client; 'clusters': a client left alone in its "
            "cluster gets edges to this many nearest clients (0 = leave it alone).",
            bounds=">= 0",
        ),
    )
    random_threshold: float = field(
        default=0.5,
        metadata=_meta(
            "'random' graph: weights below this are dropped (in [0, 1)).", bounds="[0, 1)"
        ),
    )
    graph_refresh: int = field(
        default=0,
        metadata=_meta(
            "Recompute fingerprints and the graph every N rounds; 0 = only once.", bounds=">= 0"
        ),
    )
    fingerprint: str = field(
        default="gradient",
        metadata=_meta(
            "Client fingerprint: the gradient of a fixed probe LoRA on a few local batches, "
            "or the probe's update after as many local steps.",
            choices=FINGERPRINTS,
        ),
    )
    fingerprint_dim: int = field(
        default=256, metadata=_meta("Size of the randomly projected fingerprint.", bounds="> 0")
    )
    fingerprint_batches: int = field(
        default=4,
        metadata=_meta("Local batches (or steps) a fingerprint is computed from.", bounds="> 0"),
    )
    fingerprint_rank: int = field(
        default=8,
        metadata=_meta(
            "Rank of the probe LoRA: the same for every client, whatever its rank.", bounds="> 0"
        ),
    )
    fingerprint_cache: bool = field(
        default=True,
        metadata=_meta(
            "Keep each client's first-contact fingerprint in its own cache folder "
            "(fingerprints/ under model.cache_dir, $MIRA_CACHE or ~/.cache/mira), keyed by "
            "everything it depends on, so a later run on the same data and settings skips "
            "computing it (the same numbers either way).",
            role=OPERATIONAL,
        ),
    )
    pull_space: str = field(
        default="auto",
        metadata=_meta(
            "Where the pull acts: 'factor' (A and B separately, equal ranks), "
            "'product' (B @ A, any ranks), 'auto' (factor when all ranks are equal).",
            choices=PULL_SPACES,
        ),
    )
    robust: float = field(
        default=2.0,
        metadata=_meta(
            "Robust pull: clip every neighbour's difference W_l - W_k to this many times the "
            "round's median difference over the graph's edges, so that one client's update "
            "moves its neighbours a bounded distance (mira, auto and cluster-fedavg; fedit "
            "and cluster-merge send one global model and ignore it). 0 = off; a run "
            "directory written before this key existed resumes with 0.",
            bounds=">= 0 (0 = off)",
        ),
    )

    @property
    def policy(self) -> FixedStep | LearnedMix:
        """How MIRA's pull is set, decided here once from ``step`` (docs/design.md,
        "Personalisation strength"): :class:`LearnedMix` (the ``[server.auto]`` table) when the
        method is mira and ``step = 'auto'``, else :class:`FixedStep`. Rules without a step
        (fedit, local, the cluster rules) get FixedStep(0.0) whatever ``step`` says, so one
        config with ``step = 'auto'`` serves every method of ``mira compare``."""
        if RULES[self.method].uses_step and self.step == AUTO:
            return self.auto
        return FixedStep(0.0 if isinstance(self.step, str) else float(self.step))

    @property
    def pull_bound(self) -> float:
        """The robust pull's multiple this rule applies: ``robust``, or 0 (off) for the rules
        that send every client one global model (fedit, cluster-merge: no pull toward
        neighbours to bound), so one config with ``robust`` set serves every method of
        ``mira compare``, as :attr:`policy` does for ``step``."""
        return 0.0 if RULES[self.method].global_model else float(self.robust)


@dataclass(frozen=True)
class DataConfig:
    train_size: int = field(
        default=64, metadata=_meta("Training examples per client.", bounds="> 0")
    )
    eval_size: int = field(
        default=16, metadata=_meta("Held-out evaluation examples per client.", bounds="> 0")
    )
    val_size: int = field(
        default=0,
        metadata=_meta(
            "Validation examples carved out of each client's training examples, for every "
            "method (so all train on the same examples); server.step = 'auto' chooses on them. "
            "Disjoint from the eval split, which never influences any choice."
        ),
    )
    dir: str = field(
        default="",
        metadata=_meta("Folder of prepared task data; '' = the cache (see model.cache_dir)."),
    )
    label_skew: float = field(
        default=0.0,
        metadata=_meta(
            "Dirichlet alpha of label skew among one classification task's clients; 0 = IID.",
            bounds=">= 0",
        ),
    )
    chat_template: str = field(
        default="auto",
        metadata=_meta(
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
        metadata=_meta(
            "Also write TensorBoard event files (DIR/tensorboard) with the metrics.jsonl "
            "scalars; needs the tensorboard package (pip install 'mira[tensorboard]')."
        ),
    )
    wandb: bool = field(
        default=False,
        metadata=_meta(
            "Also log the metrics.jsonl scalars (per round and per client) and the config to "
            "Weights & Biases, files under DIR/wandb; needs the wandb package "
            "(pip install 'mira[wandb]')."
        ),
    )
    wandb_project: str = field(
        default="mira",
        metadata=_meta(
            "output.wandb: the W&B project the run is logged to.",
            pattern=Pattern(
                r"[^/\\#?%:]{1,128}",
                "is not a W&B project name: 1 to 128 characters, none of / \\ # ? % :",
            ),
        ),
    )
    wandb_mode: str = field(
        default="offline",
        metadata=_meta(
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
        metadata=_meta(
            "Client-side differential privacy: each uploaded update (trained minus start "
            "adapter) is clipped to this L2 norm and gets Gaussian noise; 0 = off "
            "(docs/privacy.md).",
            bounds=">= 0",
        ),
    )
    noise_multiplier: float = field(
        default=1.0,
        metadata=_meta(
            "Noise standard deviation as a multiple of privacy.clip_norm.", bounds=">= 0"
        ),
    )
    delta: float = field(
        default=1e-5,
        metadata=_meta(
            "The delta of the (epsilon, delta) guarantee each run reports.", bounds="(0, 1)"
        ),
    )


@dataclass(frozen=True)
class TaskConfig:
    name: str = field(
        default="",
        metadata=_meta("Task name: a built-in task or your own.", if_empty="is required"),
    )
    clients: int = field(
        default=1, metadata=_meta("Number of clients holding this task.", bounds="> 0")
    )
    path: str = field(
        default="",
        metadata=_meta(
            "User task: a local .jsonl, .csv, .parquet or .arrow file, a folder written by "
            "datasets' save_to_disk, or a Hugging Face dataset 'hf:NAME' / 'hf:NAME:CONFIG' "
            "for users with a hub ('' for built-ins)."
        ),
    )
    split: str = field(
        default="train",
        metadata=_meta("User task from the hub or a save_to_disk folder of splits: the split."),
    )
    kind: str = field(
        default="",
        metadata=_meta("User task kind: 'classification' or 'generation'."),
    )
    input_column: str = field(default="input", metadata=_meta("User task: input column."))
    target_column: str = field(default="target", metadata=_meta("User task: target column."))
    verbalisers: tuple[str, ...] = field(
        default=(), metadata=_meta("User classification task: the label words.")
    )
    template: str = field(
        default="",
        metadata=_meta("User task prompt template with '{input}'; '' = a default template."),
    )
    rank: int = field(
        default=0,
        metadata=_meta(
            "LoRA rank of this task's clients; 0 = lora.rank.", bounds=">= 0 (0 = lora.rank)"
        ),
    )
    memory_mb: float = field(
        default=0.0,
        metadata=_meta(
            "Training-memory budget of this task's clients in MB; their rank is the largest "
            "of lora.rank_choices that fits (0 = no budget).",
            bounds=">= 0",
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


def leaves(prefix: str, values: Any) -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    """(dotted key, field, value) of every key of a section's ``values`` (a section
    dataclass), a nested table's keys in its place: ``server.auto.grid`` after ``server.step``."""
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(f"{prefix}.{f.name}", value)
        else:
            yield f"{prefix}.{f.name}", f, value


def describe() -> list[tuple[str, str, str]]:
    """(key, default, help) for every key of the schema, for the README and ``mira config``."""
    rows = []
    for section, cls in [*SECTIONS.items(), ("tasks[]", TaskConfig)]:
        for key, f, default in leaves(section, cls()):
            help_text = f.metadata.get("help", "")
            if "choices" in f.metadata:
                help_text += " One of: " + ", ".join(f.metadata["choices"]) + "."
            rows.append((key, json.dumps(_plain(default)), help_text))
    return rows


def keys_with_role(*roles: str) -> tuple[str, ...]:
    """The dotted keys whose metadata gives them one of ``roles``, in schema order."""
    return tuple(
        key
        for section, cls in SECTIONS.items()
        for key, f, _value in leaves(section, cls())
        if f.metadata.get("role") in roles
    )


OPERATIONAL_KEYS = keys_with_role(OPERATIONAL)
"""Keys that change how fast a run goes and how it waits, not what it computes: a finished run
stays reusable when only these differ (mira compare), and a resumed run may change them."""
RESUME_KEYS = keys_with_role(RESUMABLE, OPERATIONAL)
"""What a resumed run may change: how long it goes on, and the operational keys."""
