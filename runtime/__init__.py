"""The lean runtime: load a prepared bundle (zero load-time work) and run Gemma3n text."""

from runtime.generate import generate, stream_generate
from runtime.loader import load
from runtime.numeric import verify_numeric
from runtime.precompile import start as compile_in_background

__all__ = ["compile_in_background", "generate", "load", "stream_generate", "verify_numeric"]
