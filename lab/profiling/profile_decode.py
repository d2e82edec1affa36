"""One decode call (flashmla_ops, or a peer with --impl) under Nsight Compute (or any profiler): fixed-length
paged inputs, two warm-up calls, then the profiled call between cudaProfilerStart/Stop. Peer kernels:
FlashMLA's matches regex:splitkv_mla_kernel, FlashInfer's regex:BatchMLAPageAttentionHopperKernel. `--kv fp8`
or `--kv v32` (ours only) quantises the cache to the per-tensor or DeepSeek V3.2 FP8 format (kernels
regex:decode_(pingpong_fp8|serial)_kernel).

  ncu --profile-from-start off --kernel-name regex:decode_ --section SpeedOfLight \\
      --section WarpStateStats python lab/profiling/profile_decode.py --b 128 --s-q 2 --h-q 128 --s-k 4096

Prints the shape and the call's median time (10 runs, do_bench-free: CUDA events, L2 not flushed).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import flashmla_ops

# --impl flashinfer uses the benchmark's FlashInfer wrapper (benchmarks/bench_mla_decode.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))

PAGE = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--b", type=int, default=128)
    ap.add_argument("--s-q", type=int, default=1)
    ap.add_argument("--h-q", type=int, default=128)
    ap.add_argument("--s-k", type=int, default=4096)
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument(
        "--kv", choices=["bf16", "fp8", "v32"], default="bf16", help="cache format (fp8: per tensor)"
    )
    ap.add_argument(
        "--l2-pages",
        type=int,
        default=0,
        help="fold every block-table entry onto the first N pages (an L2-resident cache; 0: all distinct)",
    )
    ap.add_argument(
        "--impl",
        choices=["ours", "flashmla", "flashinfer"],
        default="ours",
        help="flashmla: the sgl-flash-mla peer; flashinfer: its MLA wrapper (fa3 backend)",
    )
    ap.add_argument(
        "--shape",
        action="append",
        default=None,
        help="b,s_q,h_q,s_k (repeatable; overrides --b/--s-q/--h-q/--s-k): one profiled call per shape",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = [tuple(int(x) for x in sh.split(",")) for sh in args.shape or []]
    for b, s_q, h_q, s_k in shapes or [(args.b, args.s_q, args.h_q, args.s_k)]:
        args.b, args.s_q, args.h_q, args.s_k = b, s_q, h_q, s_k
        profile_one(args)


def profile_one(args) -> None:
    dtype = getattr(torch, args.dtype)
    pages_per_req = -(-args.s_k // PAGE)
    num_pages = args.b * pages_per_req
    k_cache = (torch.randn(num_pages, PAGE, 1, 576, device="cuda") / 10).to(dtype)
    block_table = torch.randperm(num_pages, device="cuda", dtype=torch.int32).view(args.b, pages_per_req)
    if args.l2_pages:
        block_table = block_table % args.l2_pages
    seqlens = torch.full((args.b,), args.s_k, dtype=torch.int32, device="cuda")
    q = (torch.randn(args.b, args.s_q, args.h_q, 576, device="cuda") / 10).to(dtype)
    meta, splits = flashmla_ops.get_mla_metadata(seqlens, args.s_q * args.h_q, 1)

    def call():
        return flashmla_ops.flash_mla_with_kvcache(
            q, k_cache, block_table, seqlens, 512, meta, splits, causal=True
        )

    if args.kv != "bf16":
        if args.impl != "ours":
            raise SystemExit("--kv fp8/v32: ours only")
        k_q, k_scale = flashmla_ops.quantize_kv_cache(k_cache, "per_tensor" if args.kv == "fp8" else "v32")

        def call():  # noqa: F811 (the FP8 cache replaces the 16-bit one)
            return flashmla_ops.flash_mla_with_kvcache(
                q,
                k_q,
                block_table,
                seqlens,
                512,
                meta,
                splits,
                causal=True,
                is_fp8_kvcache=True,
                k_scale=k_scale,
            )

    if args.impl == "flashmla":
        import flash_mla

        fm_meta, _ = flash_mla.get_mla_metadata()

        def call():  # noqa: F811 (the peer replaces ours)
            return flash_mla.flash_mla_with_kvcache(
                q, k_cache, block_table, seqlens, 512, fm_meta, None, causal=True, use_legacy=True
            )

    if args.impl == "flashinfer":
        from bench_mla_decode import FlashInfer

        call = FlashInfer(q, k_cache, block_table, seqlens, True, 576**-0.5)  # noqa: F811

    for _ in range(2):
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    flops = 2 * args.s_q * args.b * args.s_k * args.h_q * (576 + 512)
    us = times[len(times) // 2]
    shape = f"{args.impl} b={args.b} s_q={args.s_q} h_q={args.h_q} s_k={args.s_k} {args.dtype} kv={args.kv}"
    shape += f" l2_pages={args.l2_pages}"
    print(f"{shape}: {us:.1f} us, {flops / us / 1e6:.0f} TF/s")


if __name__ == "__main__":
    main()
