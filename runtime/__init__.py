"""The lean runtime: load a prepared bundle (zero load-time work) and run Gemma3n text."""

from runtime.loader import load

__all__ = ["load"]
