"""The per-layer embedding table placed resident vs mapped, side by side on the same weights.

    # two (or more) bundles of one source, differing in `convert --ple`: each in fresh children, alternating
    python3 benchmarks/bench_ple.py decode RESIDENT MAPPED [--rounds 3] [--prompt 64] [--tokens 64] [--json F]
    # the resident twin of a mapped bundle: the same files (hard links), the table loaded as a shard
    python3 benchmarks/bench_ple.py twin MAPPED OUT
    # the token embedding gathered as rows of [vocab, hidden] vs columns of the head's [hidden, vocab]
    python3 benchmarks/bench_ple.py head [--size e2b] [--dtype float32 --dtype bfloat16]

`decode`, per bundle and child process (one model in memory at a time; the bundles' order rotates
from round to round): load time; time to first token (prompt submitted to first token out of
`runtime.generate.generate_step`, the product's decode loop: prefill, sampling and the first step
queued), for the first generation of the process ("first": cold rows of a mapped table, and on
CUDA MLX's kernel compilation) and the median of the warm ones; decode tok/s (tokens after the
first over their time, compiled decode step); peak accelerator memory (`mx.get_peak_memory()`
over load and generation), the weights' share of it (`mx.get_active_memory()` after load), and
the process's peak resident set (`os.wait4`; it counts the pages of a mapped table the process
touched). A mapped table's file is dropped from the page cache before each child, so its rows
are read from disk as first used and the resident set shows only what was touched. For mapped
bundles the host gather is timed inside the child: the wait for the token (the previous step's
device time, not a cost) apart from the gather proper (numpy rows -> one MLX array).

The table's bytes are in accelerator memory only when resident; the goals (E2B 4-bit at most
1.6 GB, E4B 4-bit at most 3.0 GB peak; mapped decode at least 0.9x resident) are checked at the
end, with the peak split into weights and working set where a goal is missed.

`twin`: one conversion (`--ple mapped`) serves both placements, byte for byte: the twin hard-links
every file of the mapped bundle (no disk used) and lists the table's file in its index as one more
shard, its record under `embeddings`, so the runtime loads the table into accelerator memory like
any weight, exactly as a `--ple resident` bundle (whose table shares a shard with other tensors)
does. `verify` passes on it.

`head`: `m5` bundles read the token embedding from the pretransposed LM head (`lm_head.weight_t`,
[hidden, vocab]) instead of storing the table twice; this times that column gather against the
row gather from a [vocab, hidden] table at the real shapes, for one token (decode) and a
prompt's worth (prefill), on this device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from common import dir_bytes, json_child, machine_facts, median, print_facts, table  # noqa: E402

GOALS_GB = {("E2B", True): 1.6, ("E4B", True): 3.0}  # peak accelerator memory of 4-bit bundles, mapped
DECODE_GOAL = 0.9  # mapped decode at least this fraction of resident


# --- in the child ------------------------------------------------------------------------------

def bundle_facts(path: str) -> dict:
    """Size, quantization and placement of a bundle, from its manifest."""
    import yaml

    manifest = yaml.safe_load(Path(path, "manifest.yaml").read_text())
    text = manifest["model"]["text_config"]
    size = {30: "E2B", 35: "E4B"}.get(int(text["num_hidden_layers"]), f"{text['num_hidden_layers']} layers")
    mapped = manifest.get("mapped_embeddings") or {}
    quantized = any(r.get("quantized") for r in manifest["projections"].values())
    return {"size": size, "quantized": quantized, "placement": "mapped" if mapped else "resident",
            "mapped_files": sorted({r["file"] for r in mapped.values()}),
            "vocab": min(int(text["vocab_size"]), int(text.get("vocab_size_per_layer_input", text["vocab_size"]))),
            "dtype": next(iter(manifest["embeddings"].values()))["dtype"]}


def instrument(table) -> dict:
    """Time a MappedTable's gathers: the wait for the ids (evaluating them) apart from the rest."""
    import mlx.core as mx
    import numpy as np

    stats = {"wait_s": [], "gather_s": [], "rows": []}
    real = type(table).gather

    def gather(ids):
        t0 = time.perf_counter()
        if isinstance(ids, mx.array):
            mx.eval(ids)
        t1 = time.perf_counter()
        out = real(table, np.asarray(ids))
        t2 = time.perf_counter()
        stats["wait_s"].append(t1 - t0)
        stats["gather_s"].append(t2 - t1)
        stats["rows"].append(out.shape[0])
        return out

    table.gather = gather  # this instance only
    return stats


def instrument_step() -> dict:
    """Time the host's share of each compiled decode step: the step call (the compiled graph's
    replay, with a mapped table's gather and its wait inside) and `mx.async_eval` (the graph's
    dispatch). With a resident table both overlap the previous step; with a mapped one they come
    after it, so they are what mapped decoding adds to a step where they do not hide behind the
    device (benchmark only: the product's functions are wrapped in this child)."""
    import mlx.core as mx

    from runtime import fast

    stats = {"call_s": [], "async_eval_s": []}
    call, async_eval = fast.CompiledDecoder.__call__, mx.async_eval

    def timed_call(self, token):
        t0 = time.perf_counter()
        out = call(self, token)
        stats["call_s"].append(time.perf_counter() - t0)
        return out

    def timed_async_eval(*args):
        t0 = time.perf_counter()
        async_eval(*args)
        stats["async_eval_s"].append(time.perf_counter() - t0)

    fast.CompiledDecoder.__call__ = timed_call
    mx.async_eval = timed_async_eval
    return stats


def worker_decode(path: str, prompt_len: int, tokens: int, reps: int, warmup: int, seed: int) -> dict:
    import mlx.core as mx
    import numpy as np

    from runtime.generate import generate_step
    from runtime.loader import load_model
    from runtime.mapped import MappedTable
    from runtime.sampling import Sampler

    facts = bundle_facts(path)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a target mismatch is expected for a bundle made for another device
        model = load_model(path)
    load_s = time.perf_counter() - t0
    weights_bytes = mx.get_active_memory()
    ple = model.model.language_model.embed_tokens_per_layer
    stats = instrument(ple) if isinstance(ple, MappedTable) else None
    steps = instrument_step()
    prompt = np.random.default_rng(seed).integers(3, facts["vocab"], prompt_len).tolist()
    ttft, decode_tps, ids = [], [], None
    for r in range(warmup + reps):
        for v in [*(stats or {}).values(), *steps.values()]:
            v.clear()
        out, t0 = [], time.perf_counter()
        first = None
        for token, _ in generate_step(prompt, model, sampler=Sampler(), max_tokens=tokens):
            out.append(token)
            if first is None:
                first = time.perf_counter()
        done = time.perf_counter()
        ttft.append(first - t0)
        decode_tps.append((len(out) - 1) / (done - first))
        ids = out
        if r == 0:
            first_ttft = first - t0
    result = {"load_s": load_s, "ttft_first_s": first_ttft, "ttft_s": ttft[warmup:], "decode_tps": decode_tps[warmup:],
              "ids": ids, "mlx_peak_bytes": mx.get_peak_memory(), "weights_bytes": weights_bytes,
              "device": str(mx.default_device()), **facts,
              # the last generation's decode steps: the step call (a mapped table's wait and gather inside)
              # and the dispatch of its graph, per token
              "step_call_us": median(t * 1e6 for t in steps["call_s"]),
              "async_eval_us": median(t * 1e6 for t in steps["async_eval_s"][1:])}
    if stats:  # the last generation's decode gathers (one row each; the first gather is the prompt's)
        one = [i for i, n in enumerate(stats["rows"]) if n == 1]
        result.update(gather_us=median(stats["gather_s"][i] * 1e6 for i in one),
                      gather_p90_us=float(np.percentile([stats["gather_s"][i] * 1e6 for i in one], 90)),
                      wait_us=median(stats["wait_s"][i] * 1e6 for i in one),
                      prompt_gather_us=stats["gather_s"][0] * 1e6 if stats["rows"] else float("nan"),
                      table_resident_bytes=ple.resident_pages(), table_bytes=ple.nbytes)
        result["replay_us"] = result["step_call_us"] - result["wait_us"] - result["gather_us"]
    return result


def worker_head(size: str, dtypes: list[str], counts: list[int], repeats: int) -> dict:
    """Row gather from [vocab, hidden] vs column gather from [hidden, vocab] (the m5 head), times in us."""
    import mlx.core as mx
    import numpy as np

    from manifests.gemma3n import published_text_config

    c = published_text_config(size.upper())
    vocab, hidden = c["vocab_size"], c["hidden_size"]
    out = {}
    for dtype in dtypes:
        rows = mx.random.normal((vocab, hidden)).astype(getattr(mx, dtype))
        mx.eval(rows)
        cols = mx.contiguous(rows.T)
        mx.eval(cols)
        for n in counts:
            ids = mx.array(np.random.default_rng(n).integers(0, vocab, n), dtype=mx.int32)
            ways = {"row": lambda: rows[ids] * 2.0,  # then scaled, as the model does: the result is used
                    "column": lambda: mx.take(cols, ids, axis=1).T * 2.0}
            samples = {k: [] for k in ways}
            for r in range(repeats + 1):
                for name, way in (ways.items() if r % 2 == 0 else reversed(ways.items())):
                    y = way()
                    t0 = time.perf_counter()
                    mx.eval(y)
                    if r:
                        samples[name].append(time.perf_counter() - t0)
            same = mx.array_equal(ways["row"](), ways["column"]()).item()
            out[f"{dtype} {n}"] = {k: median(v) * 1e6 for k, v in samples.items()} | {"same": same}
        del rows, cols
        mx.clear_cache()
    return {"results": out, "device": str(mx.default_device()), "shape": [vocab, hidden]}


# --- in the parent -----------------------------------------------------------------------------

def drop_from_page_cache(path: Path) -> None:
    """Evict a file's pages, so a mapped table's rows are read from disk as first used."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(args: list[str]) -> tuple[dict, object]:
    return json_child(__file__, args)


def goal_lines(results: dict, labels: list[str]) -> list[str]:
    """Each goal of the placement, met or not, and why not."""
    lines = []
    resident = {(r["size"], r["quantized"], r["dtype"]): r for r in results.values() if r["placement"] == "resident"}
    for label in labels:
        r = results[label]
        if r["placement"] != "mapped":
            continue
        peak = r["mlx_peak_bytes"] / 1e9
        goal = GOALS_GB.get((r["size"], r["quantized"]))
        if goal is not None:
            verdict = "met" if peak <= goal else (
                f"NOT met: weights in accelerator memory {r['weights_bytes'] / 1e9:.2f} GB, working set "
                f"(KV cache, activations, MLX's buffer cache) {peak - r['weights_bytes'] / 1e9:.2f} GB")
            lines.append(f"{label}: peak accelerator memory {peak:.2f} GB, goal <= {goal} GB: {verdict}")
        base = resident.get((r["size"], r["quantized"], r["dtype"]))
        if base is not None:
            ratio = median(r["decode_tps"]) / median(base["decode_tps"])
            gather = r.get("gather_us", float("nan"))
            step_us = 1e6 / median(r["decode_tps"])
            verdict = "met" if ratio >= DECODE_GOAL else (
                f"NOT met: a mapped step waits for the previous token before its row can be gathered, so the "
                f"device idles for the tail of the previous step plus the gather ({gather:.0f} us of a {step_us:.0f} "
                f"us step) instead of running the next step built ahead")
            lines.append(f"{label}: decode {ratio:.2f}x resident, goal >= {DECODE_GOAL}x: {verdict}")
    return lines


def bench_decode(a) -> None:
    bundles = [str(Path(b).resolve()) for b in a.bundles]
    labels = [f"{Path(b).name}" for b in bundles]
    print(f"prompt {a.prompt} tokens, decode {a.tokens} tokens, {a.reps} reps after {a.warmup} warm-up per process, "
          f"{a.rounds} rounds, order rotating", flush=True)
    results: dict[str, dict] = {}
    for r in range(a.rounds):
        k = r % len(bundles)
        for label, path in (list(zip(labels, bundles))[k:] + list(zip(labels, bundles))[:k]):
            facts = bundle_facts(path)
            for name in facts["mapped_files"]:
                drop_from_page_cache(Path(path) / name)
            res, run = child(["decode", path, "--prompt", str(a.prompt), "--tokens", str(a.tokens),
                              "--reps", str(a.reps), "--warmup", str(a.warmup), "--seed", str(a.seed)])
            agg = results.setdefault(label, {**res, "decode_tps": [], "ttft_s": [], "ttft_first_s": [], "load_s": [],
                                             "max_rss_bytes": [], "gather_us": [], "path": path})
            agg["decode_tps"] += res["decode_tps"]
            agg["ttft_s"] += res["ttft_s"]
            agg["ttft_first_s"].append(res["ttft_first_s"])
            agg["load_s"].append(res["load_s"])
            agg["max_rss_bytes"].append(run.max_rss_bytes)
            if "gather_us" in res:
                agg["gather_us"].append(res["gather_us"])
            for key in ("mlx_peak_bytes", "weights_bytes", "ids", "table_resident_bytes", "wait_us", "gather_p90_us",
                        "prompt_gather_us", "step_call_us", "async_eval_us", "replay_us"):
                if key in res:
                    agg[key] = res[key]
            extra = f"  gather {res['gather_us']:.1f} us/token" if "gather_us" in res else ""
            print(f"round {r + 1} {label:28s} decode {median(res['decode_tps']):8.2f} tok/s  ttft "
                  f"{median(res['ttft_s']) * 1e3:8.1f} ms  peak {res['mlx_peak_bytes'] / 1e9:5.2f} GB  rss "
                  f"{run.max_rss_bytes / 1e9:5.2f} GB{extra}", flush=True)
    for agg in results.values():
        agg["gather_us"] = median(agg["gather_us"]) if agg["gather_us"] else float("nan")
    first = results[labels[0]]
    rows = []
    for label in labels:
        x = results[label]
        base = next((y for y in results.values() if y["placement"] == "resident" and y["dtype"] == x["dtype"]
                     and y["quantized"] == x["quantized"]), None)
        d = median(x["decode_tps"])
        rows.append([label, x["placement"], dir_bytes(Path(x["path"]), "*.safetensors") / 1e9,
                     x["mlx_peak_bytes"] / 1e9, x["weights_bytes"] / 1e9, max(x["max_rss_bytes"]) / 1e9,
                     median(x["load_s"]), median(x["ttft_first_s"]) * 1e3, median(x["ttft_s"]) * 1e3, d,
                     d / median(base["decode_tps"]) if base else float("nan"), x["gather_us"],
                     (x.get("table_resident_bytes") or 0) / 1e6 if x["placement"] == "mapped" else float("nan"),
                     "yes" if x["ids"] == first["ids"] else "no"])
    print()
    print(f"device: {first.get('device')}")
    print(table(["bundle", "placement", "files GB", "peak accel. GB", "weights in accel. GB", "peak RSS GB", "load s",
                 "TTFT first ms", "TTFT warm ms", "decode tok/s", "x resident", "gather us/token",
                 "table pages touched MB", "same ids as first"], rows, "llrrrrrrrrrrrl"))
    print()
    print("Host work per decode step (the last generation's medians): with the table mapped it follows the "
          "wait for the previous token instead of overlapping the previous step")
    print(table(["bundle", "placement", "step call us", "of which replay us", "async_eval us", "gather us",
                 "gather p90 us"],
                [[label, results[label]["placement"], results[label].get("step_call_us", float("nan")),
                  results[label].get("replay_us", float("nan")), results[label].get("async_eval_us", float("nan")),
                  results[label]["gather_us"], results[label].get("gather_p90_us", float("nan"))] for label in labels],
                "llrrrrr"))
    print()
    for line in goal_lines(results, labels):
        print(line)
    if a.json:
        Path(a.json).write_text(json.dumps({"facts": machine_facts(), "results": results}, indent=2))


def make_twin(mapped: Path, out: Path) -> None:
    """The resident twin of a mapped bundle (see the module docstring)."""
    import hashlib
    import shutil

    from manifests import read_manifest, write_manifest
    from manifests.format import INDEX_NAME, MANIFEST_DIGEST_NAME, MANIFEST_NAME
    from manifests.manifest import needed_version
    from manifests.safetensors_header import read_header_file

    manifest = read_manifest(mapped)
    tables = manifest.pop("mapped_embeddings", None) or {}
    if not tables:
        raise SystemExit(f"{mapped}: no mapped table (convert it with --ple mapped)")
    out.mkdir(parents=True)
    for f in mapped.iterdir():
        if f.name not in (MANIFEST_NAME, MANIFEST_DIGEST_NAME, INDEX_NAME):
            try:
                os.link(f, out / f.name)
            except OSError:
                shutil.copy2(f, out / f.name)
    index = {"metadata": {}, "weight_map": {}}
    if (mapped / INDEX_NAME).exists():
        index = json.loads((mapped / INDEX_NAME).read_text())
    else:  # one shard: the index the twin now needs lists it too
        index["weight_map"] = {e.name: "model.safetensors" for e in read_header_file(mapped / "model.safetensors")[0]}
    for path, record in tables.items():
        file = record.pop("file")
        manifest["embeddings"][path] = record
        index["weight_map"].update({e.name: file for e in read_header_file(mapped / file)[0]})
    text = (json.dumps(index, indent=2) + "\n").encode()
    (out / INDEX_NAME).write_bytes(text)
    manifest["files"][INDEX_NAME] = {"sha256": hashlib.sha256(text).hexdigest(), "bytes": len(text)}
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest["format_version"] = needed_version(manifest)
    write_manifest(manifest, out)


def bench_head(a) -> None:
    res, _ = child(["head", "--size", a.size, *sum((["--dtype", d] for d in a.dtype), []),
                    *sum((["--count", str(n)] for n in a.count), []), "--repeats", str(a.repeats)])
    rows = [[k.split()[0], int(k.split()[1]), v["row"], v["column"], v["column"] - v["row"],
             (v["column"] - v["row"]) / int(k.split()[1]), "yes" if v["same"] else "no"]
            for k, v in res["results"].items()]
    print(f"device: {res['device']}  table {res['shape']} (rows) / {res['shape'][::-1]} (the head's columns)")
    print(table(["dtype", "tokens", "row gather us", "column gather us", "extra us", "extra us/token", "same values"],
                rows, "lrrrrrl"))
    if a.json:
        Path(a.json).write_text(json.dumps({"facts": machine_facts(), **res}, indent=2))


def decode_options(parser) -> None:
    """What a decode run takes, in the parent and in its children alike."""
    for name, default in (("prompt", 64), ("tokens", 64), ("reps", 2), ("warmup", 1), ("seed", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)


def head_options(parser) -> None:
    parser.add_argument("--size", default="e2b", choices=["e2b", "e4b"])
    parser.add_argument("--dtype", action="append", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--count", action="append", type=int, default=None, help="tokens gathered at once (repeatable)")
    parser.add_argument("--repeats", type=int, default=15)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pd = sub.add_parser("decode", help="bundles differing in placement: memory, TTFT, decode tok/s")
    pd.add_argument("bundles", nargs="+")
    decode_options(pd)
    pd.add_argument("--rounds", type=int, default=2)
    pd.add_argument("--json", default=None)
    pt = sub.add_parser("twin", help="the resident twin of a mapped bundle (hard links)")
    pt.add_argument("mapped")
    pt.add_argument("out")
    ph = sub.add_parser("head", help="row gather vs the m5 head's column gather")
    head_options(ph)
    ph.add_argument("--json", default=None)
    pw = sub.add_parser("worker", help=argparse.SUPPRESS)
    pw.add_argument("what", choices=["decode", "head"])
    pw.add_argument("path", nargs="?")
    decode_options(pw)
    head_options(pw)
    a = p.parse_args(argv)
    if a.cmd == "worker":
        if a.what == "decode":
            out = worker_decode(a.path, a.prompt, a.tokens, a.reps, a.warmup, a.seed)
        else:
            out = worker_head(a.size, a.dtype or ["float32", "bfloat16"], a.count or [1, 64, 512], a.repeats)
        print(json.dumps(out))
        return 0
    if a.cmd == "twin":
        make_twin(Path(a.mapped), Path(a.out))
        return 0
    if a.cmd == "head":
        a.dtype, a.count = a.dtype or ["float32", "bfloat16"], a.count or [1, 64, 512]
    print_facts(machine_facts())
    bench_decode(a) if a.cmd == "decode" else bench_head(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
