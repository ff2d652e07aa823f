"""The lean runtime: load a prepared bundle (zero load-time work) and run Gemma3n text."""

from runtime.generate import generate, stream_generate
from runtime.loader import load

__all__ = ["generate", "load", "stream_generate"]
