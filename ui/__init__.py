"""Parley's Gradio front end: builds the UI over an Assistant; holds no model logic."""
