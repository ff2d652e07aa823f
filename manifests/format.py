"""Constants of the bundle format. Reader and writer both import these, so they cannot drift."""

FORMAT_VERSION = 1

MANIFEST_NAME = "manifest.yaml"
# The manifest's own sha256, written beside it after it, in the form `sha256sum` prints and checks
# (`<hex>  manifest.yaml`), so that `verify` can tell an edited manifest. Additive: it needs no new
# format_version, and a bundle without it is still a valid version-1 bundle, whose manifest
# `verify` then reports as unchecked.
MANIFEST_DIGEST_NAME = "manifest.sha256"
# Far above any real manifest (an E4B one is a few hundred kB); refused before it is read.
MANIFEST_LIMIT = 16 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"

# Every bundle uses the Hugging Face naming of the text decoder, whatever the source used.
PREFIX = "model.language_model."

# A pretransposed projection stores its weight contiguous as [in, out] under this suffix, so a
# reader can never mistake it for the [out, in] `.weight` of a standard one.
PRETRANSPOSED_SUFFIX = ".weight_t"

LM_HEAD = "lm_head"
LM_HEAD_PRETRANSPOSED_KEY = "lm_head" + PRETRANSPOSED_SUFFIX
EMBED_TOKENS = PREFIX + "embed_tokens"

STANDARD = "standard"
PRETRANSPOSED = "pretransposed"
LAYOUTS = (STANDARD, PRETRANSPOSED)

DTYPES = ("bfloat16", "float16", "float32")

# Fused projections (a target profile's `fuse` list): one module per group whose weight is its
# members' rows concatenated in this order, so one GEMV on the shared input does the work of two
# or three. Paths are relative to a decoder layer (`model.language_model.layers.N.`). The fused
# record lists its members (`fused: [{path, out}, ...]`); the members have no records of their own.
FUSED_GROUPS = {
    "qkv": ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "gate_up": ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
}
# The `role` a fused record carries (the members' roles are attn.q_proj ... in profiles).
FUSED_ROLES = {"qkv": "attn.qkv_proj", "gate_up": "mlp.gate_up_proj"}


class ManifestError(ValueError):
    """A manifest that is missing, malformed, of an unsupported version, or inconsistent."""
