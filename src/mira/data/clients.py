"""From a config to one client's examples: resolve its task, read the rows, split them.

``load_client_data(cfg, k)`` is all a client process needs: it finds the task of global client
``k`` (``cfg.client_ids`` order), makes sure the task's files are present (fetching a built-in
task's pinned package the first time), turns the rows into :class:`Example` s and returns the
client's own shard (see :mod:`mira.data.splits`). The parsed examples of a task are cached per
process, so the clients of one task that share a worker read the files once.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any

from mira.config import Config, TaskConfig
from mira.data.sources import HUB_PREFIX, DataError, Row, read_hub_dataset, read_table
from mira.data.splits import Split, client_splits
from mira.data.store import builtin, data_root, ensure_prepared
from mira.data.tasks import ClientData, Example, Task, TaskSpec, clip

DEFAULT_TEMPLATE = "{input}\nAnswer:"
USER_INPUT_CHARS = 230  # at model.max_length = 64, like the built-in classification tasks
GENERATION_METRICS = ("rouge_l", "exact_match", "token_f1")
_BASE_LENGTH = 64  # the max_length the built-in character budgets were chosen for


def _words(words: tuple[str, ...]) -> tuple[str, ...]:
    """Verbalisers in the house convention: stripped, with one leading space."""
    return tuple(" " + " ".join(w.split()) for w in words)


def _template(task_cfg: TaskConfig, default: str) -> str:
    template = task_cfg.template or default
    if "{input}" not in template:
        raise DataError(f"task {task_cfg.name!r}: template {template!r} has no '{{input}}'")
    return template.rstrip()


def _user_rows(task_cfg: TaskConfig) -> list[Row]:
    if task_cfg.path.startswith(HUB_PREFIX):
        return read_hub_dataset(
            task_cfg.path, task_cfg.split, task_cfg.input_column, task_cfg.target_column
        )
    path = Path(task_cfg.path).expanduser()
    return read_table(path, task_cfg.input_column, task_cfg.target_column, task_cfg.split)


def resolve_task(task_cfg: TaskConfig, cfg: Config) -> Task:
    """The :class:`Task` of a ``[[tasks]]`` entry: a built-in by name, or a user file.

    A user classification task without ``verbalisers`` takes the sorted distinct targets of
    its file as its labels. ``template`` overrides the prompt of a built-in task too.
    """
    del cfg  # a task depends on its own entry only today; the signature leaves room
    return _resolve(task_cfg)


def _resolve(task_cfg: TaskConfig) -> Task:
    if not task_cfg.path:
        spec = builtin(task_cfg.name)
        if not task_cfg.template:
            return spec.task
        return dataclasses.replace(spec.task, template=_template(task_cfg, ""))
    kind = task_cfg.kind
    if kind not in ("classification", "generation"):
        raise DataError(
            f"task {task_cfg.name!r}: kind {kind!r} must be 'classification' or 'generation'"
        )
    verbalisers: tuple[str, ...] = ()
    if kind == "classification":
        if task_cfg.verbalisers:
            verbalisers = _words(task_cfg.verbalisers)
        else:
            rows = _user_rows(task_cfg)
            verbalisers = _words(tuple(sorted({" ".join(r.target.split()) for r in rows})))
        if len(set(verbalisers)) != len(verbalisers) or "" in (v.strip() for v in verbalisers):
            raise DataError(f"task {task_cfg.name!r}: verbalisers must be distinct and non-empty")
    return Task(
        name=task_cfg.name,
        kind=kind,
        verbalisers=verbalisers,
        metrics=("accuracy",) if kind == "classification" else GENERATION_METRICS,
        source=(
            task_cfg.path
            if task_cfg.path.startswith(HUB_PREFIX)
            else str(Path(task_cfg.path).expanduser())
        ),
        licence="user data",
        template=_template(task_cfg, DEFAULT_TEMPLATE),
    )


def _example(task: Task, text: str, answer: str, label: int | None) -> Example:
    prompt = task.template.replace("{input}", text).rstrip()
    if label is not None:
        return Example(prompt=prompt, target=task.verbalisers[label], label=label)
    return Example(prompt=prompt, target=" " + " ".join(answer.split()))


def _to_examples(
    task: Task, rows: list[Row], labels: dict[str, int] | None, limit: int, spec: TaskSpec | None
) -> tuple[Example, ...]:
    """Shape and label rows.

    A built-in generation task drops examples whose target is longer than its
    ``target_chars`` budget (scaled like the input's). Built-in sources are de-duplicated by
    prompt: IMDB repeats reviews, and a repeat would
    leak between train and eval. A prompt seen with different targets is dropped altogether:
    two inputs that differ only past the cut (a long passage) could not be told apart, so
    such an example could not be answered. A user file is taken as it is, since its author
    may repeat rows on purpose.
    """
    target_limit = int(spec.target_chars * limit / spec.input_chars) if spec else 0
    examples = []
    for row in rows:
        if target_limit and len(" ".join(row.target.split())) > target_limit:
            continue
        shaped = (
            spec.shape(row, limit)
            if spec is not None
            else Row(clip(row.input, limit), row.target, row.where)
        )
        if not shaped.input.strip():
            if spec is None:
                raise DataError(f"{row.where}: the input is empty")
            continue
        label = None
        if task.kind == "classification":
            key = shaped.target if spec is not None else " ".join(shaped.target.split())
            assert labels is not None
            if key not in labels:
                allowed = ", ".join(labels)
                raise DataError(f"{row.where}: label {shaped.target!r} is not one of: {allowed}")
            label = labels[key]
        elif not shaped.target.strip():
            raise DataError(f"{row.where}: the target is empty")
        examples.append(_example(task, shaped.input, shaped.target, label))
    if spec is None:
        return tuple(examples)
    targets: dict[str, set[str]] = {}
    for example in examples:
        targets.setdefault(example.prompt, set()).add(example.target)
    unique = []
    for example in examples:
        if len(targets.get(example.prompt, ())) == 1:
            unique.append(example)
            del targets[example.prompt]  # later copies are skipped
    return tuple(unique)


def _stamp(task_cfg: TaskConfig) -> tuple[int, int]:
    """(mtime, size) of a user file or folder, so an edited one is read again by a
    long-lived process (save_to_disk rewrites a folder's files, which touches the folder)."""
    path = Path(task_cfg.path).expanduser()
    if not task_cfg.path or not path.exists():
        return (0, 0)
    stat = path.stat()
    return (stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _cached_examples(
    task_cfg: TaskConfig, root: str, cache_dir: str, max_length: int, stamp: tuple[int, int]
) -> tuple[Task, tuple[Example, ...]]:
    del stamp  # part of the cache key only
    task = _resolve(task_cfg)
    scale = max_length / _BASE_LENGTH
    if task_cfg.path:
        rows = _user_rows(task_cfg)
        labels = {v.strip(): i for i, v in enumerate(task.verbalisers)}
        limit = int(USER_INPUT_CHARS * scale)
        return task, _to_examples(task, rows, labels, limit, None)
    spec = builtin(task_cfg.name)
    folder, source = ensure_prepared(spec, Path(root), cache_dir)
    rows = source.read(folder)
    return task, _to_examples(task, rows, dict(spec.labels), int(spec.input_chars * scale), spec)


def task_examples(task_cfg: TaskConfig, cfg: Config) -> tuple[Task, tuple[Example, ...]]:
    """A task and all of its examples (shaped and labelled), in source order.

    Built-in files are fetched first if the data folder lacks them (see :mod:`mira.data.store`).
    """
    root = data_root(cfg.data.dir, cfg.model.cache_dir)
    return _cached_examples(
        task_cfg, str(root), cfg.model.cache_dir, cfg.model.max_length, _stamp(task_cfg)
    )


@lru_cache(maxsize=16)
def _cached_splits(
    task: Task, labels: tuple[int, ...] | None, num_rows: int, clients: int, key: tuple[Any, ...]
) -> list[Split]:
    train_size, eval_size, seed, label_skew, val_size = key
    return client_splits(
        task=task.name,
        num_rows=num_rows,
        num_clients=clients,
        train_size=train_size,
        eval_size=eval_size,
        seed=seed,
        labels=labels,
        label_skew=label_skew,
        val_size=val_size,
    )


def load_client_data(cfg: Config, client_index: int) -> ClientData:
    """The task and own train / eval examples of client ``client_index`` (``cfg.client_ids``).

    Clients of one task get disjoint shards of it, deterministic in ``federation.seed`` and
    the task name; ``data.label_skew`` > 0 skews their label mixes with Dir(alpha).
    """
    ids = cfg.client_ids
    if not 0 <= client_index < len(ids):
        raise IndexError(f"client index {client_index} is outside 0..{len(ids) - 1}")
    offset = client_index
    for task_cfg in cfg.tasks:
        if offset < task_cfg.clients:
            break
        offset -= task_cfg.clients
    task, examples = task_examples(task_cfg, cfg)
    labels = None
    if task.kind == "classification":
        labels = tuple(e.label for e in examples if e.label is not None)
    key = (
        cfg.data.train_size,
        cfg.data.eval_size,
        cfg.federation.seed,
        float(cfg.data.label_skew),
        cfg.data.val_size,
    )
    split = _cached_splits(task, labels, len(examples), task_cfg.clients, key)[offset]
    return ClientData(
        client_id=ids[client_index],
        task=task,
        train=[examples[i] for i in split.train],
        eval=[examples[i] for i in split.eval],
        val=[examples[i] for i in split.val],
    )


def split_summary(cfg: Config) -> list[dict[str, Any]]:
    """Per client (``cfg.client_ids`` order): task, split sizes and label counts.

    What ``mira data splits`` prints, so that a user can see the clients a config makes before
    training, the label skew of ``data.label_skew`` in particular. Label counts are keyed by
    verbaliser (stripped) for classification tasks and empty for generation tasks.
    """
    rows = []
    for index, client_id in enumerate(cfg.client_ids):
        data = load_client_data(cfg, index)
        words = [w.strip() for w in data.task.verbalisers]

        def counts(examples: list[Example], words: list[str] = words) -> dict[str, int]:
            tally = dict.fromkeys(words, 0)
            for example in examples:
                if example.label is not None:
                    tally[words[example.label]] += 1
            return tally

        rows.append(
            {
                "client": client_id,
                "task": data.task.name,
                "train": len(data.train),
                "val": len(data.val),
                "eval": len(data.eval),
                "train_labels": counts(data.train) if words else {},
                "eval_labels": counts(data.eval) if words else {},
            }
        )
    return rows


def format_split_table(rows: list[dict[str, Any]]) -> str:
    """:func:`split_summary` as a markdown table; label counts as ``label count`` pairs.

    The val column appears when some client holds validation examples (``data.val_size``).
    """

    def labels(tally: dict[str, int]) -> str:
        return ", ".join(f"{word} {count}" for word, count in tally.items()) or "-"

    with_val = any(row.get("val") for row in rows)
    sizes = ["train", "val", "eval"] if with_val else ["train", "eval"]
    lines = [
        "| client | task | " + " | ".join(sizes) + " | train labels | eval labels |",
        "| --- | --- | " + " | ".join("---:" for _ in sizes) + " | --- | --- |",
    ]
    for row in rows:
        counts = " | ".join(str(row[size]) for size in sizes)
        lines.append(
            f"| {row['client']} | {row['task']} | {counts} | "
            f"{labels(row['train_labels'])} | {labels(row['eval_labels'])} |"
        )
    return "\n".join(lines)
