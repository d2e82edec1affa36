"""Diagnostic: what does a dirty L2 cost each implementation?

The sweep times with triton's do_bench, which clears L2 before every run by writing a 256 MB buffer: the call
then starts with L2 full of dirty lines that have to be written back while it streams the KV cache (as after
any kernel that writes its output, in a real model). This times the same calls three ways, CUDA events around
the call only, medians:
  dirty  - after the 256 MB write (do_bench's flush);
  clean  - after the same write followed by a 256 MB read of another buffer (L2 holds clean lines);
  warm   - no flush (the previous call's data may still be in L2); a short GPU sleep before the start event
           keeps host launch time out of this column as the flushes do for the others.

  PYTHONPATH=/tmp/site:/tmp/peers python3 lab/probes/probe_dirty_l2.py --rows "128,1,16,8192,0"
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

# The benchmark's implementations and inputs (benchmarks/bench_mla_decode.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from bench_mla_decode import FlashInfer, FlashMLA, Ours, make_case  # noqa: E402


def time_calls(fn, prep, reps: int = 50) -> float:
    times = []
    for _ in range(reps):
        prep()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="128,1,16,8192,0;128,1,16,4096,0;128,1,128,8192,0")
    args = ap.parse_args()
    torch.manual_seed(0)
    dirty_buf = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    clean_buf = torch.ones(256 << 18, dtype=torch.int32, device="cuda")
    sink = torch.empty((), dtype=torch.int64, device="cuda")

    def dirty():
        dirty_buf.zero_()

    def clean():
        dirty_buf.zero_()
        torch.sum(clean_buf, dim=0, dtype=torch.int64, out=sink)

    def warm():
        torch.cuda._sleep(200_000)  # ~0.1 ms of GPU time: the call is enqueued before the start event fires

    hdr = f"{'b':>4} {'sq':>2} {'hq':>4} {'sk':>6} {'var':>3} {'impl':<13}"
    print(hdr + f" {'dirty':>8} {'clean':>8} {'warm':>8}  (us)")
    for spec in args.rows.split(";"):
        b, s_q, h_q, s_k, varlen = (int(x) for x in spec.split(","))
        q, k_cache, block_table, seqlens, _ = make_case(b, s_q, h_q, s_k, bool(varlen), torch.bfloat16)
        for impl in (Ours, FlashMLA, FlashInfer):
            try:
                f = impl(q, k_cache, block_table, seqlens, True, 576**-0.5)
                f()
            except Exception as e:  # a peer that is not installed
                print(f"{b:>4} {s_q:>2} {h_q:>4} {s_k:>6} {varlen:>3} {impl.name:<13} {type(e).__name__}")
                continue
            t = [time_calls(f, p) for p in (dirty, clean, warm)]
            print(
                f"{b:>4} {s_q:>2} {h_q:>4} {s_k:>6} {varlen:>3} {impl.name:<13} "
                + " ".join(f"{x:8.1f}" for x in t),
                flush=True,
            )
        del q, k_cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
