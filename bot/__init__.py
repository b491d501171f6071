"""Parley inference: a conversation in, a streamed reply out."""

__version__ = "0.1.0"
