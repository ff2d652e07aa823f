"""The architectures the runtime builds, by the manifest's `model.architecture`.

Each is one module of this package holding what is particular to it: `Model(text_config,
projections, embeddings, mapped=...)`, the model built from the manifest's records (and the
tables placed `mapped`, opened by the loader), and
`projection_shapes(text_config)`, the `[out, in]` shapes of its projections by target-profile
role, which `runtime calibrate` measures. A second architecture is a module of its own and a
line in MODULES; loading, verifying and calibrating read it from here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from manifests import ManifestError
from manifests.gemma3n import ARCHITECTURE as GEMMA3N

MODULES = {GEMMA3N: "runtime.model"}  # Gemma3n's compiled decode step is runtime/fast.py


def architecture(name: str) -> ModuleType:
    """The runtime's module for architecture `name`; a ManifestError when it builds no such one."""
    if name not in MODULES:
        raise ManifestError(f"manifest.yaml: model.architecture {name!r} is not one this runtime builds "
                            f"({', '.join(MODULES)})")
    return importlib.import_module(MODULES[name])
