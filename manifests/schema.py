"""A small validator for the subset of JSON Schema the manifest schema uses.

Supported keywords: type, enum, const, properties, required, additionalProperties, items,
minimum, minItems. Kept here (about sixty lines) rather than adding a dependency: the schema is
ours and small, and errors must name the exact path for a one-line message.
"""

from __future__ import annotations

from typing import Any

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class SchemaError(ValueError):
    def __init__(self, path: str, message: str):
        super().__init__(f"{path or '<root>'}: {message}")
        self.path = path


def validate(value: Any, schema: dict, path: str = "") -> None:
    """Raise SchemaError naming the first place where `value` does not match `schema`."""
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            raise SchemaError(path, f"expected {' or '.join(types)}, got {type(value).__name__}")
    if "const" in schema and value != schema["const"]:
        raise SchemaError(path, f"expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(path, f"expected one of {schema['enum']}, got {value!r}")
    if "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        raise SchemaError(path, f"must be >= {schema['minimum']}, got {value!r}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                raise SchemaError(path, f"missing required field {name!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            sub = f"{path}.{name}" if path else str(name)
            if name in props:
                validate(item, props[name], sub)
            elif extra is False:
                raise SchemaError(path, f"unexpected field {name!r}")
            elif isinstance(extra, dict):
                validate(item, extra, sub)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise SchemaError(path, f"needs at least {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                validate(item, schema["items"], f"{path}[{i}]")
