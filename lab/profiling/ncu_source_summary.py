"""Summarise Nsight Compute per-instruction warp-state samples (lab/profiling/ncu_source.sh writes the CSVs):
samples by stall reason for the whole kernel, and the instructions with the most samples, each with its two
main stall reasons and its index in the SASS listing (to find its neighbours in the CSV).

    python lab/profiling/ncu_source_summary.py src_ours.csv.gz [src_flashmla.csv.gz ...] [--top 40]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io


def load(path: str) -> list[dict[str, str]]:
    raw = gzip.open(path, "rt").read() if path.endswith(".gz") else open(path).read()
    lines = raw.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith('"Address"'))
    return list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))


def num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def summarise(path: str, top: int) -> None:
    rows = load(path)
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    total = sum(num(r["Warp Stall Sampling (All Samples)"]) for r in rows)
    executed = sum(num(r["Instructions Executed"]) for r in rows)
    print(f"== {path}: {len(rows)} instructions, {total:.0f} samples, {executed:.0f} warp instructions run")
    by_reason = {k: sum(num(r[k]) for r in rows) for k in reasons}
    for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1]):
        if v > 0.005 * total:
            print(f"  {k:28s} {v:9.0f}  {100 * v / total:5.1f} %")
    order = sorted(range(len(rows)), key=lambda i: -num(rows[i]["Warp Stall Sampling (All Samples)"]))
    print(f"  top {top} instructions (samples, % of all, top reasons; index in the listing):")
    for i in order[:top]:
        r = rows[i]
        s = num(r["Warp Stall Sampling (All Samples)"])
        rs = sorted(((num(r[k]), k[6:]) for k in reasons), reverse=True)[:2]
        why = ", ".join(f"{k} {v:.0f}" for v, k in rs if v > 0)
        print(f"  {s:7.0f} {100 * s / total:5.1f} %  #{i:5d} {r['Source'].strip()[:60]:60s} [{why}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    for path in args.csv:
        summarise(path, args.top)


if __name__ == "__main__":
    main()
