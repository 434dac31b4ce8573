"""Multi-task data for federated clients: the task registry, parsers, splits and preparation.

Public API (see each module for the details):

* :class:`Example`, :class:`Task`, :class:`ClientData` -- what a client trains and is scored on.
* :func:`resolve_task` -- the :class:`Task` of a ``[[tasks]]`` config entry.
* :func:`load_client_data` -- one client's task and its own train / eval examples.
* :func:`split_summary`, :func:`format_split_table` -- ``mira data splits``: every client's
  split sizes and label counts.
* :func:`list_tasks`, :func:`format_task_table` -- ``mira data list``.
* :func:`prepare` -- ``mira data prepare [TASK ...]``: fetch and extract built-in task files.
* :class:`DataError` -- missing or malformed data; the message names the file and the row.
"""

from mira.data.clients import (
    format_split_table,
    load_client_data,
    resolve_task,
    split_summary,
    task_examples,
)
from mira.data.sources import DataError
from mira.data.store import Prepared, data_root, format_task_table, list_tasks, prepare
from mira.data.tasks import REGISTRY, ClientData, Example, Task, TaskSpec

__all__ = [
    "REGISTRY",
    "ClientData",
    "DataError",
    "Example",
    "Prepared",
    "Task",
    "TaskSpec",
    "data_root",
    "format_split_table",
    "format_task_table",
    "list_tasks",
    "load_client_data",
    "prepare",
    "resolve_task",
    "split_summary",
    "task_examples",
]
