"""Decode time against the number of scheduler parts (num_sm_parts) at small batches, where the split count
sets the combine's work and the per-part fixed costs: the default P (SM count / kv heads / m-blocks, one wave)
and smaller ones. Same inputs as benchmarks/bench_mla_decode.py; the metadata is computed once per P, outside
the timing, and each P's output is checked against the default one's.

  python lab/probes/probe_parts.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

# The benchmark's implementations and inputs (benchmarks/bench_mla_decode.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from bench_mla_decode import SMALL_B, SWEEP, bench, make_case  # noqa: E402

import flashmla_ops  # noqa: F401  (registers torch.ops.flashmla)

# (b, s_q, h_q, s_k, varlen): the sweep's small-batch rows, and b = 2 and 4.
SHAPES = [r for r in SWEEP if r[0] <= 32] + [
    (2, 1, 128, 8192, False),
    (4, 1, 128, 8192, False),
    (4, 1, 16, 32768, False),
]
FRACTIONS = [1.0, 0.75, 0.5, 0.33, 0.25]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--small-b", action="store_true", help="bench_mla_decode's --small-b shapes instead")
    ap.add_argument("--fractions", default=None, help="fractions of the default P (default 1,.75,.5,.33,.25)")
    args = ap.parse_args()
    shapes = SMALL_B if args.small_b else SHAPES
    fractions = [float(x) for x in args.fractions.split(",")] if args.fractions else FRACTIONS
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    print(f"{'b':>3} {'h_q':>4} {'s_k':>6} {'var':>3} | " + " | ".join(f"P={f:<4}" for f in fractions))
    for b, s_q, h_q, s_k, varlen in shapes:
        q, k_cache, block_table, seqlens, _ = make_case(b, s_q, h_q, s_k, varlen, torch.bfloat16)
        m_blocks = -(-s_q * h_q // 64)
        p_default = max(sms // m_blocks, 1)
        out = torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device="cuda")
        lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device="cuda")
        ref = None
        cells = []
        for f in fractions:
            p = max(int(p_default * f), 1)
            meta, num_splits = torch.ops.flashmla.get_mla_metadata(seqlens, s_q * h_q, 1, p)
            args_ = (q, k_cache, block_table, seqlens, 512, meta, num_splits, 576**-0.5, True, out, lse)
            torch.ops.flashmla.mla_decode_out(*args_)
            if ref is None:
                ref = out.clone()
            else:
                torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-2)
            us = bench(lambda a=args_: torch.ops.flashmla.mla_decode_out(*a))
            pieces = int(num_splits[-1])
            cells.append(dict(parts=p, us=us, pieces=pieces))
        rows.append(dict(b=b, s_q=s_q, h_q=h_q, s_k=s_k, varlen=varlen, results=cells))
        line = " | ".join(f"{c['us']:6.1f} ({c['parts']:3d}p {c['pieces']:3d}s)" for c in cells)
        print(f"{b:>3} {h_q:>4} {s_k:>6} {'y' if varlen else 'n':>3} | {line}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
