"""Where a main-kernel call's time goes, per CTA and per request segment (diagnostic build, -DFMLA_TRACE).

Build with the stamps (csrc/kernels/sm90/seg_trace.cuh) and run one shape; the launcher appends each launch's
records to $FMLA_TRACE_OUT (lab/trace/segment_trace.sh does both):

  FMLA_TRACE_OUT=/tmp/t.txt python3 lab/trace/segment_trace.py --b 128 --h-q 128 --s-k 4096

Prints, for the last traced launch: the kernel's span (first CTA entry to last CTA exit, globaltimer), the
spread of CTA exits (imbalance), and per segment kind (first / middle / last segment of a part) the median
cycles of each phase: prologue (Q load + first pages issued), first Q K^T, the page loop (and per 64-token
page), the join of the two warpgroups, and the epilogue.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from bench_mla_decode import make_case

import flashmla_ops

HEADER = 4
STAMPS = 7  # seg_trace.cuh: kTraceStamps
PHASES = ["prologue", "first_qk", "loop", "join", "epilogue"]


def run(args) -> None:
    torch.manual_seed(0)
    case = make_case(args.b, args.s_q, args.h_q, args.s_k, args.varlen, torch.bfloat16)
    q, k_cache, block_table, seqlens, _ = case
    meta, splits = flashmla_ops.get_mla_metadata(seqlens, args.s_q * args.h_q, 1)
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(args.calls):
        flush.fill_(1)
        flashmla_ops.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta, splits, causal=True)
    torch.cuda.synchronize()


# What each pair stamp of the seesaw loop marks (FMLA_PAIR_STAMP(k) in mainloop_seesaw.cuh), per warpgroup.
# Stamps right after a wgmma wait or a barrier may read early (seg_trace.cuh); those after "landed" (an
# mbarrier spin loop) do not.
PAIR_POINTS = {
    0: [
        "pair start (S_A in registers)",
        "softmax(A), O_L rescale, P_A stored",
        "past barrier A-ready",
        "P_A V_A[L] done",
        "past barrier B-ready",
        "V_B boxes 0-3, 8 landed",
        "next A boxes 0-3 landed",
        "P_B V_B[L] done",
        "next A boxes 4-8 landed",
        "next S_A done",
    ],
    1: [
        "pair start (S_B in registers)",
        "past barrier A-ready",
        "V_A boxes 4-8 landed",
        "softmax(B), P_B stored",
        "past barrier B-ready",
        "P_A V_A[R] done",
        "P_B V_B[R] done",
        "next B boxes 4-7 landed",
        "next B boxes 0-3, 8 landed",
        "next S_B done",
    ],
}


def analyse_pairs(rows: list[list[int]], skip: int) -> None:
    """Median cycles between consecutive stamps of each warpgroup over steady-state pairs (the first `skip`
    pairs of each CTA and its last stamped pair dropped), the pair period, and WG1's start against WG0's. The
    stamps are never cleared on the device: trace one shape per process (lab/trace/segment_trace.sh does)."""
    by = {}
    for r in rows:
        by[(r[0], r[1], r[2])] = r[3:]
    ctas = sorted({k[0] for k in by})
    steps = {g: [[] for _ in range(9)] for g in (0, 1)}
    period, offset = [], []
    for c in ctas:
        pairs = sorted(q for (cc, g, q) in by if cc == c and g == 0)
        for q in pairs[skip:-1]:
            if (c, 1, q) not in by or (c, 0, q + 1) not in by:
                continue
            # Only full pairs followed by a pair of the same segment: every stamp written and in order (a
            # segment's last pair skips stamps 5-9; the next segment's first Q K^T writes WG1's 7-9 early).
            rows_q = [by[(c, 0, q)], by[(c, 1, q)]]
            nxt = by[(c, 0, q + 1)][0]
            if any(0 in r or sorted(r) != list(r) for r in rows_q) or not rows_q[0][9] <= nxt:
                continue
            for g in (0, 1):
                st = by[(c, g, q)]
                for k in range(9):
                    steps[g][k].append(st[k + 1] - st[k])
            period.append(by[(c, 0, q + 1)][0] - by[(c, 0, q)][0])
            offset.append(by[(c, 1, q)][0] - by[(c, 0, q)][0])
    if not period:
        print("  pair stamps: no steady-state pairs recorded")
        return
    med = statistics.median
    print(
        f"  seesaw pairs: {len(period)} steady-state pairs; period median {med(period):.0f} cycles "
        f"({med(period) / 2:.0f} per page); WG1's pair start - WG0's: {med(offset):.0f}"
    )
    for g in (0, 1):
        print(f"    WG{g}:")
        for k in range(9):
            print(f"      {med(steps[g][k]):6.0f}  -> {PAIR_POINTS[g][k + 1]}")


def analyse(path: str, clock_ghz: float) -> None:
    launches = []
    pair_rows: list[list[int]] = []
    in_pairs = False
    with open(path) as fh:
        for line in fh:
            if line.startswith("launch"):
                launches.append((line.split()[1], []))
                pair_rows, in_pairs = [], False
            elif line.startswith("pairs"):
                in_pairs = True
            elif line.strip():
                (pair_rows if in_pairs else launches[-1][1]).append([int(x) for x in line.split()])
    kernel, recs = launches[-1]
    recs = [r for r in recs if r[0] and r[1]]
    t0 = min(r[0] for r in recs)
    entries = sorted((r[0] - t0) / 1e3 for r in recs)
    # Exit statistics and per-CTA sums over the CTAs with work: a part with no segment exits at once and
    # would pull the percentiles and medians down.
    idle = sum(1 for r in recs if r[3] == 0)
    span = max((r[1] - t0) / 1e3 for r in recs)
    recs = [r for r in recs if r[3] > 0]
    exits = sorted((r[1] - t0) / 1e3 for r in recs)
    print(
        f"kernel {kernel}: {len(recs) + idle} CTAs, {idle} without work; span {span:.1f} us; "
        f"CTA entry last {entries[-1]:.1f} us;"
    )
    print(
        f"  exit of CTAs with work (us from first entry): min {exits[0]:.1f}, "
        f"p10 {exits[len(exits) // 10]:.1f}, median {statistics.median(exits):.1f}, "
        f"p90 {exits[9 * len(exits) // 10]:.1f}, max {exits[-1]:.1f}"
    )
    if not clock_ghz:
        # cycles per ns between a CTA's first segment start and last segment end (clock64) and its
        # entry/exit (globaltimer): a slight overestimate of the SM clock, which also ran before and after.
        ratios = [
            (r[HEADER + (r[3] - 1) * STAMPS + 5] - r[HEADER]) / (r[1] - r[0])
            for r in recs
            if r[3] > 0 and r[1] > r[0]
        ]
        clock_ghz = statistics.median(ratios)
    kinds: dict[str, dict[str, list[float]]] = {}
    totals = {ph: [] for ph in PHASES}
    for r in recs:
        nseg = r[3]
        cta_sum = dict.fromkeys(PHASES, 0.0)
        for s in range(min(nseg, 8)):
            st = r[HEADER + s * STAMPS : HEADER + (s + 1) * STAMPS]
            nblk = st[6]
            ph = {
                "prologue": st[1] - st[0],
                "first_qk": (st[2] - st[1]) if st[2] else 0,
                "loop": st[3] - (st[2] if st[2] else st[1]),
                "join": st[4] - st[3],
                "epilogue": st[5] - st[4],
            }
            kind = "only" if nseg == 1 else ("first" if s == 0 else ("last" if s == nseg - 1 else "middle"))
            d = kinds.setdefault(kind, {k: [] for k in [*PHASES, "pages", "per_page"]})
            for k, v in ph.items():
                d[k].append(v)
                cta_sum[k] += v
            d["pages"].append(nblk)
            d["per_page"].append(ph["loop"] / max(nblk - 1, 1))
        for k in PHASES:
            totals[k].append(cta_sum[k])
    print(f"  per segment, median cycles (SM clock {clock_ghz:.3f} GHz for us):")
    for kind, d in kinds.items():
        cells = ", ".join(f"{k} {statistics.median(d[k]):.0f}" for k in PHASES)
        print(
            f"    {kind:<6} n={len(d['pages']):4d} pages {statistics.median(d['pages']):.0f}: {cells}; "
            f"loop per page after the first {statistics.median(d['per_page']):.0f}"
        )
    cells = ", ".join(f"{k} {statistics.median(v) / clock_ghz / 1e3:.1f}" for k, v in totals.items())
    print(f"  per CTA, median us summed over its segments: {cells}")
    if "seesaw" in kernel:
        analyse_pairs(pair_rows, skip=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--b", type=int, default=128)
    ap.add_argument("--s-q", type=int, default=1)
    ap.add_argument("--h-q", type=int, default=128)
    ap.add_argument("--s-k", type=int, default=4096)
    ap.add_argument("--varlen", action="store_true", help="variable lengths (mean s_k), make_case's draw")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument(
        "--clock-ghz", type=float, default=0.0, help="SM clock for cycles -> us (0: from the trace)"
    )
    args = ap.parse_args()
    path = os.environ.get("FMLA_TRACE_OUT")
    if not path:
        raise SystemExit("set FMLA_TRACE_OUT (and build with -DFMLA_TRACE)")
    if os.path.exists(path):
        os.remove(path)
    run(args)
    analyse(path, args.clock_ghz)


if __name__ == "__main__":
    main()
