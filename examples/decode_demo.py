"""flashmla_ops decode demo: one MLA decode step over a paged latent cache, checked and timed.

Uses the Hopper (sm_90a) kernels when an sm_90 GPU and the compiled extension are present, and the
pure-PyTorch CPU reference otherwise; prints which one ran.

    python examples/decode_demo.py [--batch 16] [--seqlen 1024] [--heads 128] [--mtp 1]
"""

from __future__ import annotations

import argparse
import time

import torch

import flashmla_ops
from flashmla_ops.reference import mla_decode_reference


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=1024, help="mean cache length (varies per request)")
    ap.add_argument("--heads", type=int, default=128, help="query heads h_q (h_kv = 1)")
    ap.add_argument("--mtp", type=int, default=1, help="query tokens per request (s_q); causal when > 1")
    args = ap.parse_args()

    on_gpu = (
        torch.cuda.is_available()
        and torch.cuda.get_device_capability() == (9, 0)
        and flashmla_ops.cuda_extension_available()
    )
    device = "cuda" if on_gpu else "cpu"
    if on_gpu:
        backend = f"Hopper sm_90a kernels on {torch.cuda.get_device_name()}"
    else:
        why = "no sm_90 GPU" if flashmla_ops.cuda_extension_available() else "CUDA extension not built"
        backend = f"CPU reference ({why})"
    print(f"flashmla_ops {flashmla_ops.__version__}: running the {backend}")

    torch.manual_seed(0)
    b, s_q, h_q, page = args.batch, args.mtp, args.heads, 64
    dtype = torch.bfloat16
    # Variable request lengths, one of them empty (its output is 0 and its LSE +inf).
    seqlens = torch.randint(args.seqlen // 2, args.seqlen * 3 // 2 + 1, (b,), dtype=torch.int32)
    seqlens[0] = 0
    pages_per_req = (seqlens + page - 1) // page
    max_pages = int(pages_per_req.max())
    num_pages = int(pages_per_req.sum())
    # A paged cache with pages scattered at random, as a serving engine's allocator leaves them.
    block_table = torch.zeros(b, max(max_pages, 1), dtype=torch.int32)
    perm = torch.randperm(num_pages, dtype=torch.int32)
    cols = torch.arange(block_table.shape[1])
    block_table[cols[None, :] < pages_per_req[:, None]] = perm
    k_cache = torch.randn(num_pages, page, 1, 576, dtype=dtype) / 10
    q = torch.randn(b, s_q, h_q, 576, dtype=dtype) / 10
    q, k_cache, block_table, seqlens = (t.to(device) for t in (q, k_cache, block_table, seqlens))

    # The FlashMLA API: metadata once per decode step (shared by all layers), then one call per layer.
    tile_md, num_splits = flashmla_ops.get_mla_metadata(seqlens, s_q * h_q // 1, 1)
    out, lse = flashmla_ops.flash_mla_with_kvcache(
        q, k_cache, block_table, seqlens, 512, tile_md, num_splits, causal=s_q > 1
    )

    ref_out, ref_lse = mla_decode_reference(
        q, k_cache, block_table, seqlens, 512, tile_md, num_splits, 576**-0.5, s_q > 1
    )
    err = float((out.float() - ref_out.float()).norm() / ref_out.float().norm())
    print(f"out {tuple(out.shape)} {out.dtype}, lse {tuple(lse.shape)} {lse.dtype}")
    print(f"relative error against the reference: {err:.2e}; empty request -> lse {float(lse[0, 0, 0])}")

    def step():
        return flashmla_ops.flash_mla_with_kvcache(
            q, k_cache, block_table, seqlens, 512, tile_md, num_splits, causal=s_q > 1
        )

    for _ in range(3):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    n = 50 if on_gpu else 3
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    us = (time.perf_counter() - t0) / n * 1e6
    total = int(seqlens.sum())
    flops = 2 * s_q * total * h_q * (576 + 512)
    nbytes = 2 * (total * 576 + b * s_q * h_q * (576 + 512))
    print(
        f"decode: {us:.1f} us/call, {nbytes / us / 1e3:.1f} GB/s, {flops / us / 1e6:.2f} TFLOP/s ({backend})"
    )
    if err > 2e-2:
        raise SystemExit("error too large")


if __name__ == "__main__":
    main()
