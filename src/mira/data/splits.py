"""Deterministic, disjoint client splits of one task's rows.

The rows of a task are shuffled with a generator seeded by ``(seed, crc32(task name))`` and cut
into one shard per client of that task; each shard gives the client its held-out evaluation
rows first and its training rows next. Shards never overlap, so no row is in two clients, and
within a client no row is both trained on and evaluated. Changing ``train_size`` leaves every
client's evaluation rows unchanged, which keeps runs with different budgets comparable.

Label skew (``alpha > 0``) uses Flower Datasets' :class:`DirichletPartitioner` (Yurochkin et
al., 2019): each label's rows are divided among the clients with proportions drawn from
Dir(alpha), so a small alpha gives each client a few dominant labels and alpha -> infinity
recovers IID. The client's evaluation rows come from its own shard, i.e. they follow the
client's own label mix, as in personalised federated learning.

IID shards are contiguous slices of the shuffled rows, which is exactly what Flower Datasets'
``IidPartitioner`` does (``Dataset.shard(contiguous=True)``); it is computed with numpy here to
avoid building an Arrow table for every client (a test checks the two agree).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mira.data.sources import DataError


@dataclass(frozen=True)
class Split:
    """Row indices of one client: training rows, validation rows carved out of its training
    rows (``data.val_size``), and held-out evaluation rows; the three are disjoint."""

    train: list[int]
    eval: list[int]
    val: list[int] = field(default_factory=list)


def task_rng(seed: int, task: str) -> np.random.Generator:
    """The generator of one task's shuffle; crc32 keeps it stable across processes."""
    return np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))])


def iid_shards(num_rows: int, num_clients: int, seed: int, task: str) -> list[np.ndarray]:
    """Shuffle ``range(num_rows)`` and cut it into ``num_clients`` contiguous shards.

    Shard sizes differ by at most one; the first ``num_rows % num_clients`` shards are the
    larger ones, as in ``datasets.Dataset.shard(contiguous=True)``.
    """
    order = task_rng(seed, task).permutation(num_rows)
    return list(np.array_split(order, num_clients))


def dirichlet_shards(
    labels: Sequence[int],
    num_clients: int,
    alpha: float,
    min_size: int,
    seed: int,
    task: str,
) -> list[np.ndarray]:
    """Label-skewed shards with Flower Datasets' DirichletPartitioner (one Dir(alpha) per label).

    The rows are shuffled first, because the partitioner hands out each label's rows in table
    order; its partitions are mapped back to the original row indices.
    """
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    rng = task_rng(seed, task)
    order = rng.permutation(len(labels))
    table = datasets.Dataset.from_dict(
        {"row": order.tolist(), "label": [int(labels[i]) for i in order]}
    )
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=True,
        seed=int(rng.integers(2**31)),
    )
    partitioner.dataset = table
    shards = []
    for client in range(num_clients):
        try:
            with warnings.catch_warnings():  # it warns on every redraw; failure is raised below
                warnings.simplefilter("ignore", UserWarning)
                part = partitioner.load_partition(client)
        except ValueError as err:
            raise DataError(
                f"task {task!r}: Dirichlet label skew (alpha={alpha}) could not give each of "
                f"{num_clients} clients {min_size} rows from {len(labels)}; raise "
                "data.label_skew or lower data.train_size / data.eval_size"
            ) from err
        shards.append(np.asarray(part["row"], dtype=np.int64))
    return shards


def client_splits(
    task: str,
    num_rows: int,
    num_clients: int,
    train_size: int,
    eval_size: int,
    seed: int,
    labels: Sequence[int] | None = None,
    label_skew: float = 0.0,
    val_size: int = 0,
) -> list[Split]:
    """Every client's split of one task, in client order.

    Args:
        task: task name; it seeds the shuffle together with ``seed``.
        num_rows: rows available for the task.
        num_clients: clients holding the task.
        train_size, eval_size: rows per client for training and for evaluation.
        val_size: rows of the training ones set aside for validation (the training rows
            left are ``train_size - val_size``); the evaluation rows do not depend on it.
        seed: ``federation.seed``.
        labels: label index of every row (classification); needed for label skew.
        label_skew: Dirichlet alpha of the label skew; 0 means IID shards. Ignored (IID) for
            tasks without labels.

    Raises:
        DataError: the task has too few rows, naming how many exist and how many are needed.
    """
    need = train_size + eval_size
    if num_rows < num_clients * need:
        raise DataError(
            f"task {task!r} has {num_rows} rows but {num_clients} client(s) x "
            f"({train_size} train + {eval_size} eval) = {num_clients * need} are needed; "
            "lower data.train_size / data.eval_size or the number of clients"
        )
    if label_skew > 0 and labels is not None:
        if len(labels) != num_rows:
            raise ValueError(f"{len(labels)} labels for {num_rows} rows")
        shards = dirichlet_shards(labels, num_clients, label_skew, need, seed, task)
    else:
        shards = iid_shards(num_rows, num_clients, seed, task)
    return [
        Split(
            train=shard[eval_size + val_size : need].tolist(),
            eval=shard[:eval_size].tolist(),
            val=shard[eval_size : eval_size + val_size].tolist(),
        )
        for shard in shards
    ]
