"""Constants of the bundle format. Reader and writer both import these, so they cannot drift."""

FORMAT_VERSION = 1

MANIFEST_NAME = "manifest.yaml"
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
