"""Exceptions raised by `retrieval`.

Every error derives from `RetrievalError`, so a caller (the main CLI, the chat's search tool)
can catch one type and show the message, which says what went wrong and how to fix it.
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class of every error this package raises on purpose."""


class IndexNotFoundError(RetrievalError):
    """The index folder does not exist or holds no committed version."""


class IndexCorruptError(RetrievalError):
    """A file of the index is missing, truncated or fails its checksum."""


class EmbedderMismatchError(RetrievalError):
    """The index was built with another embedder (name or dimension) than the one given."""


class IndexLockedError(RetrievalError):
    """Another writer (process or thread) holds the index's write lock."""


class EmbedderLoadError(RetrievalError):
    """The embedding model could not be found or loaded (offline, wrong path, ...)."""


class ConfigError(RetrievalError):
    """An invalid setting (chunk sizes, search mode, index type, ...)."""


class DocumentNotFoundError(RetrievalError):
    """No document with the given id is in the index."""


class LoadSkip(RetrievalError):
    """A file was skipped while loading; the message is the reason shown in the ingest report."""
