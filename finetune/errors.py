"""Errors the training half raises on purpose; each says what went wrong and how to fix it."""

from __future__ import annotations

from bot.errors import ParleyError


class FinetuneError(ParleyError):
    """A training job cannot start or cannot go on."""

    status = 400


class DataError(FinetuneError):
    """The training data is unreadable, malformed, or too much of it was rejected."""


class NonFiniteError(FinetuneError):
    """The loss or the gradients became NaN/Inf; nothing non-finite was saved."""

    status = 500


class ResumeError(FinetuneError):
    """A run cannot resume: no complete checkpoint, or the settings changed since it was written."""


class OutOfMemoryError(FinetuneError):
    """Training ran out of (GPU or CPU) memory; the message says which setting to lower."""

    status = 500
