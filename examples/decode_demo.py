"""flashmla_ops decode demo: one MLA decode step over a paged latent cache, checked and timed.

Uses the Hopper (sm_90a) kernels when an sm_90 GPU and the compiled extension are present, and the
pure-PyTorch CPU reference otherwise; prints which one ran, the problem it computed, and its error against
an independent float64 computation.

    python examples/decode_demo.py [--batch 16] [--seqlen 1024] [--heads 128] [--mtp 1]
"""

from __future__ import annotations

import argparse
import time

import torch

import flashmla_ops


def attention_float64(q, k_cache, block_table, seqlens, causal):
    """MLA decode in float64, request by request, from the definition (not flashmla_ops' reference):
    gather the request's pages, scores = q k^T * 576^-0.5, (bottom-right causal mask), softmax, times V."""
    b, s_q, h_q, _ = q.shape
    page = k_cache.shape[1]
    q, k_cache, block_table, seqlens = (t.cpu() for t in (q, k_cache, block_table, seqlens))
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), float("inf"), dtype=torch.float64)
    for i in range(b):
        n = int(seqlens[i])
        if n == 0:
            continue
        pages = block_table[i, : (n + page - 1) // page].long()
        kv = k_cache[pages].reshape(-1, 576)[:n].double()  # [n, 576], h_kv = 1
        scores = torch.einsum("shd,nd->shn", q[i].double(), kv) * 576**-0.5  # [s_q, h_q, n]
        if causal:  # query token s sees the first n - (s_q - 1 - s) keys
            visible = torch.arange(n)[None, :] < (n - (s_q - 1) + torch.arange(s_q))[:, None]
            scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [s_q, h_q]
        p = torch.exp(scores - row_lse[..., None]).nan_to_num(0.0)
        out[i] = torch.einsum("shn,nd->shd", p, kv[:, :512])
        lse[i] = row_lse.transpose(0, 1)
    return out, lse


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
    if b > 1:
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
    print(
        f"problem: b={b} requests, s_q={s_q} query token(s) each{' (causal)' if s_q > 1 else ''}, h_q={h_q} "
        f"query heads, h_kv=1, head dims 576 (q, k) / 512 (v), {dtype}, cache lengths "
        f"{int(seqlens.min())}..{int(seqlens.max())} (mean {float(seqlens.float().mean()):.0f}), "
        f"{num_pages} pages of {page} tokens"
    )
    q, k_cache, block_table, seqlens = (t.to(device) for t in (q, k_cache, block_table, seqlens))

    # The FlashMLA API: metadata once per decode step (shared by all layers), then one call per layer.
    tile_md, num_splits = flashmla_ops.get_mla_metadata(seqlens, s_q * h_q // 1, 1)
    out, lse = flashmla_ops.flash_mla_with_kvcache(
        q, k_cache, block_table, seqlens, 512, tile_md, num_splits, causal=s_q > 1
    )

    ref_out, ref_lse = attention_float64(q, k_cache, block_table, seqlens, causal=s_q > 1)
    err = float((out.double().cpu() - ref_out).norm() / ref_out.norm())
    finite = torch.isfinite(ref_lse)
    lse_err = float((lse.double().cpu()[finite] - ref_lse[finite]).abs().max()) if finite.any() else 0.0
    print(f"out {tuple(out.shape)} {out.dtype}, lse {tuple(lse.shape)} {lse.dtype}")
    print(
        f"against a float64 computation written independently below: out relative error {err:.2e}, "
        f"lse max abs error {lse_err:.2e}; request 0 -> lse {float(lse[0, 0, 0])}"
    )

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
