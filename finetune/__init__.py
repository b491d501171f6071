"""Parley's training half: data in, LoRA adapters and text classifiers out.

Recipes: ``finetune.lora`` (chat adapters), ``finetune.classify`` (text classifiers),
``finetune.merge`` (merge an adapter into its base), ``finetune.evaluate`` (base vs adapter).
CLI: ``parley finetune {lora,classify,merge,eval}`` (``finetune.cli``), also ``python -m finetune``.
"""
