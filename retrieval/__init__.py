"""Documents in, ranked passages with sources out.

The API the chat's search tool and the UI use:

    from retrieval import open_index

    index = open_index(home / "indexes" / "default")          # embedder loads lazily, cached
    report = index.add_paths(["notes/", "paper.pdf"])         # -> IngestReport (per-file status)
    for p in index.search("what did we decide about X?", k=5):  # mode="hybrid"|"dense"|"lexical"
        print(p.score, p.citation(), p.text)                    # Passage: doc_id, source, page, start, end
    index.remove(doc_id)                                       # -> chunks removed
    index.info()                                               # -> dict of settings and counts

Every error raised on purpose derives from `RetrievalError` and carries an actionable message.
"""

from .chunking import Chunk, ChunkingConfig, chunk_document
from .dense import DenseConfig
from .embedder import DEFAULT_EMBEDDER, Embedder, HashEmbedder, get_embedder
from .errors import (ConfigError, DocumentNotFoundError, EmbedderLoadError, EmbedderMismatchError,
                     IndexCorruptError, IndexLockedError, IndexNotFoundError, LoadSkip, RetrievalError)
from .index import DocumentInfo, FileReport, Index, IngestReport, open_index, repair_index
from .loaders import Document, iter_files, load_file
from .search import Passage, SearchConfig

__all__ = [
    "open_index", "repair_index", "Index", "Passage", "IngestReport", "FileReport", "DocumentInfo",
    "ChunkingConfig", "DenseConfig", "SearchConfig", "Document", "Chunk", "chunk_document",
    "load_file", "iter_files", "Embedder", "HashEmbedder", "get_embedder", "DEFAULT_EMBEDDER",
    "RetrievalError", "ConfigError", "DocumentNotFoundError", "EmbedderLoadError",
    "EmbedderMismatchError", "IndexCorruptError", "IndexLockedError", "IndexNotFoundError", "LoadSkip",
]
