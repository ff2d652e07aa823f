"""The Gemma3n text config's values: every field the decoder reads, checked once, in one place.

Two doors lead here: `convert` checks the source's config.json (its text config) before it plans
anything, and every manifest read (manifests.manifest.validate_manifest: the runtime's load,
`verify`, `convert --force`'s proof) checks the recorded `model.text_config`. Past these doors the
converter's shape arithmetic and the runtime's model trust the values.

Each field has a type and a range, and the fields that must agree do (one entry per layer, an
AltUp index inside its planes, KV-shared layers with a producer of their type, ...). A value that
is missing takes the default of Hugging Face transformers' `Gemma3nTextConfig` (DEFAULTS), the
same on both sides, so a converted bundle is read with the values it was converted with.

Bounds: no real Gemma3n comes near them (E4B: 35 layers, vocabulary 262 400, hidden 2 048,
window 512); they keep a hostile config from making either side build gigabytes of lists or
caches before a shape check could fail.

- `num_hidden_layers` <= MAX_LAYERS (256): the model is built layer by layer in Python;
- every size, and every tensor dimension sizes multiply into (heads x head_dim, layers x
  per-layer hidden, AltUp planes squared), <= MAX_DIM (2^24): MLX shapes are 32-bit, and the
  converter compares these with each tensor's header;
- `sliding_window` <= MAX_WINDOW (65 536): a sliding layer's cache holds the whole window from
  its first prefill, so the window alone sizes memory no weight shape checks;
- `altup_num_inputs` <= MAX_ALTUP (16).
"""

from __future__ import annotations

import math
import numbers

from manifests.format import ManifestError

MAX_LAYERS = 256
MAX_DIM = 1 << 24
MAX_WINDOW = 1 << 16
MAX_ALTUP = 16
MAX_THETA = 1e12

FULL, SLIDING = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}

# Fields without a default: a config that lacks one is refused, naming it.
REQUIRED = ("vocab_size", "hidden_size", "hidden_size_per_layer_input", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads")

# transformers' Gemma3nTextConfig defaults for what the decoder reads.
DEFAULTS = {
    "vocab_size_per_layer_input": 262_144,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "sliding_window": 512,
    "layer_types": None,
    "num_kv_shared_layers": 15,
    "laurel_rank": 64,
    "altup_num_inputs": 4,
    "altup_active_idx": 0,
    "altup_correct_scale": True,
    "activation_sparsity_pattern": None,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "rope_parameters": None,
    "rope_theta": None,
    "rope_local_base_freq": None,
    "rope_scaling": None,
    "attention_bias": False,
    "max_position_embeddings": 32_768,
}

_SHOWN = 60


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


class _Checker:
    def __init__(self, config: dict, where: str):
        self.c, self.where = config, where

    def fail(self, field: str, what: str) -> ManifestError:
        return ManifestError(f"{self.where}: {field}: {what}, got {_shown(self.c.get(field))}")

    def int(self, field: str, low: int, high: int, value=None, name: str | None = None) -> int:
        v = self.c[field] if value is None else value
        if not _is_int(v) or not low <= v <= high:
            raise ManifestError(f"{self.where}: {name or field}: must be an integer from {low} to {high}, "
                                f"got {_shown(v)}")
        return v

    def real(self, field: str, value, low: float, high: float, low_open: bool = False,
             high_open: bool = False) -> float:
        ok = (_is_real(value) and (low < value if low_open else low <= value)
              and (value < high if high_open else value <= high))
        if not ok:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ManifestError(f"{self.where}: {field}: must be a finite number in {interval}, got {_shown(value)}")
        return float(value)

    def per_layer(self, field: str, n: int, check) -> list:
        """A scalar for every layer or a list of exactly one entry per layer, each checked."""
        v = self.c[field]
        if isinstance(v, (list, tuple)):
            if len(v) != n:
                raise ManifestError(f"{self.where}: {field}: needs one entry per layer ({n}), got {len(v)}")
            return [check(x, f"{field}[{i}]") for i, x in enumerate(v)]
        return [check(v, field)] * n


def checked_text_config(text: object, where: str = "text_config") -> dict:
    """`text` with the defaults of the fields it lacks filled in, every value the decoder reads
    checked; otherwise a one-line ManifestError naming `where`, the field and the value."""
    if not isinstance(text, dict):
        raise ManifestError(f"{where}: not a mapping, got {_shown(text)}")
    for name in REQUIRED:
        if name not in text:
            raise ManifestError(f"{where}: the text config has no {name!r}")
    c = {**DEFAULTS, **text}
    k = _Checker(c, where)

    n = k.int("num_hidden_layers", 1, MAX_LAYERS)
    for name in ("vocab_size", "vocab_size_per_layer_input", "hidden_size", "hidden_size_per_layer_input",
                 "laurel_rank"):
        k.int(name, 1, MAX_DIM)
    k.per_layer("intermediate_size", n, lambda v, name: k.int("intermediate_size", 1, MAX_DIM, v, name))
    heads = k.int("num_attention_heads", 1, MAX_DIM)
    kv_heads = k.int("num_key_value_heads", 1, heads)
    if heads % kv_heads:
        raise k.fail("num_key_value_heads", f"must divide num_attention_heads ({heads})")
    head_dim = k.int("head_dim", 2, MAX_DIM)
    if head_dim % 2:
        raise k.fail("head_dim", "must be even (rotary embeddings rotate pairs)")
    for what, product in (("num_attention_heads x head_dim", heads * head_dim),
                          ("num_hidden_layers x hidden_size_per_layer_input", n * c["hidden_size_per_layer_input"])):
        if product > MAX_DIM:
            raise ManifestError(f"{where}: {what} is {product}, more than the {MAX_DIM} a tensor dimension may be")
    k.real("rms_norm_eps", c["rms_norm_eps"], 0.0, 1.0, low_open=True)
    k.int("sliding_window", 1, MAX_WINDOW)
    k.int("max_position_embeddings", 1, MAX_DIM)  # the context generation warns past (runtime/generate.py)

    planes = k.int("altup_num_inputs", 1, MAX_ALTUP)
    k.int("altup_active_idx", 0, planes - 1)
    for name in ("altup_correct_scale", "tie_word_embeddings"):  # the converter reads the second, if present
        if name in c and not isinstance(c[name], bool):
            raise k.fail(name, "must be true or false")
    if c["attention_bias"] is not False:
        raise k.fail("attention_bias", "must be false (Gemma3n's attention has no bias)")
    if c["activation_sparsity_pattern"] is not None:
        # a quantile of a normal distribution: 1.0 would keep nothing (and has no finite cut)
        k.per_layer("activation_sparsity_pattern", n, lambda v, name: k.real(name, v, 0.0, 1.0, high_open=True))
    if c["final_logit_softcapping"] is not None:
        k.real("final_logit_softcapping", c["final_logit_softcapping"], 0.0, MAX_THETA, low_open=True)
    if c["hidden_activation"] not in ACTIVATIONS:
        raise k.fail("hidden_activation", f"must be one of {', '.join(ACTIVATIONS)}")

    types = c["layer_types"]
    if types is not None:
        if not isinstance(types, list) or len(types) != n:
            raise k.fail("layer_types", f"must be a list of one entry per layer ({n})")
        for i, t in enumerate(types):
            if t not in LAYER_TYPES:
                raise ManifestError(f"{where}: layer_types[{i}]: must be {FULL!r} or {SLIDING!r}, got {_shown(t)}")
    shared = k.int("num_kv_shared_layers", 0, n - 1)
    try:
        kv_producers(layer_types(c), n - shared)
        rope_thetas(c)
    except ValueError as e:
        raise ManifestError(f"{where}: {e}") from None
    return c


def layer_types(config: dict) -> list[str]:
    """The attention kind of every layer: the config's list, or Gemma3n's pattern (every fifth full)."""
    types = config.get("layer_types")
    if types is not None:
        return list(types)
    return [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(config["num_hidden_layers"])]


def kv_producers(types: list[str], first_shared: int) -> dict[int, int]:
    """KV-shared layer -> the last non-shared layer of its type, whose K/V it reuses."""
    last_of_type = {t: i for i, t in enumerate(types[:first_shared])}
    producers = {}
    for i in range(first_shared, len(types)):
        if types[i] not in last_of_type:
            raise ValueError(f"num_kv_shared_layers: KV-shared layer {i} ({types[i]}) has no earlier "
                             f"{types[i]} layer to share")
        producers[i] = last_of_type[types[i]]
    return producers


def rope_thetas(config: dict) -> dict[str, float]:
    """The RoPE base of each layer type, from `rope_parameters` (new configs: one set for every type,
    or one per type) or `rope_theta`/`rope_local_base_freq` (old ones); ValueError if unusable."""
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_parameters: must be a mapping, got {_shown(params)}")
    if "rope_theta" in params or "rope_type" in params:  # one set of parameters for every type
        params = {FULL: params, SLIDING: params}
    scaling = config.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling: must be a mapping, got {_shown(scaling)}")
    old = {FULL: config.get("rope_theta"), SLIDING: config.get("rope_local_base_freq")}
    thetas = {}
    for kind in (FULL, SLIDING):
        p = params.get(kind) or {}
        if not isinstance(p, dict):
            raise ValueError(f"rope_parameters.{kind}: must be a mapping, got {_shown(p)}")
        p = dict(p)
        if kind == FULL and scaling:
            p.update(scaling)
        if p.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type of {kind}: {_shown(p['rope_type'])} is not supported (only 'default')")
        theta = p.get("rope_theta", old[kind])
        theta = DEFAULT_THETA[kind] if theta is None else theta
        if not _is_real(theta) or not 0 < theta <= MAX_THETA:
            raise ValueError(f"rope_theta of {kind}: must be a finite number in (0, {MAX_THETA:g}], "
                             f"got {_shown(theta)}")
        thetas[kind] = float(theta)
    return thetas


# What MLX quantizes and multiplies, by mode: (bits, group sizes) it takes (mlx 0.32).
QUANT_MODES = {"affine": ((1, 2, 3, 4, 5, 6, 8), (32, 64, 128)), "mxfp4": ((4,), (32,)), "mxfp8": ((8,), (32,)),
               "nvfp4": ((4,), (16,))}


def check_eos_token_ids(value: object, vocab_size: int, where: str) -> list[int]:
    """An `eos_token_id` (of config.json, its text config or generation_config.json): absent,
    one id or a list of ids, each an integer in [0, vocab_size): generation stops on each. A
    string or a bool was skipped without a word, a negative id failed the manifest's own check
    at the end of the conversion ("internal error")."""
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    for v in ids:
        if not _is_int(v) or not 0 <= v < vocab_size:
            raise ManifestError(f"{where}: eos_token_id: must be a token id or a list of token ids in "
                                f"[0, {vocab_size}) (vocab_size), got {_shown(value)}")
    return list(ids)


def check_quantization(q: object, where: str) -> dict:
    """A `{bits, group_size, mode}` MLX can compute with (a source's quantization block, a
    manifest record's `quantized`); ManifestError naming `where` otherwise."""
    if not isinstance(q, dict):
        raise ManifestError(f"{where}: not a mapping of bits, group_size and mode, got {_shown(q)}")
    mode = q.get("mode", "affine")
    if mode not in QUANT_MODES:
        raise ManifestError(f"{where}: mode {_shown(mode)} is not one MLX quantizes with ({', '.join(QUANT_MODES)})")
    bits, groups = QUANT_MODES[mode]
    if q.get("bits") not in bits or isinstance(q.get("bits"), bool):
        raise ManifestError(f"{where}: bits {_shown(q.get('bits'))} is not one {mode} takes "
                            f"({', '.join(map(str, bits))})")
    if q.get("group_size") not in groups or isinstance(q.get("group_size"), bool):
        raise ManifestError(f"{where}: group_size {_shown(q.get('group_size'))} is not one {mode} takes "
                            f"({', '.join(map(str, groups))})")
    return q
