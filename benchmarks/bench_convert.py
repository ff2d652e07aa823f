"""Conversion cost: our `convert` (m5, generic) next to `mlx_lm.convert` and a plain copy.

    python3 benchmarks/bench_convert.py ~/bench-data/e2b-bf16 --work ~/bench-data/tmp --runs 3

Each tool runs as its own child process on the same source, in a rotating order per run, with
the source read into the page cache just before (untimed: a tool writing through the page cache
evicts part of the source for the next one); its output is deleted before the next.
Per tool: wall time to exit, wall time including `sync` (our converter fsyncs every file it
writes, the peers do not: `+sync` puts all on the same footing: bytes on disk), GB/s of source
safetensors bytes over the synced time, and the child's peak RSS from `os.wait4`.

CPU s is the child's user + system time (`os.wait4`): on a shared machine the wall time depends
on what else runs (the load average is printed per run), the CPU time much less; what the
converter can save shows there first.

`--baseline DIR` also times the converter of another commit, extracted into DIR (for example
`git archive REV convert manifests | tar -x -C DIR`), as `convert m5 @baseline` and
`convert generic @baseline`, so a change is measured against its parent in the same run.

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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import dir_bytes, machine_facts, median, print_facts, run_child, table  # noqa: E402

TOOLS = {
    "convert m5": lambda src, out: [sys.executable, "-m", "convert", "--target", "m5", "--quiet", src, out],
    "convert generic": lambda src, out: [sys.executable, "-m", "convert", "--target", "generic", "--quiet", src, out],
    # m5 with the tied embedding stored as it is, not transposed into the head: what that
    # transpose costs (not a target).
    "convert m5 head standard": lambda src, out: [
        sys.executable, "-m", "convert", "--target-profile", str(HERE / "profiles" / "m5-head-standard.yaml"),
        "--quiet", src, out],
    "mlx_lm.convert": lambda src, out: [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", src,
                                        "--mlx-path", out, "--dtype", "bfloat16"],
    "cp -r": lambda src, out: ["cp", "-r", src, out],
}
# The converter of another commit, imported from the directory `--baseline` names.
_FROM = "import sys; sys.path.insert(0, sys.argv.pop(1)); from convert.cli import main; main(prog_name='convert')"


def baseline_tools(directory: str) -> dict:
    return {f"convert {t} @baseline": (lambda src, out, t=t: [sys.executable, "-c", _FROM, directory, "--target", t,
                                                              "--quiet", src, out])
            for t in ("m5", "generic")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="checkpoint directory (benchmarks/make_checkpoint.py writes one)")
    p.add_argument("--work", default=None, help="where outputs go (deleted after each run); default: beside SOURCE")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tools", default=None,
                   help=f"comma-separated subset of: {', '.join(TOOLS)} (and the @baseline tools)")
    p.add_argument("--json", default=None, help="also write every run's figures here")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="a directory holding another commit's convert/ and manifests/ packages, timed too")
    a = p.parse_args(argv)
    known = dict(TOOLS)
    if a.baseline:
        if not (Path(a.baseline) / "convert" / "cli.py").is_file():
            print(f"--baseline {a.baseline}: no convert/cli.py there", file=sys.stderr)
            return 2
        known.update(baseline_tools(str(Path(a.baseline).resolve())))

    src = Path(a.source).resolve()
    work = Path(a.work or src.parent / (src.name + "-bench-out")).resolve()
    tools = [t.strip() for t in (a.tools or ",".join(known)).split(",") if t.strip()]
    unknown = [t for t in tools if t not in known]
    if unknown:
        print(f"unknown tools: {', '.join(unknown)} (known: {', '.join(known)})", file=sys.stderr)
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

    warm = ["cat", *map(str, sorted(src.glob("*.safetensors")))]
    runs: dict[str, list] = {t: [] for t in tools}
    for r in range(a.runs):
        order = tools[r % len(tools):] + tools[: r % len(tools)]
        for tool in order:
            out = work / "out"
            if out.exists():
                shutil.rmtree(out)
            # Every tool starts with the source in the page cache (read just before, untimed): a tool
            # that writes through the page cache evicts part of it for whichever tool comes next.
            run_child(warm, sync=False)
            child = run_child(known[tool](str(src), str(out)))
            out_bytes = dir_bytes(out, "*.safetensors") if out.exists() else 0
            if child.returncode != 0:
                print(f"{tool}: exit {child.returncode}: {child.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            runs[tool].append({"wall_s": child.wall_s, "synced_s": child.synced_s, "cpu_s": child.cpu_s,
                               "max_rss_bytes": child.max_rss_bytes, "out_bytes": out_bytes,
                               "returncode": child.returncode, "loadavg": child.loadavg})
            print(f"run {r + 1} {tool:24s} wall {child.wall_s:7.1f} s  +sync {child.synced_s:7.1f} s  "
                  f"CPU {child.cpu_s:6.1f} s  peak RSS {child.max_rss_bytes / 1e9:6.2f} GB  "
                  f"out {out_bytes / 1e9:6.2f} GB  load {child.loadavg:4.1f}", flush=True)
            if out.exists():
                shutil.rmtree(out)

    def ok(tool):
        return [x for x in runs.get(tool, []) if x["returncode"] == 0]

    copy = median(x["synced_s"] for x in ok("cp -r")) if ok("cp -r") else float("nan")
    peer = median(x["wall_s"] for x in ok("mlx_lm.convert")) if ok("mlx_lm.convert") else float("nan")
    rows = []
    for tool in tools:
        done = ok(tool)
        if not done:
            continue
        wall, synced = median(x["wall_s"] for x in done), median(x["synced_s"] for x in done)
        rows.append([tool, len(done), wall, synced, median(x["cpu_s"] for x in done), src_bytes / 1e9 / synced,
                     median(x["max_rss_bytes"] for x in done) / 1e9, max(x["max_rss_bytes"] for x in done) / 1e9,
                     median(x["out_bytes"] for x in done) / 1e9, synced / copy, wall / peer])
    print()
    print(table(["tool", "runs", "wall s", "+sync s", "CPU s", "GB/s", "peak RSS GB (median)", "peak RSS GB (max)",
                 "out GB", "x cp", "wall x mlx_lm.convert"], rows))
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
