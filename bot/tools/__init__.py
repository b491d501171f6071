"""Tools the chat can use: search, translate, sentiment; their registry, safety helpers and runner."""
