"""`runtime verify --numeric BUNDLE`: does this device compute what the bundle's weights compute?

Plain `verify` proves the bytes are the converted ones; it cannot see a device, a kernel or an
MLX build that computes something else from them (a race in a quantized matmul, a fused kernel
that is wrong for one shape). The bundle's known answers (manifests/known_answers.py), computed
at convert time by an independent float32 reference over the stored weights, can: this runs
their prompt here and compares.

Four runs (by default): the eager forward (a prefill, as generation does) twice, with each
layer's AltUp planes captured (`LanguageModel.layer_hook`); then the compiled decode twice (an
eager prefill up to the first recorded position, then one compiled step per recorded position;
only logits, so the compiled graph is the one generation runs). Each first run is compared with
the recorded answers within the recorded tolerance, and every later run with its first, bit for
bit: the same input must give the same output on one device. The report names the first layer that
diverges, by how much and in what.
"""

from __future__ import annotations

import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import numpy as np

from manifests import MANIFEST_NAME, ManifestError
from manifests.known_answers import SECTION, TOLERANCES, check_section, checksum, checksum_errors
from runtime.bundle import BundleError, read_bundle_manifest
from runtime.loader import TargetMismatchWarning, load_model


class NoKnownAnswers(BundleError):
    """The bundle records no known answers (the message says how to add them)."""


@dataclass
class Run:
    """What one run computed: logits `[positions, vocab]` and, for eager runs, each stage's checksum."""

    name: str
    logits: np.ndarray
    stages: dict[int, dict] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class NumericReport:
    """The outcome of `verify_numeric`; `passed` only if every check passed. `str()` is the report."""

    bundle: str
    device: str
    mlx: str
    tolerance: dict
    checks: list[Check]
    seconds: float
    load_seconds: float
    peak_memory: int  # bytes, MLX's allocator (device memory on a GPU)
    peak_rss: int  # bytes, this process
    date: str

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if not c.passed), None)

    def lines(self) -> list[str]:
        t = self.tolerance
        out = [f"numeric check of {self.bundle} on {self.device}, MLX {self.mlx}",
               f"tolerance ({t['activations']} activations): logits {t['logits']:g}; hidden aggregates "
               f"{t['hidden']:g} and values {t['values']:g} of RMS"]
        width = max(len(c.name) for c in self.checks)
        out += [f"  {c.name:<{width}}  {'pass' if c.passed else 'FAIL'}  {c.detail}" for c in self.checks]
        memory = f"peak memory {_size(self.peak_memory)} (MLX), {_size(self.peak_rss)} (process)"
        timing = f"{self.seconds:.1f} s (load {self.load_seconds:.1f} s)"
        if self.passed:
            out.append(f"ok: numeric check passed in {timing}; {memory}")
        else:
            failed = self.first_failure
            out.append(f"FAIL: numeric check failed ({failed.name}: {failed.detail}) in {timing}; {memory}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def card_lines(self, section: dict) -> list[str]:
        """The model card's account of a passed check: what was compared, where and when."""
        t = self.tolerance
        runs = len(self.checks) // 2  # per path
        return [
            f"`runtime verify --numeric` passed on **{self.device}** with MLX {self.mlx} on {self.date}: the "
            f"bundle's known answers (an independent float32 reference's top-{len(section['logits'][0]['ids'])} "
            f"logits at {len(section['positions'])} positions of a {len(section['prompt'])}-token prompt and a "
            f"checksum of every layer's hidden state, recorded when it was converted) were reproduced by the eager "
            f"and the compiled decoder, {'twice' if runs == 2 else f'{runs} times'} each, within tolerance "
            f"({t['activations']} activations: logits "
            f"±{t['logits']:g}) and bit for bit from run to run.",
            "Check a download on your own device with `runtime verify --numeric FOLDER`.",
        ]


def device_description() -> str:
    """`gpu (NVIDIA H100 80GB HBM3, sm_90)`: where the check ran, for the report and the model card."""
    info = mx.device_info()
    kind = str(mx.default_device().type).rsplit(".", 1)[-1]
    return f"{kind} ({info.get('device_name') or '?'}, {info.get('architecture', '?')})"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def tolerance_here(section: dict) -> dict:
    """The recorded tolerance that applies on this device: a float32 bundle's `tf32` one where
    float32 matmuls run in TF32 (MLX's default on GPUs, unless MLX_ENABLE_TF32=0)."""
    tolerance = section["tolerance"]
    tf32 = tolerance.get("tf32")
    if tf32 and mx.default_device().type == mx.gpu and os.environ.get("MLX_ENABLE_TF32", "1") != "0":
        return {"activations": "float32 (TF32 matmuls)", **tf32}
    return {k: tolerance[k] for k in ("activations", *TOLERANCES)}


def known_answers_of(path: Path, manifest: dict) -> dict:
    """The bundle's checked known answers; NoKnownAnswers or BundleError (one line) if none or bad."""
    section = manifest.get(SECTION)
    if section is None:
        raise NoKnownAnswers(f"{path}: {MANIFEST_NAME} records no known answers; add them with: "
                             f"python -m convert known-answers {path}")
    try:
        check_section(section, manifest["model"]["text_config"], str(path / MANIFEST_NAME))
    except (ManifestError, KeyError, TypeError, ValueError) as e:
        raise BundleError(str(e) if isinstance(e, ManifestError)
                          else f"{path / MANIFEST_NAME}: {SECTION}: {e}") from None
    return section


def eager_run(model, section: dict, name: str) -> Run:
    """The prompt through the eager model with a fresh cache (one prefill), every stage captured."""
    started = time.perf_counter()
    lm = model.model.language_model
    captured: dict[int, mx.array] = {}
    # the model's planes [b, t, n, hidden] -> the reference's [n, t, hidden]
    lm.layer_hook = lambda stage, planes: captured.__setitem__(stage, planes[0].swapaxes(0, 1))
    try:
        logits = model(mx.array([section["prompt"]], dtype=mx.int32), cache=model.make_cache())
    finally:
        lm.layer_hook = None
    rows = logits[0, mx.array(section["positions"])]
    mx.eval(rows, *captured.values())
    active, coords = model.config.altup_active_idx, section["coordinates"]
    stages = {i: checksum(np.array(p.astype(mx.float32)), active, coords) for i, p in captured.items()}
    return Run(name, np.array(rows.astype(mx.float32)), stages, time.perf_counter() - started)


def compiled_run(model, section: dict, name: str) -> Run:
    """An eager prefill up to the first recorded position, then each recorded position through
    the compiled decode step (runtime/fast.py), as generation decodes."""
    from runtime.fast import CompiledDecoder

    started = time.perf_counter()
    prompt, positions = section["prompt"], section["positions"]
    cache = model.make_cache()
    model(mx.array([prompt[: positions[0]]], dtype=mx.int32), cache=cache)
    decoder = CompiledDecoder(model, cache)
    rows = [decoder(mx.array([prompt[t]], dtype=mx.int32))[0] for t in positions]
    mx.eval(rows)
    return Run(name, np.stack([np.array(r.astype(mx.float32)) for r in rows]), {}, time.perf_counter() - started)


def stage_name(stage: int) -> str:
    return "the embeddings' planes (entering layer 0)" if stage == -1 else f"layer {stage}"


def compare_logits(run: Run, section: dict, tolerance: float) -> tuple[bool, str]:
    """Each recorded logit within `tolerance`, and no other id above the lowest recorded one."""
    worst, where = 0.0, ""
    for row, entry in zip(run.logits, section["logits"], strict=True):
        ids, values = np.array(entry["ids"]), np.array(entry["values"], dtype=np.float64)
        if not np.isfinite(row).all():
            return False, f"position {entry['position']}: {int(np.sum(~np.isfinite(row)))} logits are NaN or infinite"
        diff = np.abs(row[ids].astype(np.float64) - values)
        if diff.max() > worst:
            i = int(diff.argmax())
            worst, where = float(diff.max()), f"position {entry['position']}, token {int(ids[i])}"
        others = row.copy()
        others[ids] = -np.inf
        if others.max() > values.min() + tolerance:
            token = int(others.argmax())
            return False, (f"position {entry['position']}: token {token} scores {others.max():.4g}, above the "
                           f"recorded top-{len(ids)} (lowest {values.min():.4g}) by more than {tolerance:g}")
    summary = f"logits max |diff| {worst:.2g} ({where}) over {len(run.logits)} positions"
    if worst > tolerance:
        return False, summary.replace("logits max", "logits differ: max") + f", tolerance {tolerance:g}"
    return True, summary


def compare_stages(run: Run, section: dict, tolerance: dict) -> tuple[bool, str]:
    """The first stage whose checksum is off by more than the tolerance (aggregates: `hidden`,
    single values: `values`, both of the reference's RMS), or the worst one of each kind."""
    recorded = {-1: section["hidden"]["input"], **dict(enumerate(section["hidden"]["layers"]))}
    worst = {kind: (0.0, -1) for kind in ("hidden", "values")}
    for stage in sorted(recorded):
        for kind, (error, what) in checksum_errors(run.stages[stage], recorded[stage], section["coordinates"]).items():
            if not error <= tolerance[kind]:  # NaN fails too
                return False, (f"{stage_name(stage)} diverges first: {what} off by {error:.2g} of the reference's "
                               f"RMS (tolerance {tolerance[kind]:g})")
            worst[kind] = max(worst[kind], (error, stage))
    (agg, agg_at), (val, val_at) = worst["hidden"], worst["values"]
    return True, (f"{len(recorded)} stages within tolerance (worst of RMS: aggregates {agg:.2g} at "
                  f"{stage_name(agg_at)}, values {val:.2g} at {stage_name(val_at)})")


def compare_runs(second: Run, first: Run) -> tuple[bool, str]:
    """Bit for bit the same logits (and stages) as the first run."""
    for stage in sorted(first.stages):
        if first.stages[stage] != second.stages[stage]:
            return False, f"differs from {first.name} from {stage_name(stage)} on (same input, same device)"
    if not np.array_equal(first.logits, second.logits):
        diff = np.abs(first.logits.astype(np.float64) - second.logits)
        return False, f"logits differ from {first.name} by up to {np.nanmax(diff):.3g} (same input, same device)"
    return True, f"identical to {first.name}"


# Runs of each path at most: a determinism check does not need more, and a mistyped count (10**20)
# would run for ever.
MAX_RUNS = 1000


def verify_numeric(bundle: str | Path, runs: int = 2) -> NumericReport:
    """Run BUNDLE's known answers on this device (eager and compiled, `runs` times each: the
    first against the answers, the others against the first) and report.

    A bundle that cannot be checked (not a bundle, no known answers, a malformed section, a load
    that fails) raises a one-line BundleError (NoKnownAnswers when there are none)."""
    if not isinstance(runs, int) or isinstance(runs, bool) or not 2 <= runs <= MAX_RUNS:
        raise ValueError(f"runs must be an integer from 2 (the second checks the first) to {MAX_RUNS}, not {runs!r}")
    path = Path(bundle)
    started = time.perf_counter()
    manifest = read_bundle_manifest(path)
    section = known_answers_of(path, manifest)
    tolerance = tolerance_here(section)
    mx.reset_peak_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetMismatchWarning)  # the check is of this device, whatever the target
        model = load_model(path)
    load_seconds = time.perf_counter() - started
    checks = []
    for kind, run in (("eager", eager_run), ("compiled", compiled_run)):
        first = run(model, section, f"{kind} run 1")
        ok, detail = compare_logits(first, section, tolerance["logits"])
        if first.stages:
            ok_stages, stages = compare_stages(first, section, tolerance)
            ok, detail = ok and ok_stages, (stages if not ok_stages else f"{stages}; {detail}")
        checks.append(Check(first.name, ok, f"{detail} [{first.seconds:.2f} s]"))
        for i in range(2, runs + 1):
            again = run(model, section, f"{kind} run {i}")
            ok, detail = compare_runs(again, first)
            checks.append(Check(again.name, ok, f"{detail} [{again.seconds:.2f} s]"))
    return NumericReport(
        bundle=str(path), device=device_description(), mlx=metadata.version("mlx"), tolerance=tolerance,
        checks=checks, seconds=time.perf_counter() - started, load_seconds=load_seconds,
        peak_memory=mx.get_peak_memory(), peak_rss=_peak_rss(),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"))


def passed_numeric_check(bundle: str | Path) -> NumericReport:
    """`verify_numeric`'s report if the check passed; otherwise a one-line BundleError naming the
    machine and the first failed check (or why the bundle cannot be checked)."""
    report = verify_numeric(bundle)
    if not report.passed:
        failed = report.first_failure
        raise BundleError(f"the numeric check failed on this machine ({report.device}, MLX {report.mlx}): "
                          f"{failed.name}: {failed.detail}")
    return report


def numeric_command(bundle, runs: int = 2) -> int:
    """The CLI's `verify --numeric`: the report on stdout; 0 passed, 1 failed, 2 not checkable."""
    try:
        report = verify_numeric(bundle, runs)
    except (ManifestError, ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.passed else 1


__all__ = ["NoKnownAnswers", "NumericReport", "numeric_command", "passed_numeric_check", "verify_numeric"]
