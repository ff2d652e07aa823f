"""Helpers the benchmark scripts share: timing a child process, medians, tables, machine facts.

Standard library only, so every script imports it on a bare benchmark machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
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
    cpu_s: float = 0.0  # the child's user + system CPU time (from `os.wait4`): its work, whatever the load
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


# MLX's CUDA graph settings (benchmarks/bench_graphs.py): a worker reports what it ran with.
CUDA_GRAPH_VARS = ("MLX_MAX_OPS_PER_BUFFER", "MLX_CUDA_GRAPH_CACHE_SIZE")


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
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, aligns)) + " |"

    sep = "| " + " | ".join("-" * (w - 1) + (":" if a == "r" else "-") for w, a in zip(widths, aligns)) + " |"
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


def machine_facts() -> dict:
    """Machine, versions and date, for the header of every result."""
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


def peak_rss_self() -> int:
    """This process's own peak RSS in bytes (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024
