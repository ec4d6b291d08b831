"""capplug for LlamaIndex: retrieved nodes reordered by capplug's scorer."""

from llama_index.postprocessor.capplug.base import CappyRerank

__all__ = ["CappyRerank"]
