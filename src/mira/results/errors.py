"""What can go wrong when reading or writing results, as one-line errors for the user.

Every class is a :class:`mira.errors.MiraError`: the command line prints its message (which
names the file and what to do) instead of a traceback.
"""

from __future__ import annotations

from mira.errors import MiraError


class ResultsError(MiraError, ValueError):
    """A results file or folder cannot be read or written as asked."""


class RunDirError(ResultsError):
    """A run directory is missing a file, holds a damaged one, or contradicts itself."""


class RunExistsError(RunDirError):
    """``mira run --out DIR``: DIR already holds a run (continue it with ``--resume``)."""


class RunInUseError(RunDirError):
    """Another process is writing into the same run directory right now."""


class ReportError(ResultsError):
    """The directory is neither a run nor a comparison, or holds no finished round."""


class DiffError(ResultsError):
    """Two runs cannot be compared: they cover different rounds, clients or tensors."""
