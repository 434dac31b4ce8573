"""The base of every error mira reports to its user.

Each part of the package raises its own subclass (ConfigError, DataError, ModelError,
FederationError, ResultsError, ...); the command line catches MiraError and prints one line
naming the problem and what to do, instead of a traceback.
"""

from __future__ import annotations


class MiraError(Exception):
    """An error mira explains to its user: the message names the problem and what to do."""
