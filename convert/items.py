"""One bundle tensor of a plan and how it is made: what planning, fusion and the writer pass along.

Its own module so that fusion (which merges a plan's items) and planning (which makes them and
calls fusion) both use it without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from convert.quantize import QuantSpec
from convert.safetensors_io import ITEMSIZE, TensorInfo


@dataclass(frozen=True)
class Item:
    """One bundle tensor and how it is made from one source tensor."""

    key: str  # bundle key
    file: str  # source file, relative to the source root
    source: TensorInfo
    dtype: str  # safetensors dtype code written
    shape: tuple[int, ...]  # shape written
    transform: str  # "copy" | "cast" | "transpose" | "quantize" | "zeros" (no source: `source` only sizes it)
    quant: QuantSpec | None = None  # quantize: the spec
    part: str = ""  # quantize: "weight", "scales" or "biases" of `source`
    quant_dtype: str = ""  # quantize: the float dtype `source` is cast to before quantizing
    # A fused item: (file, tensor) of each member, in row order; `source` then describes their
    # stack (the rows added up) for sizes only, and the writer reads the members.
    members: tuple[tuple[str, TensorInfo], ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def parts(self) -> tuple[tuple[str, TensorInfo], ...]:
        """(source file, source tensor) of what is read, in order: the members, or the one source."""
        return self.members or ((self.file, self.source),)
