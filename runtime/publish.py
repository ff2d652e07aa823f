"""`runtime publish`: ship a checked bundle to the model hub, one folder per device class.

Repository layout (runtime/hub.py reads it back):

    org/gemma-3n-E2B-it-mlx-prepared/
        README.md            model card listing every variant
        m5/manifest.yaml     a complete bundle per target
        m5/model-00001-of-00002.safetensors ...
        generic/manifest.yaml ...

A bundle is published only after `verify` (its files) and `verify --numeric` (its known answers,
on this machine: runtime/numeric.py) pass; the card says where the numeric check passed. This
sits above both the loader and the hub's download side, which it uses, so neither imports it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from manifests import MANIFEST_NAME, ManifestError
from manifests.format import MANIFEST_DIGEST_NAME, NAMINGS, PRETRANSPOSED
from manifests.records import Storage, fused_members
from runtime.bundle import read_bundle_manifest
from runtime.hub import HubError


def _pretransposed_roles(manifest: dict) -> list[str]:
    return sorted({p["role"] for p in manifest["projections"].values() if Storage.of(p).layout == PRETRANSPOSED})


def _fused_modules(manifest: dict) -> list[str]:
    """Fused modules by their last path part (qkv_proj, gate_up_proj, qkv_laurel_proj, ...), each once."""
    return sorted({path.rsplit(".", 1)[-1] for path, p in manifest["projections"].items() if fused_members(p)})


def model_card(manifest: dict, repo_id: str, variant: str, variants: list[str], base_model: str | None = None,
               numeric=None) -> str:
    """The README.md of a bundle repo: hub metadata first, then what each variant is and how to run it.
    `numeric`: the `NumericReport` of the check that passed on the publishing machine."""
    import yaml

    source = manifest["source"]
    base_model = base_model or source.get("repo_id")
    quantized = any(Storage.of(p).quantized for p in manifest["projections"].values())
    meta = {
        "library_name": "mlx",
        "pipeline_tag": "text-generation",
        "tags": ["mlx", "mlx-prepared", "gemma3n"] + [f"target-{v}" for v in variants],
    }
    if base_model:
        # The hub lists MLX/GGUF-style re-encodings of a base model under its quantizations;
        # prepared bundles (same weights, another layout, maybe fewer bits) are that relation.
        meta["base_model"] = base_model
        meta["base_model_relation"] = "quantized"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    lines.append(f"# {repo_id.split('/')[-1]}")
    lines.append("")
    lines.append(
        "Gemma3n text decoder prepared by mlx-prepared for Apple MLX: each folder "
        "is a complete bundle whose weights already have the layout one device class decodes fastest, "
        "so loading does no work beyond reading bytes."
    )
    lines += ["", "| variant | target | pretransposed roles | fused | dtype | quantized |",
              "| --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        if v == variant:
            roles = ", ".join(_pretransposed_roles(manifest)) or "none"
            fused = ", ".join(_fused_modules(manifest)) or "none"
            lines.append(f"| `{v}/` | {manifest['target']['name']} | {roles} | {fused} | {manifest['dtype']} | "
                         f"{'yes' if quantized else 'no'} |")
        else:
            lines.append(f"| `{v}/` | {v} | see `{v}/manifest.yaml` | | | |")
    lines += ["", f"## This upload: `{variant}/`", ""]
    profile = manifest["target"]["profile"]
    lines.append(f"- Target class: **{manifest['target']['name']}** — {profile.get('description', '')}".rstrip(" —"))
    lines.append(
        "- Layout: `pretransposed` projections are stored contiguous `[in, out]` under `*.weight_t` "
        "(MLX then runs `gemv_t`); `standard` ones keep the Hugging Face `[out, in]`. A fused module "
        "(`qkv_proj`, `gate_up_proj`; `qkv_laurel_proj`, `q_laurel_proj` add laurel's left projection) "
        "stores the projections that read the same input as one matrix, their outputs side by side "
        "(`fused` in `manifest.yaml` lists them): one GEMV instead of two to four."
    )
    if profile.get("evidence"):
        lines.append(f"- Evidence for this layout: {profile['evidence']}")
    for path, record in (manifest.get("mapped_embeddings") or {}).items():
        lines.append(f"- `{path.rsplit('.', 1)[-1]}` is placed `mapped`: stored in `{record['file']}`, which the "
                     "runtime memory-maps and reads a row per token from, so the table never enters accelerator "
                     "memory")
    if source.get("repo_id"):
        lines.append(f"- Source: `{source['repo_id']}` at revision `{source.get('revision') or 'main'}` "
                     f"(commit `{source.get('commit')}`)")
    else:
        naming = NAMINGS.get(source.get("naming"), source.get("naming"))
        lines.append(f"- Source: a local checkpoint (naming: {naming}); per-file sha256 in `manifest.yaml`")
    versions = manifest["versions"]
    lines.append(f"- Made with mlx-prepared {manifest['tool']['version']}, MLX {versions.get('mlx')}, "
                 f"Python {versions.get('python')}")
    if numeric is not None:
        lines += ["", "## Numeric check", "", *numeric.card_lines(manifest["known_answers"])]
    lines += [
        "",
        "## Run",
        "",
        "```bash",
        "pip install mlx-prepared",
        f'runtime generate {repo_id} --prompt "Why is the sky blue?"          # picks the variant for this device',
        f'runtime generate {repo_id}:{variant} --prompt "Why is the sky blue?"  # or name it',
        "```",
        "",
        "Only the chosen variant's files are downloaded; each is checked against the manifest's sha256 "
        "before the model is built.",
        "",
    ]
    return "\n".join(lines)


def _variants_in(files: list[str]) -> list[str]:
    return sorted({f.split("/")[0] for f in files if f.count("/") == 1 and f.endswith("/" + MANIFEST_NAME)})


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_VARIANT = re.compile(r"[A-Za-z0-9][\w.-]{0,63}")


def check_publish_args(repo_id, variant, base_model) -> None:
    """The names publish writes with, checked before anything is verified or sent: the hub's
    validator raised them as tracebacks, after the numeric check; a variant is one folder."""
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise HubError(f"{repo_id!r}: not a hub repo id (org/name: letters, digits, '-', '_', '.')")
    if base_model is not None and (not isinstance(base_model, str) or not _REPO_ID.fullmatch(base_model)
                                   or ".." in base_model):
        raise HubError(f"--base-model {base_model!r}: not a hub repo id (org/name)")
    if variant is not None and (not isinstance(variant, str) or not _VARIANT.fullmatch(variant) or ".." in variant):
        raise HubError(f"--variant {variant!r}: not a folder name (letters, digits, '-', '_', '.'; one level)")


def _hub_call(what: str, call, *args, **kwargs):
    """One call to the hub; whatever it raises (HTTP, offline mode, auth, validation) is one line."""
    try:
        return call(*args, **kwargs)
    except Exception as e:  # the hub raises many types: report one line, as convert does
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise HubError(f"{what} failed ({type(e).__name__}: {first})") from None


def publish_bundle(bundle: str | os.PathLike, repo_id: str, *, variant: str | None = None,
                   base_model: str | None = None, private: bool = False, revision: str | None = None,
                   token: str | None = None, api=None):
    """Verify a finished bundle, then upload it as `variant/` of `repo_id` in one commit with the card."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from runtime.numeric import passed_numeric_check
    from runtime.verify import verify_bundle

    check_publish_args(repo_id, variant, base_model)
    bundle = Path(bundle)
    try:  # a manifest its schema refuses (a ManifestError) is one line, as in `verify`
        manifest = read_bundle_manifest(bundle)
    except ManifestError as e:
        raise HubError(f"{bundle}: refusing to publish: {e}") from None
    problems = verify_bundle(bundle, manifest)
    if problems:
        raise HubError(f"{bundle}: refusing to publish, verify failed: {problems[0]}")
    try:
        report = passed_numeric_check(bundle)
    except ManifestError as e:
        raise HubError(f"{bundle}: refusing to publish: {e}") from None
    variant = variant or manifest["target"]["name"]
    api = api or HfApi(token=token)
    _hub_call(f"{repo_id}: creating the repo", api.create_repo, repo_id, private=private, exist_ok=True)
    try:
        existing = api.list_repo_files(repo_id, revision=revision)
    except Exception:  # a repo created just now may have no revision yet
        existing = []
    variants = sorted(set(_variants_in(existing)) | {variant})
    card = model_card(manifest, repo_id, variant, variants, base_model=base_model, numeric=report)
    digest = [MANIFEST_DIGEST_NAME] if (bundle / MANIFEST_DIGEST_NAME).is_file() else []
    names = [MANIFEST_NAME] + digest + sorted(manifest["files"])
    ops = [CommitOperationAdd(path_in_repo=f"{variant}/{name}", path_or_fileobj=str(bundle / name)) for name in names]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    message = (f"Add {variant} bundle ({manifest['target']['name']}, {manifest['dtype']}) "
               f"made by mlx-prepared {manifest['tool']['version']}")
    return _hub_call(f"{repo_id}: uploading {variant}/", api.create_commit, repo_id, operations=ops,
                     commit_message=message, revision=revision)


@click.command("publish")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--variant", help="Folder in the repo (default: the bundle's target name, e.g. m5).")
@click.option("--base-model", help="Hub id of the original model, for the card (default: the bundle's hub source).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Branch to commit to (default: main).")
def publish_command(bundle, repo_id, variant, base_model, private, revision):
    """Verify BUNDLE (files, then its known answers on this machine: `verify --numeric`), then
    upload it to REPO_ID as one variant folder with a model card.

    One repo per model, one folder per device class: `runtime generate REPO_ID` later downloads
    only the variant for the device it runs on.
    """
    check_publish_args(repo_id, variant, base_model)
    if not (Path(bundle) / MANIFEST_NAME).is_file():
        raise HubError(f"{bundle}: not a bundle (no {MANIFEST_NAME})")
    info = publish_bundle(bundle, repo_id, variant=variant, base_model=base_model, private=private, revision=revision)
    url = getattr(info, "commit_url", None) or repo_id
    click.echo(f"published {bundle} to {url}")
