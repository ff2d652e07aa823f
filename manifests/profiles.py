"""Target profiles: which layout each projection role gets on a device class, per dtype.

A profile is data (`manifests/targets/NAME.yaml`):

    name: m5
    description: ...
    evidence: ...            # where the choice comes from: a measurement or a citation
    layouts:                 # roles not listed are `standard`
      mlp.gate_proj: pretransposed
      lm_head: {float32: pretransposed, default: standard}   # per-dtype rule
    fuse: [qkv, gate_up]     # optional: projection groups stored fused (manifests.format.FUSED_GROUPS)
    mlx_lm: true             # optional: bundles also load in mlx-lm's own loader (no layouts, no fuse)
    per_layer_embeddings: mapped   # optional: resident (the default) or mapped (manifests.format.PLACEMENTS)

A fused group takes the layout its first member's rule gives (attn.q_proj for qkv, qkv_laurel and
q_laurel, mlp.gate_proj for gate_up); where its members' rules disagree for the dtype written, the
group stays unfused. `qkv` and `qkv_laurel` fuse the same projections: a profile lists one.

`per_layer_embeddings` places the per-layer embedding table: `resident` in accelerator memory
like every weight, or `mapped`, memory-mapped on the host with each token's row gathered there
(the trade: the table's gigabytes of accelerator memory against a host gather per token, which
`runtime calibrate --config BUNDLE` measures).

`target_for_device` maps an `mx.device_info()` dictionary to a built-in target name. It is a
pure function so tests feed it recorded dictionaries instead of needing the hardware.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from manifests.files import CONFIG_LIMIT, FileRefused, NotParsed, parse_yaml, read_limited
from manifests.format import DTYPES, FUSED_EXCLUSIVE, FUSED_GROUPS, LAYOUTS, MAPPED, PLACEMENTS, RESIDENT, STANDARD
from manifests.safetensors_header import shown

ROLES = (
    "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "laurel.linear_left", "laurel.linear_right",
    "altup.prediction_coefs", "altup.correction_coefs", "altup.modality_router",
    "per_layer_input_gate", "per_layer_projection",
    "per_layer_model_projection", "altup_projections", "altup_unembed_projections",
    "lm_head",
)


class ProfileError(ValueError):
    """An unknown target name or a malformed profile file."""


@dataclass(frozen=True)
class TargetProfile:
    name: str
    content: dict = field(repr=False)
    sha256: str = ""

    @property
    def layouts(self) -> dict:
        return self.content.get("layouts") or {}

    def layout_for(self, role: str, dtype: str) -> str:
        """The layout this profile asks for `role` when the weight is written as `dtype`."""
        rule = self.layouts.get(role, STANDARD)
        if isinstance(rule, str):
            return rule
        return rule.get(dtype, rule.get("default", STANDARD))

    @property
    def fuse(self) -> tuple[str, ...]:
        """The projection groups this profile stores fused (names of FUSED_GROUPS)."""
        return tuple(self.content.get("fuse") or ())

    @property
    def mlx_lm(self) -> bool:
        """Whether this profile's bundles are written for mlx-lm's own loader too (its weights as
        mlx-lm's modules hold them, the tensors and config keys it wants)."""
        return bool(self.content.get("mlx_lm"))

    @property
    def per_layer_embeddings(self) -> str:
        """Where this profile places the per-layer embedding table (manifests.format.PLACEMENTS)."""
        return self.content.get("per_layer_embeddings") or RESIDENT


def _targets_dir():
    return resources.files("manifests").joinpath("targets")


def known_targets() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _targets_dir().iterdir() if p.name.endswith(".yaml"))


def profile_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _check(content: object, where: str) -> dict:
    if not isinstance(content, dict):
        raise ProfileError(f"{where}: a target profile must be a mapping")
    if not isinstance(content.get("name"), str) or not content["name"]:
        raise ProfileError(f"{where}: missing `name`")
    for key, kind, types in (("description", "a string", str), ("evidence", "a string", str),
                             ("device_class", "a string", str), ("device", "a mapping", dict),
                             ("calibration", "a mapping", dict)):
        if content.get(key) is not None and not isinstance(content[key], types):
            raise ProfileError(f"{where}: `{key}` must be {kind}, got {shown(content[key])}")
    layouts = content.get("layouts") or {}
    if not isinstance(layouts, dict):
        raise ProfileError(f"{where}: `layouts` must be a mapping of role to layout")
    for role, rule in layouts.items():
        if role not in ROLES:
            raise ProfileError(f"{where}: unknown role {role!r} (known: {', '.join(ROLES)})")
        rules = {"default": rule} if isinstance(rule, str) else rule
        if not isinstance(rules, dict):
            raise ProfileError(f"{where}: layout of {role} must be a layout or a dtype mapping")
        for dtype, layout in rules.items():
            if dtype != "default" and dtype not in DTYPES:
                raise ProfileError(f"{where}: {role}: unknown dtype {dtype!r}")
            if layout not in LAYOUTS:
                raise ProfileError(f"{where}: {role}: unknown layout {layout!r} (use {' or '.join(LAYOUTS)})")
    fuse = content.get("fuse")
    if fuse is not None:
        if not isinstance(fuse, list):
            raise ProfileError(f"{where}: `fuse` must be a list of group names ({', '.join(FUSED_GROUPS)})")
        for group in fuse:
            if not isinstance(group, str) or group not in FUSED_GROUPS:
                raise ProfileError(f"{where}: fuse: unknown group {group!r} (known: {', '.join(FUSED_GROUPS)})")
        if len(set(fuse)) != len(fuse):
            raise ProfileError(f"{where}: fuse: a group is listed twice")
        for groups in FUSED_EXCLUSIVE:
            listed = [g for g in groups if g in fuse]
            if len(listed) > 1:
                raise ProfileError(f"{where}: fuse: {' and '.join(listed)} fuse the same projections; list one")
    placement = content.get("per_layer_embeddings")
    if placement is not None and placement not in PLACEMENTS:
        raise ProfileError(f"{where}: per_layer_embeddings: {shown(placement)} is not {' or '.join(PLACEMENTS)}")
    mlx_lm = content.get("mlx_lm", False)
    if not isinstance(mlx_lm, bool):
        raise ProfileError(f"{where}: `mlx_lm` must be true or false")
    if mlx_lm:
        for role, rule in layouts.items():
            if any(layout != STANDARD for layout in ([rule] if isinstance(rule, str) else rule.values())):
                raise ProfileError(f"{where}: mlx_lm: mlx-lm reads [out, in] weights only, but {role} is laid out "
                                   "otherwise")
        if fuse:
            raise ProfileError(f"{where}: mlx_lm: mlx-lm reads no fused projection, but `fuse` lists some")
        if placement == MAPPED:
            raise ProfileError(f"{where}: mlx_lm: mlx-lm reads the per-layer embedding table from the shards, but "
                               "per_layer_embeddings is mapped")
    return content


def _from_text(text: str, where: str) -> TargetProfile:
    try:
        content = parse_yaml(text)
    except NotParsed as e:
        raise ProfileError(f"{where}: {e}") from None
    content = _check(content, where)
    return TargetProfile(name=content["name"], content=content, sha256=profile_sha256(text))


def load_profile(name: str) -> TargetProfile:
    """A built-in profile by name; an unknown name lists the known ones."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name not in known_targets():
        raise ProfileError(f"unknown target {name!r}; known targets: {', '.join(known_targets())}")
    path = _targets_dir().joinpath(f"{name}.yaml")
    return _from_text(path.read_text(), f"manifests/targets/{name}.yaml")


def load_profile_file(path: str | os.PathLike) -> TargetProfile:
    """A profile from a file, through the small-file door (manifests/files.py): a FIFO or a device
    (`/dev/zero`) is refused by type before any read, and at most CONFIG_LIMIT bytes are read."""
    path = Path(path)
    try:
        raw = read_limited(path, CONFIG_LIMIT, "target profile")
    except FileRefused as e:
        raise ProfileError(str(e)) from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read target profile ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    return _from_text(text, str(path))


_APPLE = re.compile(r"applegpu_g(\d+)([a-z]*)")


def target_for_device(info: dict) -> str:
    """Map `mx.device_info()` to a built-in target name.

    Apple GPUs report `applegpu_g<NN><s>`: 13..16 are M1..M4, 17 is M5; suffix `p` is phone
    class (A-series), which the M5 evidence does not cover. Generations after 17 are assumed to
    keep M5's preference until measured otherwise. CUDA reports `sm_NN`; a CPU its machine type.
    """
    arch = str(info.get("architecture", "")).lower()
    apple = _APPLE.fullmatch(arch)
    if apple:
        generation, suffix = int(apple.group(1)), apple.group(2)
        return "m5" if generation >= 17 and suffix != "p" else "generic"
    if arch.startswith("sm_"):
        return "cuda"
    if arch in ("x86_64", "amd64"):
        return "cpu-x86_64"
    return "generic"


# --- Calibrated profiles the user saved (`runtime calibrate --save`) --------------------------

PROFILE_DIR_ENV = "MLX_PREPARED_PROFILE_DIR"


def user_profile_dir() -> Path:
    """Where saved calibrated profiles live: `$MLX_PREPARED_PROFILE_DIR`, else
    `$XDG_CONFIG_HOME/mlx-prepared/profiles` (`~/.config/mlx-prepared/profiles`)."""
    try:
        if os.environ.get(PROFILE_DIR_ENV):
            return Path(os.environ[PROFILE_DIR_ENV]).expanduser()
        config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    except RuntimeError as e:  # `~nosuchuser/...`, or no home directory to be found
        name = PROFILE_DIR_ENV if os.environ.get(PROFILE_DIR_ENV) else "the home directory"
        raise ProfileError(f"{name}: cannot find the saved profile directory ({e})") from None
    return Path(config_home) / "mlx-prepared" / "profiles"


def _device_key(info: dict) -> tuple[str, str]:
    return str(info.get("device_name", "")), str(info.get("architecture", ""))


def _file_slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def user_profile_path(info: dict) -> Path:
    """The file a calibrated profile of the device `info` (`mx.device_info()`) is saved as."""
    name, arch = _device_key(info)
    return user_profile_dir() / f"{_file_slug(arch)}--{_file_slug(name)}.yaml"


def save_user_profile(text: str, info: dict) -> Path:
    """Check `text` as a profile and store it for the device `info`; replaces an earlier one."""
    _from_text(text, "calibrated profile")
    path = user_profile_path(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def saved_profile_for_device(info: dict) -> TargetProfile | None:
    """The saved calibrated profile whose recorded `device` has exactly this device's
    `device_name` and `architecture`, or None. A malformed file in the directory is an error
    naming it, not silently skipped: the user saved it to be used."""
    directory = user_profile_dir()
    if not directory.is_dir():
        return None
    want = _device_key(info)
    if not all(want):
        return None
    found = []
    for path in sorted(directory.glob("*.yaml")):
        profile = load_profile_file(path)
        device = profile.content.get("device")
        if isinstance(device, dict) and _device_key(device) == want:
            found.append((path.stat().st_mtime, str(path), profile))
    return max(found, key=lambda f: f[:2])[2] if found else None
