"""GEMV layout table: standard (`x @ W.T`, W [out, in]) vs pretransposed (`x @ Wt`, Wt [in, out])
per projection role and dtype, at the real E2B/E4B shapes, on the current MLX device.

    python3 benchmarks/bench_gemv.py [--dtype bfloat16 --dtype float32] [--role mlp.gate_proj ...]
                                     [--config CONFIG_OR_BUNDLE] [--repeats 5] [--profile-out FILE]

The measurement is `runtime calibrate`'s (runtime/calibrate.py: cache-busting weight copies,
many GEMVs per evaluated graph, warm-up, medians); this script prints it as a Markdown table
with bandwidths, for docs/BENCHMARKS.md, and can keep the profile it implies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


from common import machine_facts, print_facts, table  # noqa: E402
from runtime.calibrate import (  # noqa: E402
    CALIBRATED_ROLES,
    DEFAULT_CONFIGS,
    Settings,
    calibrate,
    merge_shapes,
    profile_text,
    read_text_config,
    role_shapes,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", action="append", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--role", action="append", choices=CALIBRATED_ROLES)
    p.add_argument("--config", default=None, help="config.json, checkpoint or bundle (default: E2B and E4B)")
    p.add_argument("--repeats", type=int, default=Settings.repeats)
    p.add_argument("--cache-mb", type=int, default=Settings.cache_bytes >> 20)
    p.add_argument("--profile-out", default=None, help="also write the implied target profile here")
    a = p.parse_args(argv)

    if a.config:
        text, source, _ = read_text_config(a.config)
        shapes = role_shapes(text)
    else:
        source, shapes = ", ".join(DEFAULT_CONFIGS), merge_shapes(DEFAULT_CONFIGS.values())
    if a.role:
        shapes = {r: s for r, s in shapes.items() if r in a.role}
    print_facts(machine_facts())  # its device: MLX's default device and mx.device_info()
    settings = Settings(repeats=a.repeats, cache_bytes=a.cache_mb << 20, graph_bytes=2 * (a.cache_mb << 20))
    profile = calibrate(shapes, a.dtype or ["bfloat16", "float32"], settings=settings, source=source,
                        progress=lambda line: print(line, file=sys.stderr, flush=True))
    rows = []
    for role, per_dtype in profile["measurements"].items():
        for dtype, measured in per_dtype.items():
            for m in measured:
                rows.append([role, dtype, "x".join(map(str, m["shape"])), m["standard_us"], m["pretransposed_us"],
                             m["standard_gb_s"], m["pretransposed_gb_s"], m["speedup"],
                             profile["layouts"][role][dtype]])
    print()
    print(table(["role", "dtype", "shape [out, in]", "standard us", "pretransposed us", "standard GB/s",
                 "pretransposed GB/s", "standard / pretransposed", "calibrate picks"], rows, "lllrrrrrl"))
    if a.profile_out:
        Path(a.profile_out).write_text(profile_text(profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
