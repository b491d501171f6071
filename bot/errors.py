"""Parley's small exception hierarchy.

Every error a person can cause carries a message that says what went wrong, where the value
came from and how to fix it. Callers at the boundaries map these to exit codes (CLI) or
HTTP statuses (API): ``status`` is the HTTP status the API answers with.
"""

from __future__ import annotations


class ParleyError(Exception):
    """Base of every error Parley raises on purpose."""

    status: int = 500


class ConfigError(ParleyError):
    """A setting is missing or invalid (a flag, a PARLEY_* variable or the TOML file)."""

    status = 400


class ModelLoadError(ParleyError):
    """A model or adapter could not be loaded; the message lists what was tried."""

    status = 500


class RequestError(ParleyError):
    """A client sent something we cannot serve (empty message, unknown role, too long...)."""

    status = 400


class NotFoundError(RequestError):
    """A named thing (adapter, model, conversation) does not exist."""

    status = 404


class TooLargeError(RequestError):
    """A request body or upload is over its size limit (HTTP 413)."""

    status = 413


class UnsupportedMediaError(RequestError):
    """A body sent with a Content-Type the route does not read (HTTP 415)."""

    status = 415


class ContextOverflowError(RequestError):
    """A single message cannot fit into the model's context window."""

    status = 400


class BusyError(ParleyError):
    """The server is at capacity; the client should retry shortly (HTTP 503 with Retry-After)."""

    status = 503


class GenerationError(ParleyError):
    """The model failed while generating."""

    status = 500
