"""The run directory: everything a run writes, and the one reader of each of its files.

Layout of ``DIR``::

    run.lock            held (fcntl.flock) by the process writing the run, for its whole life
    config.toml         the resolved config (every default filled in)
    metrics.jsonl       one object per client per round (``"kind": "client"``) and one
                        aggregate per round (``"kind": "round"``)
    graph.json          client ids, tasks, clusters and the adjacency the server used
    graph.png           heatmap of the adjacency, clients ordered by cluster
    adapters/<client>/  that client's personalised PEFT adapter (rewritten every round), shareable
                        as it is: adapter_config.json names the base portably (its hub id),
                        the base's tokenizer files, and README.md, the model card of the round
    checkpoint/         state.json and adapters-r<round>-<sha>.safetensors, for --resume
    tensorboard/        with output.tensorboard: the metrics.jsonl scalars as TensorBoard events
    wandb/              with output.wandb: the same scalars and the config as a W&B run

The names of these files are :class:`mira.results.schema.RunLayout`'s, and the rows of
metrics.jsonl are :mod:`mira.results.schema`'s :class:`~mira.results.schema.ClientRow` and
:class:`~mira.results.schema.RoundRow`, encoded and decoded there.

Rules every writer and reader here keeps:

* Every file is written with :func:`mira.results.files.write_atomic` (temporary name, fsync,
  rename, fsync of the folder), so a reader sees a whole old file or a whole new one.
* metrics.jsonl is appended one round at a time (its client rows, then its round row) and
  fsynced. A crash mid-append can leave a torn last line: a last line without its newline or
  that is not valid JSON is ignored by :func:`read_metrics`, and a resumed run rewrites the
  file without it (:func:`truncate_metrics`). A bad line that is *not* the last is damage
  that mira does not guess around: it is an error naming the file and the line.
* ``checkpoint/state.json`` is the commit point of a checkpoint. It records the sha256 of its
  adapters file (whose name carries the round and the hash, so a new checkpoint never
  overwrites the file the current one names), the last round whose rows metrics.jsonl held
  when it was written, the config the run computed with, and a sha256 of its own content.
  :func:`read_checkpoint` checks all of them, and config.toml against the recorded config (a
  resumed run may change only :data:`mira.config.RESUME_KEYS`); a missing entry is an error
  like a mismatch, naming the file and what to do, and nothing is deleted. The hashes catch
  damage and edits, not a forger who rewrites the hashes too: nothing here is signed.
* Every JSON file and line is written with ``allow_nan=False``: a non-finite number becomes
  null (:func:`mira.results.files.plain`), never a bare NaN or Infinity that strict JSON
  readers refuse.
* The adapters in ``adapters/`` are not checked against the checkpoint: a crash between
  writing them and writing the next checkpoint legitimately leaves them one round ahead, and
  a resumed run rewrites every one of them when it closes its first round.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import hashlib
import json
import math
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, cast

import numpy as np

from mira.config import (
    RESUME_KEYS,
    TASK_METRICS,
    Config,
    ConfigError,
    describe_changes,
    load_run_config,
    resume_changes,
    run_config_from_dict,
    to_toml,
)
from mira.core.adapters import Adapter
from mira.results import stats
from mira.results.document import fmt
from mira.results.errors import ResultsError, RunDirError, RunExistsError, RunInUseError
from mira.results.files import (
    commit,
    fsync_dir,
    plain,
    sha256_file,
    strict_json,
    temporary_path,
    write_atomic,
    write_json,
)
from mira.results.plots import plot_adjacency
from mira.results.schema import (
    ClientRow,
    MetricSummary,
    RoundRow,
    RunLayout,
    RunRows,
    decode_line,
    encode_row,
)

try:
    import fcntl
except ImportError:  # Windows has no flock: runs are not guarded against a second writer there
    fcntl = None  # type: ignore[assignment]

ROUND_METADATA = "mira_round"  # safetensors metadata key of the checkpoint's round
# state.json's layout: 2 records the run's config; 1 (no "format" entry) did not.
CHECKPOINT_FORMAT = 2


# ------------------------------------------------------------------------------ the folder
def default_run_dir(root: Path = Path("runs")) -> Path:
    """A fresh folder name for ``mira run`` without ``--out``: runs/run-YYYYMMDD-HHMMSS."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = root / f"run-{stamp}", 2
    while candidate.exists():
        candidate, n = root / f"run-{stamp}-{n}", n + 1
    return candidate


def check_new_run_dir(out_dir: Path) -> None:
    """Refuse to start a fresh run in a folder that already holds one (or anything else)."""
    out_dir = Path(out_dir)
    layout = RunLayout(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise RunExistsError(f"--out {out_dir} is a file, not a folder; choose another --out")
    if layout.lock.is_file():
        check_not_in_use(out_dir)  # a run writing there now is not one that stopped
    if layout.metrics.exists() or layout.state.exists():
        raise RunExistsError(
            f"{out_dir} already holds a run; continue it with `mira run --resume {out_dir}` "
            "or choose another --out"
        )
    entries = sorted(p.name for p in out_dir.iterdir() if p != layout.lock)
    if layout.config.name in entries:
        raise RunExistsError(
            f"{out_dir} holds a run that stopped before completing its first round (nothing "
            "to resume); delete that folder or choose another --out"
        )
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise RunExistsError(
            f"{out_dir} is not empty ({shown}); mira run writes into a new or empty folder, "
            "choose another --out"
        )


class RunLock:
    """An exclusive ``flock`` on ``DIR/run.lock``, held while one process writes the run.

    The kernel drops the lock when the process ends, however it ends, so a killed run never
    leaves a stale lock behind and ``--resume`` can take it at once. The lock file itself stays.
    """

    def __init__(self, folder: Path):
        self.path = RunLayout(folder).lock
        self._handle: IO[str] | None = None
        if fcntl is None:
            return
        handle = open(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+")  # noqa: SIM115
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunInUseError(
                f"{folder} is in use by another mira run, in progress there now ({holder}; "
                f"lock {self.path}); wait for it to finish or choose another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()  # closing the last descriptor releases the flock
        self._handle = None


def check_not_in_use(folder: Path) -> None:
    """Raise :class:`RunInUseError` now if another process holds ``folder``'s lock."""
    if Path(folder).is_dir():
        RunLock(folder).release()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ writing
def round_aggregate(
    server_round: int, method: str, seconds: float, rows: Sequence[ClientRow]
) -> RoundRow:
    """The round row of ``rows``: mean, worst and std over clients of the personalised eval
    loss (and the mean train loss), the mean mix weight, bytes and memory, and the mean and
    worst client of each task metric."""
    eval_losses = [r.eval_loss for r in rows if r.eval_loss is not None]
    train_losses = [r.train_loss for r in rows if r.train_loss is not None]
    mix_weights = [r.mix_weight for r in rows if r.mix_weight is not None]
    per_metric: dict[str, list[float]] = {
        name: [math.nan if (v := r.metrics.get(name)) is None else v for r in rows]
        for name in TASK_METRICS
        if any(name in r.metrics for r in rows)
    }
    metrics = {
        name: MetricSummary(
            summary["mean"], summary["worst"], rows[int(summary["worst_index"])].client
        )
        for name, summary in stats.summarise(per_metric).items()
    }
    return RoundRow(
        round=server_round,
        method=method,
        seconds=round(seconds, 3),
        personalised_eval_loss_mean=float(np.mean(eval_losses)) if eval_losses else None,
        personalised_eval_loss_worst=float(np.max(eval_losses)) if eval_losses else None,
        personalised_eval_loss_std=float(np.std(eval_losses)) if eval_losses else None,
        train_loss_mean=float(np.mean(train_losses)) if train_losses else None,
        mix_weight_mean=float(np.mean(mix_weights)) if mix_weights else None,
        clients_trained=len(train_losses),
        bytes_up=int(sum(r.bytes_up for r in rows)),
        bytes_down=int(sum(r.bytes_down for r in rows)),
        peak_memory_mb=max((r.peak_memory_mb or 0.0) for r in rows),
        metrics=metrics,
    )


class AdapterWriter(Protocol):
    """What a shareable adapter folder holds besides its weights and its card: the part that
    needs peft and transformers, which this package never imports. The server hands one to
    its :class:`RunWriter` (:class:`mira.client.sharing.PeftAdapterWriter`)."""

    @property
    def note(self) -> str:
        """Where the base weights came from, for the model card ('' when simply its name's)."""
        ...

    def adapter_config(self, rank: int) -> str:
        """``adapter_config.json`` of a rank-``rank`` adapter, its base named portably."""
        ...

    def tokenizer_files(self) -> dict[str, bytes]:
        """The base's tokenizer files, by name."""
        ...


def round_scalars(rows: Sequence[ClientRow], aggregate: RoundRow) -> dict[str, float]:
    """The scalars of one round that TensorBoard and W&B get: ``round/<key>`` for every number
    of the round row, ``<client>/<key>`` for each client's finite losses, mix weight and task
    metrics, under the keys metrics.jsonl holds them by."""
    scalars = {f"round/{key}": value for key, value in aggregate.scalars().items()}
    for row in rows:
        scalars.update({f"{row.client}/{key}": value for key, value in row.scalars().items()})
    return scalars


def graph_description(out_dir: Path, cfg: Config) -> str:
    """The task graph of a run in a few words: graph.json's source (and k, silhouette for
    fingerprint clusters), else the configured ``server.graph``."""
    path = RunLayout(out_dir).graph
    if not path.is_file():
        return cfg.server.graph
    graph = json.loads(path.read_text())
    details = [f"k = {graph['k']}"] if graph.get("k") is not None else []
    if graph.get("silhouette") is not None:
        details.append(f"silhouette {fmt(graph['silhouette'])}")
    source = str(graph.get("source", cfg.server.graph))
    return f"{source} ({', '.join(details)})" if details else source


class RunWriter:
    """Owns the output directory of one run while it is written (holds its lock).

    The lock is released by :meth:`close`, when the writer is garbage-collected, or when the
    process ends. ``adapters`` makes the adapter folders shareable (:meth:`write_adapter`);
    without it the writer writes no adapters.
    """

    def __init__(self, out_dir: Path, cfg: Config, adapters: AdapterWriter | None = None):
        self.out = Path(out_dir)
        self.layout = RunLayout(self.out)
        self.cfg = cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(self.out)
        self.layout.adapters.mkdir(exist_ok=True)
        self.metrics_path = self.layout.metrics
        self._metrics_round: int | None = None  # last round appended (None: not known yet)
        self._tensorboard: Any = None
        if cfg.output.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                self._lock.release()
                raise ConfigError(
                    "output.tensorboard = true needs the tensorboard package: "
                    "pip install 'mira[tensorboard]'"
                ) from err
            self._tensorboard = SummaryWriter(str(self.layout.tensorboard))
        self._adapters = adapters
        self._adapters_written = False  # a card goes with every adapter folder once written
        self._wandb: Any = None
        if cfg.output.wandb:
            try:
                self._wandb = self._start_wandb()
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        self._finish_wandb(0)
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        self._lock.release()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._finish_wandb(0 if exc_type is None else 1)  # W&B marks a run that raised failed
        self.close()

    def write_config(self) -> None:
        write_atomic(self.layout.config, to_toml(self.cfg))

    def write_graph(self, clients: Sequence[Any], graph: Any, step: Any, built_after: int) -> None:
        """graph.json and graph.png: the task graph the rule uses from round ``built_after`` + 1.

        ``clients`` have ``client_id`` and ``task``; ``graph`` has ``adjacency``, ``clusters``,
        ``source`` and ``info`` (:class:`mira.graph.build.TaskGraph`).
        """
        ids = [c.client_id for c in clients]
        adjacency = np.asarray(graph.adjacency, dtype=np.float64)
        payload = {
            "source": graph.source,
            "clients": ids,
            "tasks": [c.task for c in clients],
            "clusters": [int(c) for c in graph.clusters],
            "adjacency": adjacency.tolist(),
            "degree": adjacency.sum(axis=1).tolist(),
            "step": step,
            **graph.info,
            "built_after_round": built_after,
        }
        write_json(self.layout.graph, plain(payload))
        plot_adjacency(adjacency, ids, list(graph.clusters), self.layout.graph_plot)

    def write_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write ``checkpoint``, recording this run's config with it."""
        if self._metrics_round is None:  # nothing appended by this process yet: ask the file
            self._metrics_round = _last_recorded_round(self.out)
        if checkpoint.config is None:
            checkpoint = dataclasses.replace(checkpoint, config=self.cfg.to_dict())
        write_checkpoint(self.out, checkpoint, self._metrics_round)

    def append_round(self, seconds: float, server_round: int, rows: list[ClientRow]) -> RoundRow:
        """Append the client rows and the round's row; return the round's row."""
        aggregate = round_aggregate(server_round, self.cfg.server.method, seconds, rows)
        lines = [*(encode_row(row) for row in rows), encode_row(aggregate)]
        # One write of whole lines, then fsync: a crash leaves at most a torn last line.
        created = not self.metrics_path.exists()
        with self.metrics_path.open("a") as handle:
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            fsync_dir(self.out)
        self._metrics_round = server_round
        if self._tensorboard is not None:
            self._write_tensorboard(server_round, rows, aggregate)
        if self._wandb is not None:
            self._wandb.log(round_scalars(rows, aggregate), step=server_round)
        if self._adapters_written:
            self._write_cards(rows)
        return aggregate

    def _write_tensorboard(
        self, server_round: int, rows: list[ClientRow], aggregate: RoundRow
    ) -> None:
        """The same scalars as metrics.jsonl: the round aggregate and every client's row."""
        for tag, value in round_scalars(rows, aggregate).items():
            self._tensorboard.add_scalar(tag, value, server_round)
        self._tensorboard.flush()

    # -------------------------------------------------------------------------- W&B
    def _start_wandb(self) -> Any:
        """A Weights & Biases run beside metrics.jsonl, its files under DIR/wandb.

        The run's id is kept in DIR/wandb/mira-run-id, so ``mira run --resume`` logs on
        under the same W&B run. ``output.wandb_mode = "offline"`` (the default) needs no
        network and no account; ``wandb sync`` uploads such a run later.
        """
        try:
            import wandb
        except ImportError as err:
            raise ConfigError(
                "output.wandb = true needs the wandb package: pip install 'mira[wandb]'"
            ) from err
        folder = self.layout.wandb
        folder.mkdir(exist_ok=True)
        id_path = self.layout.wandb_run_id
        run_id = id_path.read_text().strip() if id_path.is_file() else uuid.uuid4().hex[:12]
        write_atomic(id_path, run_id + "\n")
        try:
            return wandb.init(
                project=self.cfg.output.wandb_project,
                mode=cast(Any, self.cfg.output.wandb_mode),  # one of config.WANDB_MODES
                dir=str(self.out),
                id=run_id,
                resume="allow",
                # 'runs/run-<time>', or '<method>/seed-<s>' in a comparison
                name="/".join(self.out.resolve().parts[-2:]),
                config=self.cfg.to_dict(),
                tags=[self.cfg.server.method],
                # The terminal shows mira's own progress; W&B would capture it as console logs.
                settings=wandb.Settings(console="off"),
            )
        except Exception as err:  # wandb raises its own types (no login, no network, ...)
            raise ResultsError(
                f"output.wandb: W&B could not start a run in {folder} "
                f"(mode {self.cfg.output.wandb_mode!r}): {err}"
            ) from err

    def _finish_wandb(self, exit_code: int) -> None:
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            run.finish(exit_code=exit_code)

    # -------------------------------------------------------------------------- adapters
    def adapter_dir(self, client_id: str) -> Path:
        return self.layout.adapter(client_id).dir

    def write_adapter(self, client_id: str, adapter: Adapter, rank: int) -> Path:
        """That client's PEFT adapter folder, shareable as it is.

        ``adapter_model.safetensors``, and what the writer's :class:`AdapterWriter` gives:
        ``adapter_config.json`` naming the base portably (its hub id, never this machine's
        cache path) and the base's tokenizer files. ``PeftModel.from_pretrained(base, path)``
        loads it whatever ``base`` was loaded from; :meth:`append_round` adds the model card
        of the round (README.md).
        """
        from safetensors.numpy import save_file

        if self._adapters is None:
            raise ValueError("this run writer was given no adapter writer")
        files = self.layout.adapter(client_id)
        path = files.dir
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob(".*.partial"):  # left by a crash mid-write; the lock is ours
            stale.unlink()
        tmp = temporary_path(files.weights)
        save_file({k: np.ascontiguousarray(v) for k, v in adapter.items()}, str(tmp))
        commit(tmp, files.weights)
        write_atomic(files.config, self._adapters.adapter_config(rank))
        for file_name, data in self._adapters.tokenizer_files().items():  # the same each round
            if not (path / file_name).is_file():
                write_atomic(path / file_name, data)
        self._adapters_written = True
        return path

    def _write_cards(self, rows: list[ClientRow]) -> None:
        """README.md, the model card (:func:`mira.results.card.model_card`), of every client
        whose adapter folder this round's rows describe."""
        from mira.results.card import model_card

        assert self._adapters is not None
        graph = graph_description(self.out, self.cfg)
        for row in rows:
            files = self.layout.adapter(row.client)
            if not files.config.is_file():
                continue
            settings = json.loads(files.config.read_text())
            card = model_card(self.cfg, row, settings, graph, self._adapters.note)
            write_atomic(files.card, card)


# ------------------------------------------------------------------------------ metrics
def _parse_metrics(path: Path) -> tuple[list[tuple[bytes, ClientRow | RoundRow]], bool]:
    """([(line, row)], whether a torn last line was ignored). See the module docstring for the
    rule."""
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline; else a line cut short
    torn = bool(tail.strip())
    rows = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = decode_line(raw)
        except ValueError as err:  # also JSONDecodeError and UnicodeDecodeError
            if number == len(lines) and not torn:
                torn = True  # the last line, cut by a crash mid-append: ignored
                continue
            raise RunDirError(
                f"{path}, line {number}: {err}. Only a last line cut short by a crash is "
                "skipped; a bad line before the end means the file was damaged or edited. "
                "Restore it from a copy, or delete that line by hand if you know why it is there"
            ) from None
        rows.append((raw, row))
    return rows, torn


def _rows(parsed: Sequence[tuple[bytes, ClientRow | RoundRow]]) -> RunRows:
    rows = RunRows()
    for _, row in parsed:
        rows.add(row)
    return rows


def read_metrics(out_dir: Path) -> RunRows:
    """Every complete row of ``DIR/metrics.jsonl`` in file order (a torn last line ignored)."""
    path = RunLayout(out_dir).metrics
    if not path.is_file():
        raise RunDirError(
            f"{path} does not exist: {out_dir} is not a run directory, or its run has not "
            "completed a round yet"
        )
    return _rows(_parse_metrics(path)[0])


def truncate_metrics(out_dir: Path, last_round: int) -> None:
    """Keep the rows of rounds up to ``last_round`` (those the checkpoint covers) and drop a
    torn last line, so a resumed run appends each round exactly once.

    Rows of later rounds were written before a crash but after the checkpoint: the resumed
    run computes them again. metrics.jsonl missing a round the checkpoint covers is damage.
    """
    path = RunLayout(out_dir).metrics
    if not path.is_file():
        if last_round > 0:
            raise RunDirError(
                f"{path} is missing, but the checkpoint says rounds 1 to {last_round} were "
                f"recorded; restore it from a copy, or start again with another --out"
            )
        return
    parsed, torn = _parse_metrics(path)
    _check_covers(path, _rows(parsed), last_round)
    keep = [line for line, row in parsed if row.round <= last_round]
    if torn or len(keep) != len(parsed):
        write_atomic(path, b"".join(line + b"\n" for line in keep))


def _check_covers(path: Path, rows: RunRows, last_round: int) -> None:
    missing = sorted(set(range(1, last_round + 1)) - rows.recorded_rounds())
    if missing:
        raise RunDirError(
            f"{path} lacks the rows of round(s) {', '.join(map(str, missing[:10]))}, but the "
            f"checkpoint says rounds 1 to {last_round} were recorded: the file lost rows. "
            "Nothing was deleted; restore it from a copy, or start again with another --out"
        )


def _last_recorded_round(out_dir: Path) -> int:
    """The last round whose aggregate row metrics.jsonl holds (0: none, or no file yet)."""
    path = RunLayout(out_dir).metrics
    if not path.is_file():
        return 0
    return max(_rows(_parse_metrics(path)[0]).recorded_rounds(), default=0)


# ------------------------------------------------------------------------------ checkpoint
@dataclass
class Checkpoint:
    """Server state after a complete exchange: enough to continue as if never stopped.

    Sampling and local training draw their randomness from (federation.seed, round,
    client) alone, so the round number is the whole random state. ``adapters`` are named
    (every client's stored adapter under its id, plus what the server state keeps besides);
    ``server`` is the server state's own JSON (open rows, choices, evaluations); ``config``
    the config the run computed with (:meth:`Config.to_dict`; None from a checkpoint written
    before mira recorded it).
    """

    round: int
    client_ids: list[str]
    ranks: list[int]
    adapters: dict[str, Adapter]
    adjacency: np.ndarray
    clusters: list[int]
    graph_source: str
    graph_info: dict[str, Any]
    server: dict[str, Any]
    config: dict[str, Any] | None = None


def _state_digest(state: dict[str, Any]) -> str:
    return hashlib.sha256(strict_json(state, sort_keys=True).encode()).hexdigest()


def write_checkpoint(
    out_dir: Path, checkpoint: Checkpoint, metrics_round: int | None = None
) -> None:
    """Write the checkpoint of a complete exchange, crash-safely.

    The adapters go to ``checkpoint/adapters-r<round>-<sha256[:16]>.safetensors`` (temporary
    name, fsync, rename), then ``checkpoint/state.json`` naming that file and its hash is
    replaced the same way: the state file is the commit point, so a crash at any moment leaves
    the previous complete checkpoint readable. Older adapter files are removed afterwards.
    ``metrics_round`` is the last round metrics.jsonl holds (None: read from the file).
    ``checkpoint.config`` must be set (:meth:`RunWriter.write_checkpoint` sets the run's).
    """
    from safetensors.numpy import save_file

    if checkpoint.config is None:
        raise ValueError("a checkpoint records the config its run computes with")

    layout = RunLayout(out_dir)
    folder = layout.checkpoint
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{owner}/{key}": np.ascontiguousarray(value)
        for owner, adapter in checkpoint.adapters.items()
        for key, value in adapter.items()
    }
    tmp = temporary_path(layout.checkpoint_scratch)
    save_file(tensors, str(tmp), metadata={ROUND_METADATA: str(checkpoint.round)})
    digest = sha256_file(tmp)
    name = layout.checkpoint_adapters(checkpoint.round, digest).name
    commit(tmp, folder / name)
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "round": checkpoint.round,
        "clients": checkpoint.client_ids,
        "ranks": checkpoint.ranks,
        "adapters_file": name,
        "adapters_sha256": digest,
        "metrics_round": (
            _last_recorded_round(out_dir) if metrics_round is None else metrics_round
        ),
        "adjacency": np.asarray(checkpoint.adjacency).tolist(),
        "clusters": checkpoint.clusters,
        "graph_source": checkpoint.graph_source,
        "graph_info": checkpoint.graph_info,
        "server": checkpoint.server,
        "config": checkpoint.config,
        "random_state": "stateless: numpy default_rng([seed, round]) for sampling, "
        "SeedSequence([seed, client, round]) for local training",
    }
    state = plain(state)  # what is hashed is what a reader gets back
    state["state_sha256"] = _state_digest(state)
    write_atomic(layout.state, strict_json(state))
    for old in layout.checkpoint_adapter_files():
        if old.name != name:
            old.unlink()
    for stale in folder.glob(".*.partial"):  # left by a crash mid-write; the lock is ours
        stale.unlink()


def _damaged(layout: RunLayout, path: Path, what: str) -> RunDirError:
    return RunDirError(
        f"{path} {what}. The checkpoint cannot be trusted, so the run cannot resume from it; "
        f"nothing was deleted. The completed rounds in {layout.metrics} and "
        f"{layout.adapters} are kept; restore {layout.checkpoint} from a copy, or train again "
        "with another --out"
    )


def read_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The last complete exchange's checkpoint in ``out_dir``, checked; None if none was
    written yet. Raises :class:`RunDirError` naming the file when it is damaged, lacks an
    entry mira always writes, or when config.toml no longer says what the run computed with."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    out_dir = Path(out_dir)
    layout = RunLayout(out_dir)
    folder = layout.checkpoint
    state_path = layout.state
    if not state_path.is_file():
        # Round 1's rows are written after the first checkpoint: rows without one mean it
        # was removed, not that the run never got that far.
        if _last_recorded_round(out_dir) > 0:
            raise _damaged(
                layout,
                state_path,
                f"is missing although {layout.metrics.name} holds completed rounds",
            )
        return None
    try:
        state = json.loads(state_path.read_bytes())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise _damaged(layout, state_path, f"is not valid JSON ({err})") from None
    recorded = state.pop("state_sha256", None)
    if recorded is None:
        raise _damaged(layout, state_path, _lacks("state_sha256", "the sha256 of its own content"))
    if recorded != _state_digest(state):
        raise _damaged(
            layout, state_path, "was changed after mira wrote it (its sha256 does not match)"
        )
    try:
        checkpoint_round = int(state["round"])
        adapters_path = folder / str(state["adapters_file"])
        client_ids = [str(c) for c in state["clients"]]
        ranks = [int(r) for r in state["ranks"]]
        adjacency = np.array(state["adjacency"], dtype=np.float64)
        clusters = [int(c) for c in state["clusters"]]
        graph_source, graph_info = str(state["graph_source"]), dict(state["graph_info"])
        server = dict(state["server"])
    except (KeyError, TypeError, ValueError) as err:
        raise _damaged(layout, state_path, f"lacks or garbles the entry {err}") from None
    expected_sha = state.get("adapters_sha256")
    if not isinstance(expected_sha, str):
        raise _damaged(
            layout, state_path, _lacks("adapters_sha256", "the sha256 of its adapters file")
        )
    metrics_round = state.get("metrics_round")
    if not isinstance(metrics_round, int):
        held = f"the last round {layout.metrics.name} held"
        raise _damaged(layout, state_path, _lacks("metrics_round", held))
    config = _recorded_config(layout, state)
    if not adapters_path.is_file():
        raise _damaged(layout, adapters_path, f"is missing ({state_path} names it)")
    if sha256_file(adapters_path) != expected_sha:
        raise _damaged(
            layout,
            adapters_path,
            f"does not match the sha256 in {state_path.name} (cut or changed)",
        )
    try:
        with safe_open(str(adapters_path), framework="numpy") as handle:
            stored_round = (handle.metadata() or {}).get(ROUND_METADATA)
        tensors = load_file(str(adapters_path))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise _damaged(layout, adapters_path, f"cannot be read ({err})") from None
    if stored_round is None:
        raise _damaged(
            layout, adapters_path, f"has no {ROUND_METADATA!r} metadata (mira writes it)"
        )
    if stored_round != str(checkpoint_round):
        raise _damaged(
            layout,
            state_path,
            f"says round {checkpoint_round} but its adapters are of round {stored_round}",
        )
    if not checkpoint_round - 1 <= metrics_round <= checkpoint_round:
        raise _damaged(
            layout,
            state_path,
            f"says round {checkpoint_round} but rows up to round {metrics_round} recorded",
        )
    metrics_path = layout.metrics
    if metrics_round > 0:
        if not metrics_path.is_file():
            raise _damaged(layout, metrics_path, "is missing")
        _check_covers(metrics_path, _rows(_parse_metrics(metrics_path)[0]), metrics_round)
    adapters: dict[str, Adapter] = {}
    for name, value in tensors.items():
        owner, key = name.split("/", 1)
        adapters.setdefault(owner, {})[key] = value
    return Checkpoint(
        round=checkpoint_round,
        client_ids=client_ids,
        ranks=ranks,
        adapters=adapters,
        adjacency=adjacency,
        clusters=clusters,
        graph_source=graph_source,
        graph_info=graph_info,
        server=server,
        config=config,
    )


def _lacks(key: str, what: str) -> str:
    return (
        f"has no {key} entry ({what}, which mira always writes): it was edited, or written "
        "by another program"
    )


def _recorded_config(layout: RunLayout, state: dict[str, Any]) -> dict[str, Any] | None:
    """The config state.json records, after checking config.toml still says the same except
    in what a resumed run may change (:data:`mira.config.RESUME_KEYS`). None for a checkpoint
    written before mira recorded it (format 1)."""
    if "format" not in state and "config" not in state:
        return None
    recorded = state.get("config")
    if not isinstance(recorded, dict):
        raise _damaged(layout, layout.state, _lacks("config", "the config the run computed with"))
    try:
        stored = run_config_from_dict(recorded)
    except ConfigError as err:
        raise _damaged(
            layout, layout.state, f"records a config this mira cannot read ({err})"
        ) from None
    path = layout.config
    if not path.is_file():
        raise _damaged(layout, path, "is missing (the checkpoint records the config it held)")
    try:
        current = load_run_config(path)
    except ConfigError as err:
        raise _changed_config(layout, f"no longer reads as a config ({err})") from None
    changes = resume_changes(stored, current)
    if changes:
        raise _changed_config(
            layout,
            f"differs from the config its checkpoint was computed with in "
            f"{', '.join(c[0] for c in changes)} ({describe_changes(changes)}); a resumed run "
            f"may change only {', '.join(RESUME_KEYS)}",
        )
    return recorded


def _changed_config(layout: RunLayout, what: str) -> RunDirError:
    return RunDirError(
        f"{layout.config} {what}. Nothing was deleted; to continue the run, put back the "
        f'values it computed with ({layout.state} records them under "config"), '
        "or start a new run with another --out"
    )


# ------------------------------------------------------------------------------ a full disk
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(out_dir: Path, err: OSError) -> RunDirError | None:
    """The one line a run ends with when writing ``out_dir`` hit a full disk or quota
    (``err`` is ENOSPC or EDQUOT; None for any other error). It says whether the last
    checkpoint is intact (it is checked here) and how to continue."""
    if err.errno not in DISK_FULL:
        return None
    where = f" writing {err.filename}" if err.filename else ""
    head = f"{out_dir}: {err.strerror or 'no space left'}{where}; the run stopped."
    try:
        checkpoint = read_checkpoint(out_dir)
    except RunDirError as damage:
        return RunDirError(f"{head} Its checkpoint cannot be used: {damage}")
    if checkpoint is None:
        return RunDirError(
            f"{head} It had not checkpointed its first exchange, so there is nothing to "
            "resume: free some space and start it again with another --out"
        )
    return RunDirError(
        f"{head} Its last checkpoint (after round {checkpoint.round}) is intact: free some "
        f"space and continue with `mira run --resume {out_dir}`"
    )


def logger_lines(out_dir: Path, cfg: Config) -> list[str]:
    """What a run ends with for each logger it wrote to besides metrics.jsonl: where its files
    are and how to look at them or upload them (empty when none is enabled)."""
    layout = RunLayout(out_dir)
    lines = []
    if cfg.output.tensorboard:
        lines.append(
            f"TensorBoard: {layout.tensorboard} (view with: tensorboard --logdir "
            f"{layout.tensorboard})"
        )
    if cfg.output.wandb and cfg.output.wandb_mode == "offline":
        lines.append(
            f"W&B (offline): {layout.wandb} (upload with: wandb sync {layout.wandb}/offline-run-*)"
        )
    elif cfg.output.wandb:
        lines.append(
            f"W&B: project {cfg.output.wandb_project}, synced as the run went (files in "
            f"{layout.wandb})"
        )
    return lines
