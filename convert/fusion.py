"""`fuse: [qkv, gate_up]` in a target profile: q/k/v and gate/up stored as one projection each
(`qkv_laurel` / `q_laurel`: laurel's left projection joins q/k/v / q, manifests/format.py).

Decode at batch 1 on a big GPU is bound by kernel launches, not bytes: q, k and v (and gate and
up) read the same input, so one GEMV over their concatenated rows does the work of three (two)
for the same bytes. The concatenation is made here, once, offline; the runtime splits the output.

This runs on a finished plan (planning.py, step 4), after every tensor has its items and every
projection its record. For each layer and each group the profile asks for, the members' items
are merged into one item per stored tensor (`.weight`, or `.weight_t`; `.scales` and `.biases` of
a quantized group), made of the members' source tensors in order (`Item.members`), and the
members' records into one fused record (manifests/format.py FUSED_GROUPS). The writer streams
the members one after another into the fused tensor:

- standard: rows concatenated, so the fused bytes are the members' bytes back to back;
- pretransposed `[in, out]`: columns concatenated, each band of output rows is filled member by
  member (the transpose is still written in order and never held whole);
- quantized (`--quantize`): MLX quantizes per group of `group_size` along a row, so quantizing the
  concatenated rows equals concatenating the members' quantized rows; the writer quantizes
  member by member into the same packed tensor and scale/bias spills;
- MLX-quantized source: packed weights, scales and biases are copied byte for byte, member after
  member, only when every member has the same bits, group size and mode.

A group whose members disagree (layout from the profile, dtype, quantization, a bias) stays
unfused, and the plan says why; nothing is mixed silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from convert.items import Item
from convert.safetensors_io import TensorInfo
from manifests.format import FUSED_GROUPS, FUSED_ROLES, PREFIX, fused_groups_in
from manifests.records import PROJECTIONS, Storage, Tensor


def _why_not(paths: list[str], records: list[dict], items: dict[str, Item]) -> str | None:
    """Why these member records cannot be stored as one tensor, or None if they can."""
    short = [p.rsplit(".", 1)[-1] for p in paths]

    def differ(what: str, values: list) -> str | None:
        if any(v != values[0] for v in values):
            return f"members' {what} differ (" + ", ".join(f"{s} {v}" for s, v in zip(short, values, strict=True)) + ")"
        return None

    if any(r.get("bias") for r in records):
        return "a member has a bias"
    layouts = [r["layout"] for r in records]
    reason = (differ("layouts", layouts) or differ("dtypes", [r["dtype"] for r in records])
              or differ("quantizations", [r.get("quantized") for r in records]))
    if reason:
        return reason
    reason = differ("input dims", [r["source_shape"][1] for r in records])
    if reason:
        return reason
    for tensors in zip(*(PROJECTIONS.stored(r) for r in records), strict=True):  # the same tensor of every member
        suffix = "." + tensors[0].part
        parts = [items.get(t.key) for t in tensors]
        if any(it is None or it.members for it in parts):
            return f"a member's {suffix} is not a single planned tensor"
        reason = (differ(f"{suffix} transforms", [it.transform for it in parts])
                  or differ(f"{suffix} source dtypes", [it.source.dtype for it in parts])
                  or differ(f"{suffix} written dtypes", [it.dtype for it in parts]))
        if reason:
            return reason
    return None


def merge_items(tensor: Tensor, parts: list[Item]) -> Item:
    """The item writing `tensor` (a fused record's) from `parts`' sources stacked along the rows,
    in this order."""
    first = parts[0]
    src = first.source
    rows = sum(p.source.shape[0] for p in parts)
    stacked = TensorInfo(" + ".join(p.source.name for p in parts), src.dtype, (rows, *src.shape[1:]), src.offset,
                         sum(p.source.nbytes for p in parts))
    return replace(first, key=tensor.key, source=stacked, shape=tensor.shape,
                   members=tuple((p.file, p.source) for p in parts))


def fused_record(name: str, fused_path: str, paths: list[str], records: list[dict]) -> dict:
    """The record of the members' rows stored as one matrix at `fused_path`, as they are stored."""
    first = records[0]
    storage = Storage.of(first)
    out_dims = sum(r["source_shape"][0] for r in records)
    weight = PROJECTIONS.expected(fused_path, storage, out_dims, storage.dims(first["shape"])[1])[0]
    return {
        "role": FUSED_ROLES[name], "layout": storage.layout, "key": weight.key,
        "source_key": first["source_key"],
        "shape": list(weight.shape),
        "source_shape": [out_dims, first["source_shape"][1]],
        "dtype": first["dtype"], "bias": None, "quantized": first.get("quantized"),
        "fused": [{"path": p, "out": r["source_shape"][0], "source_key": r["source_key"],
                   "source_shape": list(r["source_shape"])} for p, r in zip(paths, records, strict=True)],
    }


def fuse(items: list[Item], projections: dict[str, dict], roles: Counter, groups: tuple[str, ...],
         kv_shared: list[bool]) -> tuple[list[Item], dict[str, dict], Counter, Counter]:
    """(items, projections, fused groups per name, unfused groups per reason) after fusing
    `groups` in every layer they apply in (`kv_shared`: per layer, whether it is KV-shared; qkv
    and qkv_laurel not there, having no k/v; q_laurel only there: manifests/format.py)."""
    by_key = {it.key: it for it in items}
    done: Counter = Counter()
    left: Counter = Counter()
    merged: dict[str, Item] = {}  # key of the last member's item -> the merged item in its place
    dropped_items: set[str] = set()
    dropped_paths: set[str] = set()
    renamed: dict[str, tuple[str, dict]] = {}  # first member path -> (fused path, record)
    for layer, shared in enumerate(kv_shared):
        for name in groups:
            if name not in fused_groups_in(shared):
                continue
            module, members = FUSED_GROUPS[name]
            base = f"{PREFIX}layers.{layer}."
            paths = [base + m for m in members]
            records = [projections[p] for p in paths]
            reason = _why_not(paths, records, by_key)
            if reason:
                left[f"{name}: {reason}"] += 1
                continue
            fused_path = base + module
            record = fused_record(name, fused_path, paths, records)
            members = zip(*(PROJECTIONS.stored(r) for r in records), strict=True)
            for tensor, tensors in zip(PROJECTIONS.stored(record), members, strict=True):
                parts = [by_key[t.key] for t in tensors]
                merged[parts[-1].key] = merge_items(tensor, parts)
                dropped_items.update(p.key for p in parts[:-1])
            renamed[paths[0]] = (fused_path, record)
            dropped_paths.update(paths[1:])
            for r in records:
                roles[r["role"], r["layout"]] -= 1
            roles[record["role"], record["layout"]] += 1
            done[name] += 1
    new_items = [merged.get(it.key, it) for it in items if it.key not in dropped_items]
    new_projections = {}
    for path, record in projections.items():
        if path in renamed:
            fused_path, fused = renamed[path]
            new_projections[fused_path] = fused
        elif path not in dropped_paths:
            new_projections[path] = record
    for key in [k for k, n in roles.items() if n <= 0]:
        del roles[key]
    return new_items, new_projections, done, left
