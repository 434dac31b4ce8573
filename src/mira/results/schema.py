"""The rows of metrics.jsonl and the names of a run's files: the one place either is spelled.

metrics.jsonl holds one JSON object per line: a :class:`ClientRow` per client per round
(``"kind": "client"``), then that round's :class:`RoundRow` (``"kind": "round"``).
:func:`encode_row` writes a row as its line and :func:`decode_row` reads one back; no other
module spells a key of either. The keys on disk are the field names, in field order:

* the fields without a default are always written (``None`` as null);
* a field whose default is ``None`` is written only when set (a client's ``reason`` when its
  round went wrong, ``epsilon`` under differential privacy, the auto choice's fields under
  ``server.step = "auto"``, ``peak_memory_mb`` once measured);
* ``metrics`` (the task metrics measured, by name) are flat keys, in the order recorded (a
  round row's as ``<name>_mean``, ``<name>_worst``, ``<name>_worst_client``);
* ``extra`` keeps keys this mira does not know, so a row read back writes them again.

Every number that is not finite is written as null (strict JSON). An optional number that is
present as null reads back as NaN, so that a row read back (the open rows of a checkpoint)
writes the very line it was read from. A key missing from a row of an older mira reads as its
field's empty value (``mix_weight`` None, ``status`` ok).

:class:`RunLayout` and :class:`ComparisonLayout` name every file of a run directory and of a
comparison directory (what each holds: :mod:`mira.results.rundir`, :mod:`mira.results.runs`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mira.config import TASK_METRICS
from mira.results.files import strict_json

KIND = "kind"
CLIENT_KIND, ROUND_KIND = "client", "round"

OK, FAILED, TIMEOUT, REJECTED = "ok", "failed", "timeout", "rejected"
"""What became of a client in an exchange (the ``status`` of its row)."""

MIX_WEIGHT = "mix_weight"
"""The name under which summaries, tables and plots show the client rows' mix weight."""

# A round row's summary of one task metric over its clients: <name><suffix>.
MEAN_SUFFIX, WORST_SUFFIX, WORST_CLIENT_SUFFIX = "_mean", "_worst", "_worst_client"


# ------------------------------------------------------------------------------ rows
@dataclass
class ClientRow:
    """One client's row of one round: what it trained, its personalised evaluation after the
    round's rule, what it exchanged (README, "Outputs")."""

    round: int
    client: str
    task: str
    method: str
    rank: int
    sampled: bool  # asked to train this round
    train_loss: float | None  # None: it did not train, or its update was refused
    eval_loss: float | None  # personalised: its adapter after the rule, on its eval split
    bytes_up: int
    bytes_down: int
    mix_weight: float | None  # the share of its neighbours' adapters it took
    status: str = OK
    reason: str | None = None  # why, when status is not ok
    epsilon: float | None = None  # differential privacy spent so far (privacy.delta)
    alpha_choice: float | None = None  # auto: this round's choice, before smoothing
    val_loss: float | None = None  # auto: the validation loss of that choice
    val_losses: list[float | None] | None = None  # auto: of every candidate
    candidates: list[float] | None = None  # auto: the mix weights tried
    val_standard_errors: list[float | None] | None = None  # auto with a tolerance
    anchor: float | None = None  # auto with a tolerance: the equal-share point
    peak_memory_mb: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)  # task metrics, by name
    extra: dict[str, Any] = field(default_factory=dict)  # keys this mira does not know

    def scalars(self) -> dict[str, float]:
        """Its finite losses, mix weight and task metrics by key, as TensorBoard and W&B log
        them (``<client>/<key>``)."""
        named = {
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            MIX_WEIGHT: self.mix_weight,
            **self.metrics,
        }
        return {
            key: value
            for key, value in named.items()
            if isinstance(value, float) and math.isfinite(value)
        }

    def to_dict(self) -> dict[str, Any]:
        """The row's keys and values as on disk, without ``kind`` (a checkpoint's open rows)."""
        return _entries(self)


@dataclass
class MetricSummary:
    """A task metric over one round's clients: their mean, and the worst client's value."""

    mean: float | None
    worst: float | None
    worst_client: str | None


@dataclass
class RoundRow:
    """One round over all clients: the personalised eval loss (mean, worst, std), the mean
    train loss and mix weight, bytes, memory, and each task metric's mean and worst client."""

    round: int
    method: str
    seconds: float
    personalised_eval_loss_mean: float | None
    personalised_eval_loss_worst: float | None
    personalised_eval_loss_std: float | None
    train_loss_mean: float | None
    mix_weight_mean: float | None
    clients_trained: int
    bytes_up: int
    bytes_down: int
    peak_memory_mb: float | None
    metrics: dict[str, MetricSummary] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """Every number of the row by key, ``round`` aside (``round/<key>`` in TensorBoard)."""
        return {
            key: value
            for key, value in _entries(self).items()
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "round"
        }


Row = ClientRow | RoundRow


@dataclass
class RunRows:
    """The rows of one metrics.jsonl, each kind in file order."""

    clients: list[ClientRow] = field(default_factory=list)
    rounds: list[RoundRow] = field(default_factory=list)

    def add(self, row: Row) -> None:
        if isinstance(row, ClientRow):
            self.clients.append(row)
        else:
            self.rounds.append(row)

    def all(self) -> list[Row]:
        """Every row, client rows first."""
        return [*self.clients, *self.rounds]

    def recorded_rounds(self) -> set[int]:
        """Rounds whose round row is present (a round's rows end with it)."""
        return {row.round for row in self.rounds}

    def last_round(self) -> int | None:
        """The last round with a client row (None: none yet)."""
        return max((row.round for row in self.clients), default=None)

    def clients_of(self, server_round: int) -> list[ClientRow]:
        return [row for row in self.clients if row.round == server_round]

    def final_clients(self) -> list[ClientRow]:
        """The client rows of the last recorded round."""
        last = self.last_round()
        return [] if last is None else self.clients_of(last)

    def round_row(self, server_round: int) -> RoundRow | None:
        return next((row for row in self.rounds if row.round == server_round), None)


@dataclass(frozen=True)
class RunRecord:
    """One finished run as read back from disk (:func:`mira.results.runs.load_run`): its
    method label, seed, folder, rows and run.json."""

    method: str
    seed: int | None
    folder: Path
    rows: RunRows
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ the codec
def _entries(row: Row) -> dict[str, Any]:
    """A row's keys and values in their order on disk, ``kind`` aside."""
    out: dict[str, Any] = {}
    for spec in fields(row):
        value = getattr(row, spec.name)
        if spec.name in ("metrics", "extra"):
            continue
        if value is None and spec.default is None:
            continue  # an optional field that is not set
        out[spec.name] = value
    if isinstance(row, RoundRow):
        for name, summary in row.metrics.items():
            out[name + MEAN_SUFFIX] = summary.mean
            out[name + WORST_SUFFIX] = summary.worst
            out[name + WORST_CLIENT_SUFFIX] = summary.worst_client
    else:
        out.update(row.metrics)
    out.update(row.extra)
    return out


def encode_row(row: Row) -> str:
    """The line of metrics.jsonl that holds ``row`` (strict JSON, no newline)."""
    kind = CLIENT_KIND if isinstance(row, ClientRow) else ROUND_KIND
    return strict_json({KIND: kind, **_entries(row)})


def decode_row(entry: Any) -> Row:
    """The row a parsed line of metrics.jsonl holds; ValueError when it holds none."""
    if not isinstance(entry, dict) or entry.get(KIND) not in (CLIENT_KIND, ROUND_KIND):
        raise ValueError("not a client or round row")
    if not isinstance(entry.get("round"), int):
        raise ValueError("no integer round")
    if entry[KIND] == CLIENT_KIND:
        return client_row(entry)
    return _round_row(entry)


def client_row(entry: dict[str, Any]) -> ClientRow:
    """A client row from its keys and values (a line of metrics.jsonl, or a checkpoint's open
    row, which has no ``kind``)."""
    known = {spec.name for spec in fields(ClientRow)} - {"metrics", "extra"}
    values: dict[str, Any] = {}
    for spec in fields(ClientRow):
        if spec.name in ("metrics", "extra"):
            continue
        if spec.default is None:
            values[spec.name] = _optional(entry, spec.name)
        else:
            values[spec.name] = entry.get(spec.name, _EMPTY.get(spec.name))
    metrics = {name: value for name, value in entry.items() if name in TASK_METRICS}
    extra = {
        name: value
        for name, value in entry.items()
        if name not in known and name not in metrics and name != KIND
    }
    return ClientRow(**values, metrics=metrics, extra=extra)


def _round_row(entry: dict[str, Any]) -> RoundRow:
    known = {spec.name for spec in fields(RoundRow)} - {"metrics", "extra"}
    values: dict[str, Any] = {
        spec.name: entry.get(spec.name, _EMPTY.get(spec.name))
        for spec in fields(RoundRow)
        if spec.name not in ("metrics", "extra")
    }
    metrics: dict[str, MetricSummary] = {}
    taken = known | {KIND}
    for name in (key[: -len(MEAN_SUFFIX)] for key in entry if key.endswith(MEAN_SUFFIX)):
        if name not in TASK_METRICS:
            continue
        keys = [name + MEAN_SUFFIX, name + WORST_SUFFIX, name + WORST_CLIENT_SUFFIX]
        metrics[name] = MetricSummary(*(entry.get(key) for key in keys))
        taken.update(keys)
    extra = {name: value for name, value in entry.items() if name not in taken}
    return RoundRow(**values, metrics=metrics, extra=extra)


_EMPTY: dict[str, Any] = {
    "method": "",
    "rank": 0,
    "sampled": False,
    "bytes_up": 0,
    "bytes_down": 0,
    "seconds": 0.0,
    "clients_trained": 0,
    "status": OK,
}
"""What a key missing from an older mira's row reads as (every other one: None)."""


def _optional(entry: dict[str, Any], key: str) -> Any:
    """An optional entry: None when absent; NaN when present as null (a number that was not
    finite), so that it is written again."""
    if key not in entry:
        return None
    value = entry[key]
    return math.nan if value is None else value


def decode_line(line: bytes) -> Row:
    """The row of one line of metrics.jsonl; ValueError (also JSON's and UTF-8's) if none."""
    return decode_row(json.loads(line))


# ------------------------------------------------------------------------------ file names
class ReportFiles:
    """What ``mira report`` writes into a run or a comparison directory."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)

    @property
    def report_md(self) -> Path:
        return self.dir / "report.md"

    @property
    def report_html(self) -> Path:
        return self.dir / "report.html"

    @property
    def plots(self) -> Path:
        return self.dir / "plots"

    @property
    def client_loss_plot(self) -> Path:
        return self.plots / "client_loss.png"

    @property
    def mean_loss_plot(self) -> Path:
        return self.plots / "mean_loss.png"

    @property
    def mix_weight_plot(self) -> Path:
        return self.plots / f"{MIX_WEIGHT}.png"

    @property
    def task_graph_plot(self) -> Path:
        return self.plots / "task_graph.png"

    @property
    def per_task_plot(self) -> Path:
        return self.plots / "per_task.png"

    def link(self, path: Path) -> str:
        """``path`` relative to the directory, as a report links it."""
        return path.relative_to(self.dir).as_posix()


class AdapterFiles:
    """The files of one shareable PEFT adapter folder (``adapters/<client>/``, or what
    ``mira export`` writes)."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)

    @property
    def weights(self) -> Path:
        return self.dir / "adapter_model.safetensors"

    @property
    def config(self) -> Path:
        return self.dir / "adapter_config.json"

    @property
    def card(self) -> Path:
        return self.dir / "README.md"

    @property
    def tokenizer_config(self) -> Path:
        """Written last of the tokenizer's files: its presence marks a complete set."""
        return self.dir / "tokenizer_config.json"

    def own_files(self) -> tuple[Path, ...]:
        """The adapter's own files; everything else in the folder is the tokenizer's."""
        return (self.weights, self.config, self.card)


class RunLayout(ReportFiles):
    """The files of one run directory (what each holds: :mod:`mira.results.rundir`)."""

    @property
    def lock(self) -> Path:
        return self.dir / "run.lock"

    @property
    def config(self) -> Path:
        return self.dir / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def graph(self) -> Path:
        return self.dir / "graph.json"

    @property
    def graph_plot(self) -> Path:
        return self.dir / "graph.png"

    @property
    def adapters(self) -> Path:
        return self.dir / "adapters"

    def adapter(self, client: str) -> AdapterFiles:
        return AdapterFiles(self.adapters / client)

    def saved_adapters(self) -> list[str]:
        """The clients whose adapter weights are saved, sorted."""
        weights = AdapterFiles(Path()).weights.name
        return sorted(path.parent.name for path in self.adapters.glob(f"*/{weights}"))

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoint"

    @property
    def state(self) -> Path:
        """``checkpoint/state.json``, the commit point of a checkpoint."""
        return self.checkpoint / "state.json"

    @property
    def checkpoint_scratch(self) -> Path:
        """What the checkpoint's adapters file is named after while it is written."""
        return self.checkpoint / "adapters.safetensors"

    def checkpoint_adapters(self, server_round: int, sha256: str) -> Path:
        """The checkpoint's adapters file: a new checkpoint never overwrites the current."""
        return self.checkpoint / f"adapters-r{server_round}-{sha256[:16]}.safetensors"

    def checkpoint_adapter_files(self) -> list[Path]:
        return sorted(self.checkpoint.glob("adapters-r*.safetensors"))

    @property
    def run_info(self) -> Path:
        """run.json: where the clients trained, privacy spent; a comparison's timings."""
        return self.dir / "run.json"

    @property
    def library_log(self) -> Path:
        """What the ServerApp kept off the console: the libraries' warnings and logs."""
        return self.dir / "library.log"

    @property
    def done(self) -> Path:
        """In a comparison: written only after the run returned with its last round."""
        return self.dir / "DONE"

    @property
    def tensorboard(self) -> Path:
        return self.dir / "tensorboard"

    @property
    def wandb(self) -> Path:
        return self.dir / "wandb"

    @property
    def wandb_run_id(self) -> Path:
        """A resumed run logs on under the same W&B run."""
        return self.wandb / "mira-run-id"


class ComparisonLayout(ReportFiles):
    """The files of a comparison directory (what each holds: :mod:`mira.results.runs`)."""

    SEED_PREFIX = "seed-"

    @property
    def manifest(self) -> Path:
        return self.dir / "comparison.json"

    @property
    def runs(self) -> Path:
        return self.dir / "runs"

    def run(self, method: str, seed: int) -> RunLayout:
        return RunLayout(self.runs / method / f"{self.SEED_PREFIX}{seed}")

    @property
    def run_pattern(self) -> str:
        """Where the runs are, in words: ``runs/<method>/seed-<s>``."""
        return f"{self.runs.name}/<method>/{self.SEED_PREFIX}<s>"

    def run_folders(self) -> Iterator[tuple[str, int, RunLayout]]:
        """(method, seed, layout) of every run folder present, in no particular order."""
        if not self.runs.is_dir():
            return
        for method_dir in self.runs.iterdir():
            if not method_dir.is_dir():
                continue
            for seed_dir in method_dir.iterdir():
                name = seed_dir.name
                seed = name[len(self.SEED_PREFIX) :]
                if seed_dir.is_dir() and name.startswith(self.SEED_PREFIX) and seed.isdigit():
                    yield method_dir.name, int(seed), RunLayout(seed_dir)

    @property
    def summary_csv(self) -> Path:
        return self.dir / "comparison.csv"

    @property
    def clients_csv(self) -> Path:
        return self.dir / "comparison_clients.csv"

    @property
    def summary_md(self) -> Path:
        return self.dir / "comparison.md"
