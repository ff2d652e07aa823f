"""Known answers: what the reference costs, and how far the runtime lands from it.

    python benchmarks/bench_known_answers.py cost SOURCE --work DIR [--target cuda] [--quantize 4] [--keep B]
    python benchmarks/bench_known_answers.py diffs BUNDLE [BUNDLE ...]
    python benchmarks/bench_known_answers.py matrix --work DIR

`cost`: converts SOURCE twice in child processes, without and with `--known-answers` (the
known answers computed on the bundle just written, in the same process), and prints the wall
time, CPU time (user + system: what a loaded machine distorts least) and peak RSS of each, and
the difference and its share of the plain conversion. Each output is deleted after it is
measured (`--keep B` moves the one with known answers to B instead).

`diffs`: for each bundle (which must hold known answers), runs the prompt through the runtime
here, eager and compiled, and prints the raw differences from the recorded answers (largest
|logit difference| over the recorded top-k, largest hidden checksum difference as a fraction of
the reference's RMS, and where) with no tolerance applied: the numbers the tolerances in
convert/reference.py are derived from. Loads each bundle whole (its size in memory).

`matrix`: the tiny-model grid behind those tolerances: random checkpoints (several seeds, with
the tame norm scales of benchmarks/make_checkpoint.py and with norm scales drawn around 1) and
the trained demo (examples/zen-gemma3n), each converted to float32,
bfloat16 and float16, fused and not, and 4- and 8-bit with float32 and bfloat16 scales, then
`diffs` on each; prints the largest difference per activation dtype.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine_facts, print_facts, run_child, table  # noqa: E402


def cost(a) -> int:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "convert", "--target", a.target, "--quiet"]
    if a.quantize:
        base += ["--quantize", a.quantize]
    base += ["--dtype", a.dtype]
    rows = []
    for label, extra in (("convert", []), ("convert --known-answers", ["--known-answers"])):
        out = work / "bundle"
        shutil.rmtree(out, ignore_errors=True)
        run = run_child(base + extra + [a.source, str(out)])
        if run.returncode:
            print(run.stderr, file=sys.stderr)
            return 1
        seconds = None
        if extra:
            manifest = (out / "manifest.yaml").read_text()
            import yaml

            seconds = yaml.safe_load(manifest)["known_answers"]["reference"]["seconds"]
        rows.append([label, f"{run.wall_s:.1f}", f"{run.synced_s:.1f}", f"{run.cpu_s:.1f}",
                     f"{run.max_rss_bytes / 1e9:.2f}", "" if seconds is None else f"{seconds:.1f}"])
        if extra and a.keep:
            shutil.rmtree(a.keep, ignore_errors=True)
            shutil.move(str(out), a.keep)
        shutil.rmtree(out, ignore_errors=True)
    plain, with_answers = float(rows[0][2]), float(rows[1][2])
    cpu_plain, cpu_with = float(rows[0][3]), float(rows[1][3])
    print_facts(machine_facts())
    print(f"source {a.source}, target {a.target}, --dtype {a.dtype}" + (f", --quantize {a.quantize}" if a.quantize else ""))
    print(table(["run", "wall s", "wall+sync s", "CPU s", "peak RSS GB", "reference s (in manifest)"], rows))
    print(f"known answers add {with_answers - plain:.1f} s wall ({100 * (with_answers - plain) / plain:.0f} % of the "
          f"conversion), {cpu_with - cpu_plain:.1f} s CPU ({100 * (cpu_with - cpu_plain) / cpu_plain:.0f} %)")
    return 0


def diffs_of(bundle: Path) -> dict:
    """Raw runtime-vs-reference differences of one bundle, eager and compiled."""
    import numpy as np

    from manifests import read_manifest
    from manifests.known_answers import checksum_errors
    import warnings

    from runtime.loader import TargetMismatchWarning, load_model
    from runtime.numeric import compiled_run, eager_run, known_answers_of, stage_name

    section = known_answers_of(bundle, read_manifest(bundle))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetMismatchWarning)
        model = load_model(bundle)
    out = {"bundle": str(bundle), "activations": section["tolerance"]["activations"],
           "quantized": any(r["quantized"] for r in model.manifest["projections"].values())}
    recorded = {-1: section["hidden"]["input"], **dict(enumerate(section["hidden"]["layers"]))}
    for name, run in (("eager", eager_run(model, section, "eager")), ("compiled", compiled_run(model, section, "compiled"))):
        logits = max(float(np.abs(row[e["ids"]].astype(np.float64) - e["values"]).max())
                     for row, e in zip(run.logits, section["logits"]))
        out[f"{name}_logits"] = logits
        if run.stages:
            errors = {s: checksum_errors(run.stages[s], recorded[s], section["coordinates"]) for s in recorded}
            for kind in ("hidden", "values"):
                worst = max(errors, key=lambda s: errors[s][kind][0])
                out[kind] = errors[worst][kind][0]
                out[f"{kind}_where"] = f"{stage_name(worst)}: {errors[worst][kind][1]}"
    return out


def tf32(x):
    """float32 rounded to TF32 (10 mantissa bits, to nearest even), as tensor cores read it."""
    import numpy as np

    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x0FFF) + ((bits >> 13) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return rounded.view(np.float32)


def tf32_diffs(bundle: Path) -> dict:
    """The reference with every matmul's inputs rounded to TF32 (the weights, the activations,
    attention's operands) against its own exact answers: what a device whose float32 matmuls run
    in TF32 shows, measured without one."""
    from unittest import mock

    import numpy as np

    from convert import reference
    from convert.reference import Forward, StoredTensors
    from manifests import read_manifest
    from manifests.known_answers import checksum, checksum_errors
    from runtime.numeric import known_answers_of

    manifest = read_manifest(bundle)
    section = known_answers_of(bundle, manifest)
    weight = StoredTensors.weight

    def rounded_attention(q, k, v, window):
        t, heads, d = q.shape
        group, out = heads // k.shape[1], np.empty_like(q)
        pos = np.arange(t)
        allowed = (pos[None, :] <= pos[:, None]) & ((pos[None, :] > pos[:, None] - window) if window else True)
        for h in range(heads):
            scores = np.where(allowed, tf32(q[:, h]) @ tf32(k[:, h // group]).T, -np.inf)
            w = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[:, h] = tf32(w / w.sum(axis=-1, keepdims=True)) @ tf32(v[:, h // group])
        return out.reshape(t, heads * d)

    stages = {}
    project = Forward.project
    with mock.patch.object(StoredTensors, "weight", lambda self, path, rows=None: tf32(weight(self, path, rows))), \
            mock.patch.object(Forward, "project", lambda self, x, path: project(self, tf32(x), path)), \
            mock.patch.object(reference, "attention", rounded_attention):
        store = StoredTensors(bundle, manifest)
        forward = Forward(store, manifest["model"]["text_config"])
        logits = forward(np.array(section["prompt"]), section["positions"],
                         lambda i, p: stages.__setitem__(i, checksum(p, forward.arch.active, section["coordinates"])))
        store.close()
    recorded = {-1: section["hidden"]["input"], **dict(enumerate(section["hidden"]["layers"]))}
    errors = [checksum_errors(stages[i], recorded[i], section["coordinates"]) for i in recorded]
    logit_diff = max(float(np.abs(row[e["ids"]].astype(np.float64) - e["values"]).max())
                     for row, e in zip(logits, section["logits"]))
    return {"bundle": str(bundle), "activations": "float32 (TF32 emulated)", "eager_logits": logit_diff,
            "compiled_logits": float("nan"), "hidden": max(e["hidden"][0] for e in errors),
            "values": max(e["values"][0] for e in errors), "hidden_where": "", "values_where": ""}


def diffs(a) -> int:
    for bundle in a.bundles:
        print(json.dumps(diffs_of(Path(bundle))), flush=True)
    return 0


VARIANTS = {  # name -> convert options
    "f32": ["--target", "generic", "--dtype", "float32"],
    "f32-fused": ["--target", "cuda", "--dtype", "float32"],
    "bf16": ["--target", "generic", "--dtype", "bfloat16"],
    "bf16-fused": ["--target", "cuda", "--dtype", "bfloat16"],
    "f16": ["--target", "generic", "--dtype", "float16"],
    "q4-f32": ["--target", "cuda", "--dtype", "float32", "--quantize", "4"],
    "q4-bf16": ["--target", "cuda", "--dtype", "bfloat16", "--quantize", "4"],
    "q8-bf16": ["--target", "generic", "--dtype", "bfloat16", "--quantize", "8", "--group-size", "32"],
    "q4-f16": ["--target", "generic", "--dtype", "float16", "--quantize", "4", "--group-size", "32"],
}


def matrix(a) -> int:
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sources = {"demo (trained)": ROOT / "examples" / "zen-gemma3n"}
    for seed in range(a.seeds):
        for norms in ("tame", "random-norms"):
            src = work / f"{norms}-{seed}"
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_checkpoint.py"), "--size", "tiny",
                            "--dtype", "float32", "--seed", str(seed), "--quiet", str(src)]
                           + (["--random-norms"] if norms != "tame" else []), check=True)
            sources[f"random {norms} seed {seed}"] = src
    results = []
    for label, src in sources.items():
        for variant, options in VARIANTS.items():
            out = work / f"{src.name}-{variant}"
            subprocess.run([sys.executable, "-m", "convert", *options, "--known-answers", "--quiet", str(src), str(out)],
                           check=True, cwd=ROOT)
            measured = [diffs_of(out)]
            if variant.startswith(("f32", "q4-f32")):
                measured.append(tf32_diffs(out))
            for d in measured:
                d.update(source=label, variant=variant, quantized=variant.startswith("q"))
                results.append(d)
                print(json.dumps(d), flush=True)
    print_facts(machine_facts())
    rows = []
    kind = lambda r: r["source"].rsplit(" seed", 1)[0]  # noqa: E731
    for key in sorted({(r["activations"], r["quantized"], kind(r)) for r in results}):
        group = [r for r in results if (r["activations"], r["quantized"], kind(r)) == key]
        rows.append([key[0], "yes" if key[1] else "no", key[2], len(group),
                     f"{max(r['eager_logits'] for r in group):.2g}", f"{max(r['compiled_logits'] for r in group):.2g}",
                     f"{max(r['hidden'] for r in group):.2g}", f"{max(r['values'] for r in group):.2g}"])
    print(table(["activations", "quantized", "model", "bundles", "eager logits", "compiled logits",
                 "hidden aggregates (of RMS)", "values (of RMS)"], rows))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cost")
    c.add_argument("source")
    c.add_argument("--work", required=True)
    c.add_argument("--target", default="cuda")
    c.add_argument("--quantize", choices=["4", "8"])
    c.add_argument("--dtype", choices=["keep", "bfloat16", "float16", "float32"], default="keep")
    c.add_argument("--keep", metavar="DIR", help="keep the bundle with known answers there (for `diffs`)")
    d = sub.add_parser("diffs")
    d.add_argument("bundles", nargs="+")
    m = sub.add_parser("matrix")
    m.add_argument("--work", required=True)
    m.add_argument("--seeds", type=int, default=4)
    a = p.parse_args(argv)
    return {"cost": cost, "diffs": diffs, "matrix": matrix}[a.mode](a)


if __name__ == "__main__":
    sys.exit(main())
