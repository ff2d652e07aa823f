"""Helpers the benchmark scripts share: timing a child process, medians, tables, machine facts.

Standard library only, so every script imports it on a bare benchmark machine.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass
class ChildRun:
    wall_s: float       # start to exit
    synced_s: float     # start to exit plus `sync`: the bytes are on disk
    max_rss_bytes: int  # the child's peak resident set (counts touched pages of mmapped files)
    returncode: int
    stderr: str
    stdout: str = ""
    cpu_s: float = 0.0  # user + system CPU time of the child (what a loaded machine distorts least)
    loadavg: float = 0.0  # the machine's 1-minute load average when the child started


def run_child(argv: list[str], *, sync: bool = True, env: dict | None = None,
              capture_stdout: bool = False) -> ChildRun:
    """Run `argv`, timing it; peak RSS from `os.wait4`, i.e. of that child alone."""
    if sync:
        os.sync()  # the previous run's dirty pages are not this run's cost
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out if capture_stdout else subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # not proc.wait(): wait4 reports the child's rusage
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if sync:
            os.sync()
        synced = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    rss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return ChildRun(wall, synced, rss, proc.returncode, stderr, stdout, usage.ru_utime + usage.ru_stime, load)


def json_child(script: str, args: list[str]) -> tuple[dict, ChildRun]:
    """Run `script worker ARGS` in a child and return the JSON object its last stdout line holds
    (and the run); a failing worker ends the benchmark with its stderr's tail."""
    run = run_child([sys.executable, str(Path(script).resolve()), "worker", *args], sync=False, capture_stdout=True)
    if run.returncode != 0:
        raise SystemExit(f"worker {' '.join(args)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    import json

    return json.loads(run.stdout.strip().splitlines()[-1]), run


# MLX's CUDA graph settings (benchmarks/bench_graphs.py): a worker reports what it ran with.
# MLX_USE_CUDA_GRAPHS=0: no CUDA graphs at all, each kernel launched on the stream as it is encoded
CUDA_GRAPH_VARS = ("MLX_MAX_OPS_PER_BUFFER", "MLX_CUDA_GRAPH_CACHE_SIZE", "MLX_USE_CUDA_GRAPHS")


def graph_env() -> dict:
    """The CUDA graph settings in this process's environment now (None: MLX's default)."""
    return {k: os.environ.get(k) for k in CUDA_GRAPH_VARS}


def common_prefix(a: list, b: list) -> int:
    """How many leading greedy ids two runs share (random weights in bf16 make near-ties: a
    mismatch late is rounding, a mismatch at 0 the prefill's argmax)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def table(header: list[str], rows: list[list], aligns: str | None = None) -> str:
    """A Markdown table (prints fine on a terminal, pastes into docs/BENCHMARKS.md)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    aligns = aligns or "l" + "r" * (len(header) - 1)

    def line(r):
        padded = (c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, aligns, strict=True))
        return "| " + " | ".join(padded) + " |"

    rules = ("-" * (w - 1) + (":" if a == "r" else "-") for w, a in zip(widths, aligns, strict=True))
    sep = "| " + " | ".join(rules) + " |"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _fmt(c) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        return f"{c:.3g}" if abs(c) < 10 else f"{c:.1f}"
    return str(c)


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


# A checkout without git (a copy of the working tree on a GPU machine) is told its commit here.
COMMIT_VAR = "BENCH_COMMIT"
ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def code_commit() -> str:
    """The commit the benchmark's code is at: $BENCH_COMMIT if set, else `git rev-parse HEAD`
    (with "-dirty" when tracked files differ from it), else "unknown". A figure without the
    code it measured cannot be compared with a later one."""
    given = os.environ.get(COMMIT_VAR, "").strip()
    if given:
        return given
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


_DEVICE_PROBE = ("import json, mlx.core as mx; "
                 "print(json.dumps({'default_device': str(mx.default_device()), **mx.device_info()}, default=str))")


@functools.cache
def device_facts() -> dict:
    """What MLX computes on: its default device and `mx.device_info()` (on CUDA the GPU's name and
    architecture, on a CPU the processor), plus the NVIDIA driver where `nvidia-smi` answers.
    Asked in a child process unless MLX is already imported here, so a benchmark's parent never
    holds a GPU context beside the children it times. {"device": "unknown"} when MLX is missing."""
    facts: dict = {}
    try:
        if "mlx.core" in sys.modules:
            mx = sys.modules["mlx.core"]
            facts = json.loads(json.dumps({"default_device": str(mx.default_device()), **mx.device_info()},
                                          default=str))
        else:
            run = subprocess.run([sys.executable, "-c", _DEVICE_PROBE], capture_output=True, text=True, timeout=120)
            if run.returncode == 0 and run.stdout.strip():
                facts = json.loads(run.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, AttributeError):
        facts = {}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if smi.returncode == 0 and smi.stdout.strip():
            facts["nvidia_smi"] = smi.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return facts or {"device": "unknown"}


def machine_facts() -> dict:
    """Machine, device, versions, commit and date, for the header of every result (and its JSON)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 0
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": code_commit(),
        "device": device_facts(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "mlx_prepared": _version("mlx-prepared"),
        "loadavg": os.getloadavg(),
    }


def print_facts(facts: dict, file=sys.stdout) -> None:
    print(" ".join(f"{k}={v}" for k, v in facts.items()), file=file)
