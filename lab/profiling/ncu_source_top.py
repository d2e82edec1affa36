"""Summarise ncu's per-instruction source page
(CSV from `ncu -i REP --page source --csv --print-source sass`).

Prints the column names, the instructions with the most warp-stall samples (with their SASS), and the samples
summed by opcode, so the instructions the warps wait at can be compared between builds (benchmarks/NOTES.md,
"Where the warps wait", after v11.0). Usage: python3 lab/profiling/ncu_source_top.py SOURCE.csv [--top 30]
"""

import argparse
import csv
import re
import sys
from collections import Counter


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv_path")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    with open(args.csv_path, newline="") as f:
        lines = f.readlines()
    # ncu puts a "Kernel Name" line before the table; the table starts at the "Address" header.
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"Address"')), None)
    if start is None:
        sys.exit("no instruction table in " + args.csv_path)
    rows = list(csv.DictReader(lines[start:]))
    cols = list(rows[0].keys())
    key = "Warp Stall Sampling (All Samples)"
    if key not in cols:
        sys.exit(f"no {key!r} column; columns: {cols}")
    reasons = [c for c in cols if c.startswith("stall_") and "(" not in c]
    total = sum(number(r[key]) for r in rows) or 1.0
    print(f"{args.csv_path}: {total:.0f} warp-stall samples over {len(rows)} instructions")
    by_reason = Counter({c[6:]: sum(number(r[c]) for r in rows) for c in reasons})
    print("by reason: " + ", ".join(f"{k} {100 * n / total:.1f} %" for k, n in by_reason.most_common(10)))
    by_op = Counter()
    for r in rows:
        m = re.match(r"\s*(@!?U?P\w+\s+)?([A-Z0-9_.]+)", r["Source"])
        by_op[m.group(2).split(".")[0] if m else "?"] += number(r[key])
    print("by opcode: " + ", ".join(f"{op} {100 * n / total:.1f} %" for op, n in by_op.most_common(12)))
    print("top instructions (share of samples, index in the kernel, SASS, main reasons):")
    index = {id(r): i for i, r in enumerate(rows)}
    for r in sorted(rows, key=lambda r: -number(r[key]))[: args.top]:
        n = number(r[key]) or 1.0
        top = sorted(((number(r[c]), c[6:]) for c in reasons), reverse=True)[:3]
        why = " ".join(f"{k} {100 * v / n:.0f}%" for v, k in top if v > 0)
        sass = r["Source"].strip()[:70]
        print(f"  {100 * number(r[key]) / total:5.1f} %  #{index[id(r)]:<5} {sass:<70}  {why}")


if __name__ == "__main__":
    main()
