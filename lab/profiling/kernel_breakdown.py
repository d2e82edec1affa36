"""Per-kernel GPU time of one decode call, ours and the peers', on the same inputs (torch.profiler, CUPTI).

Where do the microseconds of a call go: the main kernel, the combine, anything else the call launches, and the
gap between them? Each call runs after an L2 flush (a 256 MB fill), as in the sweep; the flush kernels are
dropped from the tally. Run from the repository root (this folder, not the checkout, comes first on sys.path),
peers on PYTHONPATH:

  PYTHONPATH=/tmp/site:/tmp/peers python3 lab/profiling/kernel_breakdown.py \\
      --shape 128,1,16,4096 --shape 128,1,128,4096 --json out.json

A shape is b,s_q,h_q,s_k[,varlen]. Prints, per shape and implementation, each kernel's median duration, their
sum, and the span from the first kernel's start to the last one's end (median over the calls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

# The benchmark's implementations and inputs (benchmarks/bench_mla_decode.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from bench_mla_decode import FlashInfer, FlashMLA, Ours, make_case  # noqa: E402

DEFAULT_SHAPES = ["128,1,16,4096", "128,1,16,8192", "128,1,128,4096", "128,1,128,8192", "1,1,128,32768"]


def profile_calls(fn, calls: int, flush: torch.Tensor):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.fill_(1)
            fn()
        torch.cuda.synchronize()
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    ]
    kernels.sort(key=lambda e: e.time_range.start)
    groups, cur = [], None
    for e in kernels:
        # The flush (a fill of a 256 MB tensor) opens a call; everything after it belongs to that call.
        is_fill = e.name.startswith(
            ("void at::native::vectorized_elementwise", "void at::native::elementwise")
        )
        if is_fill and e.time_range.end - e.time_range.start > 40:
            cur = []
            groups.append(cur)
        elif cur is not None:
            cur.append((e.name, e.time_range.start, e.time_range.end))
    per_kernel: dict[str, list[float]] = {}
    spans = []
    for g in groups:
        if not g:
            continue
        spans.append(max(x[2] for x in g) - min(x[1] for x in g))
        for name, t0, t1 in g:
            per_kernel.setdefault(name, []).append(t1 - t0)
    span = statistics.median(spans) if spans else 0.0
    return {k: statistics.median(v) for k, v in per_kernel.items()}, span


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", help="b,s_q,h_q,s_k[,varlen] (repeatable)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    results = []
    for spec in args.shape or DEFAULT_SHAPES:
        f = spec.split(",")
        b, s_q, h_q, s_k = (int(x) for x in f[:4])
        varlen = len(f) > 4 and f[4] in ("1", "varlen", "yes")
        torch.manual_seed(0)
        q, k_cache, block_table, seqlens, _ = make_case(b, s_q, h_q, s_k, varlen, torch.bfloat16)
        scale = 576**-0.5
        for cls in (Ours, FlashMLA, FlashInfer):
            try:
                fn = cls(q, k_cache, block_table, seqlens, True, scale)
                kern, span = profile_calls(fn, args.calls, flush)
            except Exception as exc:  # a peer missing or refusing the shape
                print(f"{spec} {cls.name}: skipped ({type(exc).__name__}: {exc})")
                continue
            total = sum(kern.values())
            print(f"{spec:>18} {cls.name:<12} span {span:8.1f} us  kernels {total:8.1f} us")
            for name, us in sorted(kern.items(), key=lambda kv: -kv[1]):
                print(f"{'':>31} {us:8.1f} us  {name[:110]}")
            results.append({"shape": spec, "impl": cls.name, "span_us": span, "kernels_us": kern})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
