"""Conversion cost: our `convert` (m5, generic) next to `mlx_lm.convert` and a plain copy.

    python3 benchmarks/bench_convert.py ~/bench-data/e2b-bf16 --work ~/bench-data/tmp --runs 3

Each tool runs as its own child process on the same source, in a rotating order per run (so
no tool always comes first after the page cache changed); its output is deleted before the next.
Per tool: wall time to exit, wall time including `sync` (our converter fsyncs every file it
writes, the peers do not: `+sync` puts all on the same footing: bytes on disk), GB/s of source
safetensors bytes over the synced time, and the child's peak RSS from `os.wait4`.

Peak RSS counts the touched pages of memory-mapped files (docs/GEMMA3N.md, pitfalls): a tool that
mmaps the source (mlx_lm via `mx.load`, `cp` does not) shows them as resident although the
kernel can drop them at will. Our converter reads with `pread` into reused buffers, so its
figure is its real footprint.

Needs only the standard library here; the tools it runs need their own packages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import dir_bytes, machine_facts, median, print_facts, run_child, table  # noqa: E402

TOOLS = {
    "convert m5": lambda src, out: [sys.executable, "-m", "convert", "--target", "m5", "--quiet", src, out],
    "convert generic": lambda src, out: [sys.executable, "-m", "convert", "--target", "generic", "--quiet", src, out],
    "mlx_lm.convert": lambda src, out: [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", src,
                                        "--mlx-path", out, "--dtype", "bfloat16"],
    "cp -r": lambda src, out: ["cp", "-r", src, out],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="checkpoint directory (benchmarks/make_checkpoint.py writes one)")
    p.add_argument("--work", default=None, help="where outputs go (deleted after each run); default: beside SOURCE")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of: {', '.join(TOOLS)}")
    p.add_argument("--json", default=None, help="also write every run's figures here")
    a = p.parse_args(argv)

    src = Path(a.source).resolve()
    work = Path(a.work or src.parent / (src.name + "-bench-out")).resolve()
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        print(f"unknown tools: {', '.join(unknown)} (known: {', '.join(TOOLS)})", file=sys.stderr)
        return 2
    if not (src / "config.json").is_file():
        print(f"{src}: no config.json", file=sys.stderr)
        return 2
    src_bytes = dir_bytes(src, "*.safetensors")
    work.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    print_facts(facts)
    print(f"source {src}: {src_bytes / 1e9:.2f} GB of safetensors; {a.runs} runs; order rotates per run",
          flush=True)

    # Bring the source into the page cache once, so the first tool is not the only one to read
    # from disk (whether it stays cached depends on free memory: see the doc).
    run_child(["cat", *map(str, sorted(src.glob("*.safetensors")))], sync=False)

    runs: dict[str, list] = {t: [] for t in tools}
    for r in range(a.runs):
        order = tools[r % len(tools):] + tools[: r % len(tools)]
        for tool in order:
            out = work / "out"
            if out.exists():
                shutil.rmtree(out)
            child = run_child(TOOLS[tool](str(src), str(out)))
            out_bytes = dir_bytes(out, "*.safetensors") if out.exists() else 0
            if child.returncode != 0:
                print(f"{tool}: exit {child.returncode}: {child.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            runs[tool].append({"wall_s": child.wall_s, "synced_s": child.synced_s,
                               "max_rss_bytes": child.max_rss_bytes, "out_bytes": out_bytes,
                               "returncode": child.returncode})
            print(f"run {r + 1} {tool:16s} wall {child.wall_s:7.1f} s  +sync {child.synced_s:7.1f} s  "
                  f"peak RSS {child.max_rss_bytes / 1e9:6.2f} GB  out {out_bytes / 1e9:6.2f} GB", flush=True)
            if out.exists():
                shutil.rmtree(out)

    copy = median(x["synced_s"] for x in runs.get("cp -r", [])) if "cp -r" in runs else float("nan")
    rows = []
    for tool in tools:
        ok = [x for x in runs[tool] if x["returncode"] == 0]
        synced = median(x["synced_s"] for x in ok)
        rows.append([tool, len(ok), median(x["wall_s"] for x in ok), synced, src_bytes / 1e9 / synced,
                     median(x["max_rss_bytes"] for x in ok) / 1e9,
                     max((x["max_rss_bytes"] for x in ok), default=0) / 1e9,
                     median(x["out_bytes"] for x in ok) / 1e9, synced / copy])
    print()
    print(table(["tool", "runs", "wall s", "+sync s", "GB/s", "peak RSS GB (median)", "peak RSS GB (max)",
                 "out GB", "x cp"], rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"facts": facts, "source": str(src), "source_bytes": src_bytes,
                                            "runs": runs}, indent=2))
    try:
        work.rmdir()  # only if this script left it empty
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
