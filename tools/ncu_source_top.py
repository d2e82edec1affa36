"""Summarise ncu's per-instruction source page
(CSV from `ncu -i REP --page source --csv --print-source sass`).

Prints the column names, the instructions with the most warp-stall samples (with their SASS), and the samples
summed by opcode, so the instructions the warps wait at can be compared between builds (benchmarks/NOTES.md,
session 12). Usage: python3 tools/ncu_source_top.py SOURCE.csv [--top 30]
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
        lines = [ln for ln in f if ln.startswith('"')]  # drop ncu's banner lines
    rows = list(csv.DictReader(lines))
    if not rows:
        sys.exit("no rows in " + args.csv_path)
    cols = list(rows[0].keys())
    print("columns:", cols)
    sample_cols = [c for c in cols if "Sampling" in c or "Samples" in c]
    key = next((c for c in sample_cols if "All" in c), sample_cols[0] if sample_cols else None)
    src = next((c for c in cols if c.lower() in ("source", "sass")), cols[1])
    if key is None:
        sys.exit("no sampling column")
    total = sum(number(r[key]) for r in rows) or 1.0
    print(f"{key}: {total:.0f} samples in {len(rows)} instructions")
    by_op = Counter()
    for r in rows:
        m = re.match(r"\s*(@!?U?P\w+\s+)?([A-Z0-9_.]+)", r[src])
        by_op[m.group(2).split(".")[0] if m else "?"] += number(r[key])
    print("by opcode:")
    for op, n in by_op.most_common(15):
        print(f"  {op:<16} {100 * n / total:5.1f} %")
    print("top instructions:")
    addr = next((c for c in cols if "Address" in c), None)
    for r in sorted(rows, key=lambda r: -number(r[key]))[: args.top]:
        extra = "  ".join(f"{c.split('(')[-1].rstrip(')')}={r[c]}" for c in sample_cols if c != key)
        where = r.get(addr, "") if addr else ""
        print(f"  {100 * number(r[key]) / total:5.1f} %  {where}  {r[src].strip()[:80]}  {extra}")


if __name__ == "__main__":
    main()
