"""Markdown table of one bench_mla_decode.py JSON, with the times of an earlier run of ours next to it.

    python benchmarks/compare_results.py NEW.json [OLD.json]

Rows are matched on (b, s_q, h_q, s_k, varlen); ratios are peer time / ours, as in the benchmark.
"""

from __future__ import annotations

import json
import math
import sys


def key(row: dict) -> tuple:
    return (row["b"], row["s_q"], row["h_q"], row["s_k"], row["varlen"])


def main(argv: list[str]) -> None:
    new = json.load(open(argv[0]))
    old = {key(r): r for r in json.load(open(argv[1]))["rows"]} if len(argv) > 1 else {}
    head = "| b | s_q | h_q | s_k | varlen | ours µs | GB/s | TF/s | FlashMLA µs | FlashInfer µs |"
    head += " vs FlashMLA | vs FlashInfer | vs fastest |" + (" before µs | speed-up |" if old else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    best, fm, speedups = [], [], []
    for r in new["rows"]:
        us = r["flashmla_ops"]["us"]
        cells = [r["b"], r["s_q"], r["h_q"], r["s_k"], "yes" if r["varlen"] else "no", f"{us:.1f}"]
        cells += [f"{r['bytes'] / us / 1e3:.0f}", f"{r['flops'] / us / 1e6:.0f}"]
        cells += [f"{r['FlashMLA']['us']:.1f}", f"{r['FlashInfer']['us']:.1f}"]
        cells += [f"{r['ratio_vs_FlashMLA']:.2f}", f"{r['ratio_vs_FlashInfer']:.2f}"]
        cells += [f"{r['ratio_vs_fastest_peer']:.2f}"]
        best.append(r["ratio_vs_fastest_peer"])
        fm.append(r["ratio_vs_FlashMLA"])
        if old:
            was = old.get(key(r), {}).get("flashmla_ops", {}).get("us")
            cells += [f"{was:.1f}", f"{was / us:.2f}"] if was else ["", ""]
            if was:
                speedups.append(was / us)
        print("| " + " | ".join(str(c) for c in cells) + " |")
    geo = math.exp(sum(map(math.log, best)) / len(best))
    print(f"\nmin ratio vs fastest peer {min(best):.3f}, geomean {geo:.3f}; vs FlashMLA min {min(fm):.3f}")
    if speedups:
        g = math.exp(sum(map(math.log, speedups)) / len(speedups))
        lo, hi = min(speedups), max(speedups)
        print(f"time vs the earlier run: geomean {g:.3f}x faster, range {lo:.2f}-{hi:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
