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


class ManifestError(ValueError):
    """A manifest that is missing, malformed, of an unsupported version, or inconsistent."""
