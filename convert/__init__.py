"""The offline converter: a Gemma3n checkpoint in, a prepared bundle for one device class out.

    from convert import convert_checkpoint, plan
    convert_checkpoint("gemma-3n-E2B-it/", "bundle/", target="m5")

Source reading (`source`, `safetensors_io`), planning (`planning`: pure, tensor -> role -> layout from
a target profile), writing (`write`: streaming, sharded, hashed) and the atomic wrapper with the
manifest (`pipeline`). The CLI (`convert.cli`, `python -m convert`) only calls these.
"""

from convert.errors import ConvertError
from convert.pipeline import convert_checkpoint, execute, plan, resolve_target

__all__ = ["ConvertError", "convert_checkpoint", "execute", "plan", "resolve_target"]
