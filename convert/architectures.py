"""The architectures the converter reads, by the manifest's `model.architecture`.

Each is one module of this package describing a checkpoint of it: ARCHITECTURE and MODEL_TYPES
(its name and its configs' `model_type` values), TEXT_MODEL_TYPE (what the bundle's text config
says), `expected_tensors(text_config)` (every tensor the decoder uses, decoder-relative name ->
shape), `kv_shared_unused(text_config)` (tensors a checkpoint may carry that are never read,
name -> shape), `mlx_lm_text_config(text_config)` (keys mlx-lm's loader needs that a config may lack),
`projection_role(module)`, EMBEDDINGS, NEVER_QUANTIZED (with NEVER_QUANTIZED_BECAUSE), and
`kv_shared_layers(text_config)` (per layer, whether it reads another layer's K/V cache, which
decides the fused groups that apply there). A second architecture is a module of its own and a
line in MODULES; planning, fusion and quantization read it from here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from manifests.gemma3n import ARCHITECTURE as GEMMA3N

MODULES = {GEMMA3N: "convert.gemma3n"}


def architecture(name: str) -> ModuleType:
    """The converter's module for architecture `name` (KeyError: none)."""
    return importlib.import_module(MODULES[name])


def architecture_of(model_type: str) -> str:
    """The architecture whose configs have this `model_type` (what source reading accepted)."""
    for name in MODULES:
        if model_type in architecture(name).MODEL_TYPES:
            return name
    raise KeyError(f"no architecture with model_type {model_type!r}")
