"""The bundle format: the one contract between `convert` (writer) and `runtime` (reader).

Everything both halves must agree on lives here and nowhere else: the format version, file
names, key naming, layouts, the manifest schema and its reader/writer, and the target profiles
with the pure device -> target mapping.
"""

from manifests.format import (
    FORMAT_VERSION,
    INDEX_NAME,
    LAYOUTS,
    MANIFEST_DIGEST_NAME,
    MANIFEST_NAME,
    PREFIX,
    PRETRANSPOSED_SUFFIX,
    ManifestError,
)
from manifests.manifest import (
    dump_manifest,
    load_manifest,
    manifest_digest_line,
    read_manifest,
    recorded_manifest_digest,
    validate_manifest,
    write_manifest,
)
from manifests.profiles import (
    ProfileError,
    TargetProfile,
    known_targets,
    load_profile,
    load_profile_file,
    profile_sha256,
    target_for_device,
)

__all__ = [
    "FORMAT_VERSION",
    "INDEX_NAME",
    "LAYOUTS",
    "MANIFEST_DIGEST_NAME",
    "MANIFEST_NAME",
    "PREFIX",
    "PRETRANSPOSED_SUFFIX",
    "ManifestError",
    "ProfileError",
    "TargetProfile",
    "dump_manifest",
    "known_targets",
    "load_manifest",
    "load_profile",
    "load_profile_file",
    "manifest_digest_line",
    "profile_sha256",
    "read_manifest",
    "recorded_manifest_digest",
    "target_for_device",
    "validate_manifest",
    "write_manifest",
]
