"""Medians of alternating A/B rounds written by `lab/gpu_run.sh ab-quick` (bench_ab_<name>_<round>.json and
bench_ab_this_<round>.json): per row, this tree's and each variant's median time, variant / this, and both
ratios to FlashMLA (timed in the same processes).

    python3 lab/ab_summary.py OUT_DIR
"""

from __future__ import annotations

import glob
import json
import os
import re
import statistics
import sys


def main() -> None:
    out = sys.argv[1]
    runs: dict[str, list[list[dict]]] = {}
    for f in sorted(glob.glob(os.path.join(out, "bench_ab_*_*.json"))):
        name = re.match(r"bench_ab_(.+)_\d+\.json", os.path.basename(f)).group(1)
        runs.setdefault(name, []).append(json.load(open(f))["rows"])
    base = runs.pop("this")

    def med(rounds, i, impl):
        vals = [r[i][impl]["us"] for r in rounds if "us" in r[i].get(impl, {})]
        return statistics.median(vals) if vals else float("nan")

    for name, var in runs.items():
        print(f"{name}: {len(var)} rounds against this tree's {len(base)}")
        print(f"{'row':<18}{'this us':>9}{'var us':>9}{'var/this':>9}{'FM/this':>9}{'FM/var':>8}")
        for i, row in enumerate(base[0]):
            key = f"{row['b']},{row['s_q']},{row['h_q']},{row['s_k']}{'v' if row['varlen'] else ''}"
            b, v = med(base, i, "flashmla_ops"), med(var, i, "flashmla_ops")
            fb, fv = med(base, i, "FlashMLA"), med(var, i, "FlashMLA")
            print(f"{key:<18}{b:9.1f}{v:9.1f}{v / b:9.3f}{fb / b:9.3f}{fv / v:8.3f}")


if __name__ == "__main__":
    main()
