"""Known answers: what a bundle's forward pass must give on a fixed prompt, recorded at convert time.

`convert` (convert/reference.py, an independent float32 numpy forward pass over the stored
tensors) writes them into the manifest's optional `known_answers` section; `runtime verify
--numeric` (runtime/numeric.py) runs the same prompt on the device at hand and compares. Both
halves import this module, so the summary of a layer's hidden state is computed one way only,
and the section is checked against the model's config once, where the runtime reads it.

The section:

    known_answers:
      reference: {name: numpy-float32, numpy: 2.2.6, seconds: 11.4}
      prompt: [2, 1734, ...]          # token ids, fed from position 0
      positions: [8, 9, 10, 11]       # positions whose logits are recorded (ascending, the last ones)
      logits:                         # per recorded position: the top-k ids and their logits
        - {position: 8, ids: [...], values: [...]}
      coordinates: [0, 293, ...]      # hidden coordinates read at the last position
      hidden:                         # `checksum` of the AltUp planes: entering layer 0, after each layer
        input: {mean: .., rms: .., planes_rms: [..], values: [..]}
        layers: [{...}, ...]          # one per decoder layer
      tolerance: {activations: bfloat16, logits: 0.5, hidden: 0.05, values: 2.0}

`tolerance.logits` bounds |runtime - reference| of each recorded logit (absolute: logits are
soft-capped); `tolerance.hidden` bounds the difference of each aggregate (mean, RMS, planes'
RMS) and `tolerance.values` of each single value, divided by the reference's RMS (the active
plane's, or for `planes_rms` the plane's own). A float32 bundle also records `tolerance.tf32`
(the same three) for devices whose float32 matmuls run in TF32 (MLX's default on CUDA and on
M5-class GPUs). Why these numbers: convert/reference.py.
"""

from __future__ import annotations

import math

import numpy as np

from manifests.format import ManifestError

SECTION = "known_answers"
TOLERANCES = ("logits", "hidden", "values")
MAX_PROMPT = 1024  # tokens; convert records 12 (convert/reference.py PROMPT_LENGTH)


def checksum(planes: np.ndarray, active: int, coordinates: list[int]) -> dict:
    """Summary of AltUp planes `[n, positions, hidden]` (float32): the active plane's mean and RMS
    over every position, each plane's RMS, and the active plane's values at `coordinates` of the
    last position. Small enough for the manifest, and a wrong layer moves all of it."""
    planes = np.asarray(planes, dtype=np.float32)
    x = planes[active].astype(np.float64)
    return {
        "mean": float(x.mean()),
        "rms": float(np.sqrt((x * x).mean())),
        "planes_rms": [float(np.sqrt((p.astype(np.float64) ** 2).mean())) for p in planes],
        "values": [float(v) for v in planes[active, -1, coordinates]],
    }


def checksum_errors(got: dict, want: dict, coordinates: list[int]) -> dict[str, tuple[float, str]]:
    """The worst difference between two checksums, and what it is, relative to the reference's
    scale: `hidden` over the aggregates (mean, RMS, planes' RMS), `values` over the single
    coordinates, which low precision moves far more than the aggregates. NaN counts as worst."""
    scale = max(want["rms"], 1e-30)
    aggregates = [(abs(got["mean"] - want["mean"]) / scale, "mean of the active plane"),
                  (abs(got["rms"] - want["rms"]) / scale, "RMS of the active plane")]
    aggregates += [(abs(g - w) / max(w, 1e-30), f"RMS of plane {i}")
                   for i, (g, w) in enumerate(zip(got["planes_rms"], want["planes_rms"], strict=True))]
    values = [(abs(g - w) / scale, f"value at coordinate {c}")
              for c, g, w in zip(coordinates, got["values"], want["values"], strict=True)]
    worst = lambda parts: max(parts, key=lambda p: (bool(np.isnan(p[0])), p[0]))  # noqa: E731
    return {"hidden": worst(aggregates), "values": worst(values)}


def check_section(section: dict, text_config: dict, where: str) -> None:
    """The section's values against the model it claims to describe (the schema checked their
    types): ids inside the vocabulary, positions inside the prompt, one checksum per layer, one
    value per coordinate, positive tolerances. A ManifestError (one line) names what is wrong."""
    at = f"{where}: {SECTION}"
    vocab, hidden = int(text_config["vocab_size"]), int(text_config["hidden_size"])
    layers = int(text_config["num_hidden_layers"])
    prompt, positions = section["prompt"], section["positions"]
    if len(prompt) > MAX_PROMPT:  # 200,000 tokens crashed `verify --numeric` (a segfault), 20,000 ran for minutes
        raise ManifestError(f"{at}.prompt: {len(prompt)} tokens; at most {MAX_PROMPT}")
    if not prompt or any(not 0 <= i < vocab for i in prompt):
        raise ManifestError(f"{at}.prompt: needs token ids in [0, {vocab})")
    if not positions or positions != sorted(set(positions)) or positions[0] < 1 or positions[-1] != len(prompt) - 1:
        raise ManifestError(f"{at}.positions: {positions} must ascend, start after position 0 and end at the "
                            f"prompt's last position ({len(prompt) - 1})")
    if [e["position"] for e in section["logits"]] != positions:
        raise ManifestError(f"{at}.logits: one entry per position of {positions}, in order")
    for e in section["logits"]:
        if not e["ids"] or len(e["ids"]) != len(e["values"]) or any(not 0 <= i < vocab for i in e["ids"]):
            raise ManifestError(f"{at}.logits: position {e['position']}: ids in [0, {vocab}) with one value each")
    coords = section["coordinates"]
    if any(not 0 <= c < hidden for c in coords):
        raise ManifestError(f"{at}.coordinates: need coordinates in [0, {hidden})")
    if len(section["hidden"]["layers"]) != layers:
        raise ManifestError(f"{at}.hidden.layers: {len(section['hidden']['layers'])} entries for {layers} layers")
    n = int(text_config.get("altup_num_inputs", 4))
    for i, entry in enumerate([section["hidden"]["input"], *section["hidden"]["layers"]]):
        if len(entry["values"]) != len(coords) or len(entry["planes_rms"]) != n:
            name = "input" if i == 0 else f"layers[{i - 1}]"
            raise ManifestError(f"{at}.hidden.{name}: needs {len(coords)} values and {n} planes_rms")
    numbers = [x for e in section["logits"] for x in e["values"]]
    for entry in [section["hidden"]["input"], *section["hidden"]["layers"]]:
        numbers += [entry["mean"], entry["rms"], *entry["planes_rms"], *entry["values"]]
    if not all(math.isfinite(x) for x in numbers):
        raise ManifestError(f"{at}: holds a NaN or infinite value")
    tolerance = section["tolerance"]
    for t in (tolerance, tolerance.get("tf32") or tolerance):
        if not all(math.isfinite(t[k]) and t[k] > 0 for k in TOLERANCES):
            raise ManifestError(f"{at}.tolerance: {', '.join(TOLERANCES)} must be positive")


__all__ = ["SECTION", "TOLERANCES", "checksum", "checksum_errors", "check_section"]
