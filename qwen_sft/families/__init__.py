"""Model-family facts: what the toolkit knows about the model family it fine-tunes, one module per family.

A family module (qwen2_5.py) names its chat template file (beside it), its special tokens and stop tokens, its
Ollama template and GGUF pre-tokenizer, the byte and token estimates the data stage budgets rows with, and the
model type and vocabulary size its `tiny` stand-in is built with. Every other module reads these facts from `family`, the family in use. Adding a
family such as Qwen3 is one module with the same names plus its template, and pointing `family` at it.
"""

from . import qwen2_5 as family  # the family in use

__all__ = ["family"]
