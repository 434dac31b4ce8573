"""The error of the client layer: a base model could not be found, converted, placed or
loaded, or ``lora.target_modules`` does not fit it.

Its own module because every other model module raises it (:mod:`mira.client.devices`,
:mod:`mira.client.base`, :mod:`mira.client.lora`) and the lowest of them must not import
the others.
"""

from __future__ import annotations

from mira.errors import MiraError


class ModelError(MiraError, RuntimeError):
    """A base model could not be found, converted, placed or loaded."""
