"""Diagnostic: how much of the decode time is waiting on HBM?

Times flashmla_ops (and FlashMLA when importable) on the same shapes twice: with the benchmark's block table
(every page distinct, read from HBM) and with every block-table entry folded onto the first 64 pages (~4.7 MB,
L2-resident), so the kernel's own pipeline runs with short, cache-hit TMA latencies. A large gap means the
main loop stalls on its page loads; no gap means it is bound by its on-chip schedule.

  python lab/probes/probe_l2.py
"""

import os
import sys

import torch

# The benchmark's implementations and inputs (benchmarks/bench_mla_decode.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from bench_mla_decode import FlashMLA, Ours, make_case  # noqa: E402
from triton.testing import do_bench

import flashmla_ops

ROWS = [(128, 1, 16, 8192), (128, 1, 128, 8192), (128, 2, 128, 8192), (128, 2, 16, 4096)]


def main():
    torch.manual_seed(0)
    scale = 576**-0.5
    print(f"flashmla_ops {flashmla_ops.__version__}, {torch.cuda.get_device_name()}")
    print("   b sq  hq    sk | ours HBM  ours L2 |  FM HBM    FM L2   (us, do_bench medians)")
    for b, s_q, h_q, s_k in ROWS:
        q, k_cache, block_table, seqlens, _ = make_case(b, s_q, h_q, s_k, False, torch.bfloat16)
        aliased = block_table % 64
        times = []
        for impl in (Ours, FlashMLA):
            for bt in (block_table, aliased):
                try:
                    f = impl(q, k_cache, bt, seqlens, False, scale)
                    times.append(do_bench(f, warmup=50, rep=300, return_mode="median") * 1e3)
                except Exception:  # the peer is optional
                    times.append(float("nan"))
        print(f"{b:4d} {s_q:2d} {h_q:3d} {s_k:5d} | " + " ".join(f"{t:8.1f}" for t in times))


if __name__ == "__main__":
    main()
