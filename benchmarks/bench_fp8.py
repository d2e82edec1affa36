"""FP8 KV-cache decode, side by side: flashmla_ops (per-tensor e4m3 and DeepSeek V3.2's 656-byte format, bf16
q) against its own BF16 kernel on the same values, FlashMLA's dense FP8 kernel (sgl-flash-mla legacy
``fwd_kvcache_mla_fp8``: it quantises q to e4m3 too) and FlashInfer's fa3 MLA with an e4m3 cache (bf16 q,
``ckv_scale``/``kpe_scale``), plus both peers' BF16.

    python benchmarks/bench_fp8.py [--rows "b,s_q,h_q,s_k;..."] [--json F] [--peers FlashMLA,FlashInfer]
                                   [--q-dtype bf16|fp16]

``--q-dtype fp16``: q in fp16, ours only (the per-tensor FP8 kernel computes in fp16 then; V3.2 takes bf16 q
only); the "ours bf16" row is then our 16-bit kernel on the same values in fp16, still the ratio's base.

Every implementation reads the same cache: a bf16 cache is quantised per tensor (amax / 448), and the BF16
rows decode its dequantised values rounded to bf16, so the FP8 and BF16 paths attend over (nearly) the same
keys; V3.2 quantises the same bf16 cache with its own per-128-value scales. GB/s counts the bytes
each format reads (576 B per token for e4m3, 656 for V3.2, 1152 for bf16) plus q and out. The error column is
the relative error (Frobenius) of out against a float64 computation on that implementation's own dequantised
cache (the kernel's error), over the first requests of the batch; `err_bf16` against the float64 result on
the unquantised bf16 cache (the format's error). Times: triton's do_bench median (µs), L2 not flushed between
calls (the cache is many times the L2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from bench_mla_decode import FlashInfer, FlashMLA  # the peers' wrappers of the main benchmark

import flashmla_ops

PAGE = 64
ROWS = [
    (128, 1, 16, 8192),
    (128, 1, 16, 4096),
    (128, 2, 16, 4096),
    (64, 1, 64, 16384),
    (128, 1, 128, 8192),
    (128, 2, 128, 4096),
    (1, 1, 128, 8192),
]
SCALE = 576**-0.5
REF_REQUESTS = 4  # requests checked against float64


def bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def make_case(b, s_q, h_q, s_k, q_dtype=torch.bfloat16):
    seqlens = torch.full((b,), s_k, dtype=torch.int32, device="cuda")
    nblk = (s_k + PAGE - 1) // PAGE
    perm = torch.randperm(b * nblk, device="cuda").to(torch.int32)
    block_table = perm.view(b, nblk)
    k_bf16 = (torch.randn(b * nblk, PAGE, 1, 576, device="cuda") / 10).bfloat16()
    q = (torch.randn(b, s_q, h_q, 576, device="cuda") / 10).to(q_dtype)
    return q, k_bf16, block_table, seqlens


def reference(q, k, block_table, seqlens, n):
    """float64 out of the first n requests (k: float [pages, 64, 1, 576])."""
    outs = []
    for i in range(n):
        L = int(seqlens[i])
        kv = k[block_table[i].long()].reshape(-1, 576)[:L].double()
        s = torch.einsum("shd,kd->shk", q[i].double(), kv) * SCALE
        s_q = q.shape[1]
        pos = torch.arange(L, device=q.device)
        lim = L - (s_q - 1 - torch.arange(s_q, device=q.device))
        s = s.masked_fill(pos[None, None, :] >= lim[:, None, None], float("-inf"))
        outs.append(torch.einsum("shk,kd->shd", torch.softmax(s, -1), kv[:, :512]))
    return torch.stack(outs)


def rel(x, ref):
    x = x.double()
    return float((x - ref).norm() / ref.norm())


def run_row(b, s_q, h_q, s_k, peers, q_dtype=torch.bfloat16):
    q, k_bf16, block_table, seqlens = make_case(b, s_q, h_q, s_k, q_dtype)
    causal = s_q > 1
    n = min(b, REF_REQUESTS)
    k_pt, k_scale = flashmla_ops.quantize_kv_cache(k_bf16, "per_tensor")
    k_v32, _ = flashmla_ops.quantize_kv_cache(k_bf16, "v32")
    deq_pt = flashmla_ops.dequantize_kv_cache(k_pt, k_scale)
    deq_v32 = flashmla_ops.dequantize_kv_cache(k_v32)
    k_deq16 = deq_pt.to(q.dtype)  # e4m3 * scale rounded to q's dtype: the 16-bit rows' cache
    ref_bf16 = reference(q, k_bf16.float(), block_table, seqlens, n)
    ref_pt = reference(q, deq_pt, block_table, seqlens, n)
    ref_v32 = reference(q, deq_v32, block_table, seqlens, n)
    tokens = b * s_k
    qo_bytes = 2 * b * s_q * h_q * (576 + 512)
    meta, ns = flashmla_ops.get_mla_metadata(seqlens, s_q * h_q, 1)
    out = torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device="cuda")
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device="cuda")
    ws = torch.empty(flashmla_ops.workspace_size(meta, s_q * h_q, 1), device="cuda")
    impls = {}
    common = (block_table, seqlens, 512, meta, ns, SCALE, causal)

    def ours_bf16():
        torch.ops.flashmla.mla_decode_out(q, k_deq16, *common, out, lse, ws)
        return out

    def ours_pt():
        torch.ops.flashmla.mla_decode_fp8_out(q, k_pt, *common, k_scale, out, lse, ws)
        return out

    def ours_v32():
        torch.ops.flashmla.mla_decode_fp8_out(q, k_v32, *common, None, out, lse, ws)
        return out

    impls["ours bf16"] = (ours_bf16, 1152, ref_pt)
    impls["ours fp8"] = (ours_pt, 576, ref_pt)
    if q.dtype == torch.bfloat16:
        impls["ours v32"] = (ours_v32, 656, ref_v32)
    dense = (block_table, seqlens, causal, SCALE)
    if "FlashMLA" in peers:
        import flash_mla

        impls["FlashMLA bf16"] = (FlashMLA(q, k_deq16, *dense), 1152, ref_pt)
        fm8_meta = flash_mla.get_mla_metadata()[0]
        sched, splits = flash_mla.get_mla_decoding_metadata(
            seqlens, s_q * h_q, 1, is_fp8_kvcache=True, use_legacy=True
        )
        fm8_meta.tile_scheduler_metadata, fm8_meta.num_splits = sched, splits
        # SGLang's builtin FP8 path: q quantised with the cache's scale, both descales that scale.
        q_fp8 = (q.float() / k_scale).clamp(-448, 448).to(torch.float8_e4m3fn)

        def fm_fp8():
            return flash_mla.flash_mla_with_kvcache(
                q_fp8,
                k_pt,
                block_table,
                seqlens,
                512,
                fm8_meta,
                None,
                softmax_scale=SCALE,
                causal=causal,
                is_fp8_kvcache=True,
                use_legacy=True,
                descale_q=k_scale,
                descale_k=k_scale,
            )[0]

        impls["FlashMLA fp8 (fp8 q)"] = (fm_fp8, 576, ref_pt)
    if "FlashInfer" in peers:
        impls["FlashInfer bf16"] = (FlashInfer(q, k_deq16, *dense), 1152, ref_pt)
        # k_scale read to the host once, at setup (FlashInfer takes a float)
        impls["FlashInfer fp8"] = (FlashInfer(q, k_pt, *dense, kv_scale=float(k_scale)), 576, ref_pt)
    res = {}
    for name, (fn, bpt, ref) in impls.items():
        try:
            o = fn()
            torch.cuda.synchronize()
            err = rel(o[:n], ref)
            err_bf16 = rel(o[:n], ref_bf16)
            us = bench(fn)
            gbs = (tokens * bpt + qo_bytes) / us / 1e3
            res[name] = dict(us=us, gbs=gbs, err=err, err_bf16=err_bf16)
        except Exception as e:  # a peer that refuses a shape
            res[name] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=None, help='"b,s_q,h_q,s_k;..." instead of the default rows')
    ap.add_argument("--json", default=None)
    ap.add_argument("--peers", default="FlashMLA,FlashInfer")
    ap.add_argument("--q-dtype", choices=["bf16", "fp16"], default="bf16")
    args = ap.parse_args()
    q_dtype = torch.float16 if args.q_dtype == "fp16" else torch.bfloat16
    torch.manual_seed(0)
    rows = ROWS
    if args.rows:
        rows = [tuple(int(x) for x in r.split(",")) for r in args.rows.split(";") if r]
    peers = args.peers.split(",") if args.peers and q_dtype == torch.bfloat16 else []
    info = dict(
        device=torch.cuda.get_device_name(),
        commit=os.environ.get("FLASHMLA_COMMIT", "unknown"),
        q_dtype=args.q_dtype,
    )
    print(json.dumps(info))
    results = []
    for b, s_q, h_q, s_k in rows:
        res = run_row(b, s_q, h_q, s_k, peers, q_dtype)
        results.append(dict(b=b, s_q=s_q, h_q=h_q, s_k=s_k, impls=res))
        base = res["ours bf16"].get("us")
        print(f"b={b} s_q={s_q} h_q={h_q} s_k={s_k}")
        for name, r in res.items():
            if "error" in r:
                print(f"  {name:22s} {r['error']}")
                continue
            speed = f"{base / r['us']:.2f}x ours-bf16" if base else ""
            print(
                f"  {name:22s} {r['us']:8.1f} us {r['gbs']:7.0f} GB/s  err {r['err']:.1e}  "
                f"err_vs_bf16 {r['err_bf16']:.1e}  {speed}"
            )
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, rows=results), f, indent=1)


if __name__ == "__main__":
    main()
