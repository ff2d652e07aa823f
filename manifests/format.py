"""Constants of the bundle format. Reader and writer both import these, so they cannot drift."""

# The newest version this code reads and writes. Version 2 adds what a version-1 reader would
# misread or refuse: embedding tables placed `mapped` (the `mapped_embeddings` section), the token
# embedding read from the pretransposed head (an embedding record's `layout`), tensors kept for
# other tools but never read (`unread`) and numeric known answers (`known_answers`). A bundle that
# uses none of them is written as version 1, which version-1 readers still load; one that does is
# version 2, which they refuse with "upgrade mlx-prepared" (manifests/manifest.py `needed_version`).
FORMAT_VERSION = 2

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

# The source namings a manifest records (`source.naming`), and how messages and cards name them
# (the README's words): `mlx-lm` is Hugging Face's naming without the vision/audio towers.
NAMINGS = {
    "hf": "Hugging Face, model.language_model.*",
    "mlx-lm": "Hugging Face, model.language_model.*, without the vision/audio towers (as mlx-lm saves it)",
    "mlx-vlm": "mlx-vlm, language_model.model.*",
    "hf-text": "text-only, model.*",
}

# A pretransposed projection stores its weight contiguous as [in, out] under this suffix, so a
# reader can never mistake it for the [out, in] `.weight` of a standard one.
PRETRANSPOSED_SUFFIX = ".weight_t"

LM_HEAD = "lm_head"
EMBED_TOKENS = PREFIX + "embed_tokens"
EMBED_TOKENS_PER_LAYER = PREFIX + "embed_tokens_per_layer"

# Where the per-layer embedding table (`[vocab_per_layer, layers * per-layer width]`, 3.75 GiB of
# a bfloat16 E2B, of which one token reads one row) lives at run time: a target profile's
# `per_layer_embeddings`, `convert --ple`. `resident`: in a shard like every other tensor, loaded
# into accelerator memory. `mapped`: in a file of its own (MAPPED_FILE), memory-mapped read-only
# by the runtime, each token's row gathered on the host (manifests/records.py MAPPED).
RESIDENT, MAPPED = "resident", "mapped"
PLACEMENTS = (RESIDENT, MAPPED)
MAPPED_FILE = "embed_tokens_per_layer.safetensors"

def revision_problem(revision) -> str | None:
    """What is wrong with a hub revision (a branch, tag or commit) as a caller gave it, or None:
    printable ASCII without spaces, at most 255 characters. Checked where it enters (convert's
    --revision, runtime.load), before the hub or its cache is asked; a NUL or a newline went on
    to the hub client."""
    if not isinstance(revision, str):
        return f"must be a str (a branch, tag or commit), not {type(revision).__name__}"
    if not 0 < len(revision) <= 255 or not all("!" <= ch <= "~" for ch in revision):
        return f"{revision[:60]!r} is not a branch, tag or commit name (printable ASCII, no spaces, 1-255 characters)"
    return None


STANDARD = "standard"
PRETRANSPOSED = "pretransposed"
LAYOUTS = (STANDARD, PRETRANSPOSED)

DTYPES = ("bfloat16", "float16", "float32")

# Fused projections (a target profile's `fuse` list): one module per group whose weight is its
# members' rows concatenated in this order, so one GEMV on the shared input does the work of two
# or three. Paths are relative to a decoder layer (`model.language_model.layers.N.`). The fused
# record lists its members (`fused: [{path, out}, ...]`); the members have no records of their own.
#
# `qkv_laurel` and `q_laurel` add laurel's left projection, which reads the same input as q/k/v
# (the normed active plane), as a layer-level module: `qkv_laurel` in layers with a KV cache of
# their own, `q_laurel` in KV-shared layers (which have no k/v). `qkv` and `qkv_laurel` claim the
# same members, so a profile lists at most one of them (FUSED_EXCLUSIVE).
FUSED_GROUPS = {
    "qkv": ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "gate_up": ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
    "qkv_laurel": ("qkv_laurel_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "laurel.linear_left")),
    "q_laurel": ("q_laurel_proj", ("self_attn.q_proj", "laurel.linear_left")),
}
# The `role` a fused record carries (the members' roles are attn.q_proj ... in profiles).
FUSED_ROLES = {"qkv": "attn.qkv_proj", "gate_up": "mlp.gate_up_proj", "qkv_laurel": "layer.qkv_laurel_proj",
               "q_laurel": "layer.q_laurel_proj"}
# Groups that apply only in layers with a KV cache of their own / only in KV-shared layers.
FUSED_OWN_KV_ONLY = ("qkv", "qkv_laurel")
FUSED_KV_SHARED_ONLY = ("q_laurel",)
# Sets of groups a profile may list one of (they claim the same members in the same layers).
FUSED_EXCLUSIVE = (("qkv", "qkv_laurel"),)
# What `convert --fuse` stores fused: every group, one of each exclusive set (the larger).
FUSE_ALL = ("qkv_laurel", "q_laurel", "gate_up")


def fused_groups_in(kv_shared: bool) -> tuple[str, ...]:
    """The groups that apply in a layer with a KV cache of its own (`kv_shared` False) or in a
    KV-shared one (True), in FUSED_GROUPS order: what writer and reader both go by."""
    elsewhere = FUSED_OWN_KV_ONLY if kv_shared else FUSED_KV_SHARED_ONLY
    return tuple(name for name in FUSED_GROUPS if name not in elsewhere)


class ManifestError(ValueError):
    """A manifest that is missing, malformed, of an unsupported version, or inconsistent."""
