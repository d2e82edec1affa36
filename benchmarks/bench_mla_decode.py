"""Side-by-side MLA decode benchmark on one GPU: flashmla_ops, FlashMLA, FlashInfer (fa3) and plain PyTorch.

Every implementation reads the same paged cache and the same queries. Each is first checked against the
pure-PyTorch reference on those inputs (fresh random data), then timed with triton.testing.do_bench (median,
L2 flushed between runs). Only the decode call is timed; schedule/plan computations happen once outside, as in
FlashMLA's own benchmark. FLOPs and bytes use FlashMLA's formulas:
  FLOPs = 2 * s_q * sum(seqlens) * h_q * (576 + 512)
  bytes = 2 * (sum(seqlens) * h_kv * 576 + b * s_q * h_q * 576 + b * s_q * h_q * 512)

  python benchmarks/bench_mla_decode.py [--quick | --small | --small-b] [--graph] [--json F] [--png F]

--graph times each implementation as a server runs a decode step: one CUDA graph holds one call per layer,
each layer with its own cache and queries (as many layers as it takes to read at least 256 MB, so every call
starts with its pages out of L2, as in a real model), and the graph is replayed; the time per call is the
replay time divided by the layer count. Launch overhead is then out of every side. Without --graph, calls
are timed one by one with do_bench (L2 flushed before each).

Peers are used when importable: `flash_mla` (pip sgl-flash-mla==1.0.0, called with use_legacy=True) and
`flashinfer` (pip flashinfer-python==0.7.2.post1, BatchMLAPagedAttentionWrapper, backend="fa3", page 64).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import torch

import flashmla_ops
from flashmla_ops.reference import mla_decode_reference

PAGE = 64

# (b, s_q, h_q, s_k, varlen): the standard sweep, then small batches.
SWEEP = [
    (128, s_q, h_q, s_k, varlen)
    for varlen in (False, True)
    for s_k in (4096, 8192)
    for h_q in (16, 32, 64, 128)
    for s_q in (1, 2)
] + [
    (1, 1, 16, 8192, False),
    (1, 1, 16, 32768, False),
    (1, 1, 128, 8192, False),
    (1, 1, 128, 32768, False),
    (32, 1, 16, 1024, True),
]
# Small batches: one to four requests, 1k-32k tokens, h_q 16 and 128.
SMALL_B = [(b, 1, h_q, s_k, False) for b in (1, 2, 4) for h_q in (16, 128) for s_k in (1024, 8192, 32768)]
QUICK = [
    (128, 1, 16, 8192, False),
    (128, 1, 64, 8192, False),
    (128, 1, 128, 8192, False),
    (128, 2, 128, 8192, False),
    (128, 1, 128, 8192, True),
    (1, 1, 128, 8192, False),
    (32, 1, 16, 1024, True),
    (128, 2, 16, 4096, False),
]


def make_case(b, s_q, h_q, s_k, varlen, dtype, h_kv=1):
    if varlen:
        seqlens = torch.normal(float(s_k), s_k / 2.0, (b,)).round().clamp(min=s_q, max=3 * s_k)
    else:
        seqlens = torch.full((b,), float(s_k))
    seqlens = seqlens.to(torch.int32).cuda()
    nblk = (seqlens.long() + PAGE - 1) // PAGE
    max_blocks = int(nblk.max())
    num_pages = int(nblk.sum())
    perm = torch.randperm(num_pages, device="cuda").to(torch.int32)
    block_table = torch.zeros((b, max_blocks), dtype=torch.int32, device="cuda")
    used = torch.arange(max_blocks, device="cuda")[None, :] < nblk[:, None]
    block_table[used] = perm
    k_cache = torch.randn(num_pages, PAGE, h_kv, 576, device="cuda", dtype=dtype) / 10
    q = torch.randn(b, s_q, h_q, 576, device="cuda", dtype=dtype) / 10
    return q, k_cache, block_table, seqlens, nblk


def rel_err(x, ref):
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


class Ours:
    name = "flashmla_ops"

    def __init__(self, q, k_cache, block_table, seqlens, causal, scale, share=None):
        b, s_q, h_q, _ = q.shape
        h_kv = k_cache.shape[2]
        if share is not None:  # another layer of the same step: the step's metadata
            meta, num_splits = share.args[5], share.args[6]
        else:
            meta, num_splits = flashmla_ops.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
        self.args = (q, k_cache, block_table, seqlens, 512, meta, num_splits, scale, causal)
        self.out = torch.empty(b, s_q, h_q, 512, dtype=q.dtype, device="cuda")
        self.lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device="cuda")

    def __call__(self):
        torch.ops.flashmla.mla_decode_out(*self.args, self.out, self.lse)
        return self.out


class OursInvariant(Ours):
    """flashmla_ops in its batch-invariant mode (get_mla_metadata(batch_invariant=True), the length bound
    taken from the block table's width, as a server would)."""

    name = "flashmla_ops_invariant"

    def __init__(self, q, k_cache, block_table, seqlens, causal, scale, share=None):
        super().__init__(q, k_cache, block_table, seqlens, causal, scale, share)
        if share is None:
            b, s_q, h_q, _ = q.shape
            h_kv = k_cache.shape[2]
            bound = block_table.size(1) * PAGE
            meta, num_splits = flashmla_ops.get_mla_metadata(
                seqlens, s_q * h_q // h_kv, h_kv, batch_invariant=True, max_seqlen_k=bound
            )
            self.args = (*self.args[:5], meta, num_splits, *self.args[7:])


class FlashMLA:
    name = "FlashMLA"

    def __init__(self, q, k_cache, block_table, seqlens, causal, scale, share=None):
        import flash_mla

        self.fm = flash_mla
        # Its metadata object is filled by the first call and reused: one per step, shared by the layers.
        self.meta = share.meta if share is not None else flash_mla.get_mla_metadata()[0]
        self.args = (q, k_cache, block_table, seqlens, 512, self.meta, None)
        self.kw = dict(softmax_scale=scale, causal=causal, use_legacy=True)

    def __call__(self):
        return self.fm.flash_mla_with_kvcache(*self.args, **self.kw)[0]


class FlashInfer:
    name = "FlashInfer"

    def __init__(self, q, k_cache, block_table, seqlens, causal, scale, share=None, kv_scale=None):
        import flashinfer

        b, s_q, h_q, _ = q.shape
        assert k_cache.shape[2] == 1, "FlashInfer MLA takes one kv head"
        # an e4m3 cache (bf16 q): its per-tensor scale, a host float, for both cache parts
        self.scales = {} if kv_scale is None else dict(ckv_scale=kv_scale, kpe_scale=kv_scale)
        self.q_nope = q[..., :512].reshape(b * s_q, h_q, 512)
        self.q_pe = q[..., 512:].reshape(b * s_q, h_q, 64)
        self.ckv = k_cache[:, :, 0, :512]
        self.kpe = k_cache[:, :, 0, 512:]
        self.shape = (b, s_q, h_q, 512)
        if share is not None:  # another layer of the same step: the same plan, other tensors
            self.w = share.w
            return
        nblk = (seqlens.long() + PAGE - 1) // PAGE
        used = torch.arange(block_table.shape[1], device="cuda")[None, :] < nblk[:, None]
        kv_indices = block_table[used].contiguous()
        kv_indptr = torch.zeros(b + 1, dtype=torch.int32, device="cuda")
        kv_indptr[1:] = torch.cumsum(nblk, 0).to(torch.int32)
        qo_indptr = torch.arange(b + 1, dtype=torch.int32, device="cuda") * s_q
        self.ws = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        self.w = flashinfer.mla.BatchMLAPagedAttentionWrapper(self.ws, backend="fa3")
        self.w.plan(
            qo_indptr,
            kv_indptr,
            kv_indices,
            seqlens,
            h_q,
            512,
            64,
            PAGE,
            causal,
            scale,
            q.dtype,
            k_cache.dtype,
        )

    def __call__(self):
        return self.w.run(self.q_nope, self.q_pe, self.ckv, self.kpe, **self.scales).view(self.shape)


class TorchPadded:
    """What a user without a kernel writes: gather pages into a padded batch, two bmm, masked softmax."""

    name = "torch"

    def __init__(self, q, k_cache, block_table, seqlens, causal, scale):
        self.q, self.k, self.bt, self.seqlens, self.causal, self.scale = (
            q,
            k_cache,
            block_table,
            seqlens,
            causal,
            scale,
        )

    def __call__(self):
        q, k = self.q, self.k
        b, s_q, h_q, d = q.shape
        kv = k[self.bt.long()].view(b, -1, d)  # [b, max_blocks*64, 576] (h_kv == 1)
        s = torch.einsum("bshd,bkd->bshk", q.float(), kv.float()) * self.scale
        pos = torch.arange(kv.shape[1], device="cuda")
        lim = self.seqlens[:, None].long() - (s_q - 1 - torch.arange(s_q, device="cuda"))[None, :] * int(
            self.causal
        )
        mask = pos[None, None, :] >= lim[:, :, None]
        s = s.masked_fill(mask[:, :, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1)
        return torch.einsum("bshk,bkd->bshd", p, kv[..., :512].float()).to(q.dtype)


def bench(fn):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # µs


def graph_us(impl, q, k_cache, block_table, seqlens, causal, scale, min_bytes=256 << 20, max_layers=64):
    """Time per call inside a CUDA graph of one decode step: one call per layer, each layer its own cache and
    queries (copies of the given ones), enough layers to read ``min_bytes``, so no call finds its pages in L2.
    """
    per_layer = k_cache.numel() * k_cache.element_size() + q.numel() * q.element_size()
    layers = max(4, min(max_layers, -(-min_bytes // per_layer)))
    first = impl(q, k_cache, block_table, seqlens, causal, scale)
    calls = [first] + [
        impl(q.clone(), k_cache.clone(), block_table, seqlens, causal, scale, share=first)
        for _ in range(layers - 1)
    ]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (peers fill their metadata on the first call)
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    us = bench(graph.replay) / layers
    del graph, calls
    return us, layers


def host_us(fn, n=200):
    """Host time per call when calls are queued back to back (a lower bound on the latency the GPU sees
    when it is idle: with do_bench, a host slower than the kernels shows up in the measured time)."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def workspace_report(dtype):
    """Bytes a decode call allocates beyond its inputs (measured with the caching allocator's peak)."""
    rows = []
    for b in (128, 16384):
        s_k = 4096 if b == 128 else 256
        q, k_cache, block_table, seqlens, _ = make_case(b, 1, 128, s_k, False, dtype)
        for impl in (Ours, FlashMLA):
            try:
                f = impl(q, k_cache, block_table, seqlens, True, 576**-0.5)
            except Exception as e:  # peer missing
                rows.append(dict(b=b, impl=impl.name, bytes=None, note=f"{type(e).__name__}: {e}"[:120]))
                continue
            f()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            f()
            torch.cuda.synchronize()
            rows.append(dict(b=b, impl=impl.name, bytes=torch.cuda.max_memory_allocated() - base))
        del q, k_cache
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8 representative rows instead of the full sweep")
    ap.add_argument("--small", action="store_true", help="only the sweep's small-batch rows (b <= 32)")
    ap.add_argument("--small-b", action="store_true", help="b = 1, 2, 4 x h_q 16, 128 x s_k 1k, 8k, 32k")
    ap.add_argument(
        "--rows", default=None, help='rows "b,s_q,h_q,s_k,varlen;..." (varlen 0/1) instead of a preset'
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument(
        "--only-ours", action="store_true", help="time flashmla_ops alone (A/B runs), no workspace report"
    )
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument(
        "--peers", default="FlashMLA,FlashInfer", help="comma-separated peers to run (FlashMLA, FlashInfer)"
    )
    ap.add_argument(
        "--graph", action="store_true", help="also time each call in CUDA-graph replay of a multi-layer step"
    )
    ap.add_argument(
        "--batch-invariant",
        action="store_true",
        help="also time flashmla_ops's batch-invariant mode (ratio_invariant: default time / its time)",
    )
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    torch.manual_seed(0)
    peers = [p for p in (FlashMLA, FlashInfer) if p.name in args.peers.split(",")]
    impls = [Ours, *([OursInvariant] if args.batch_invariant else []), *peers]
    impls += [] if args.no_torch else [TorchPadded]
    if args.only_ours:
        impls = [Ours]
    # Without .git (an exported tree), FLASHMLA_COMMIT names the commit.
    commit = os.environ.get("FLASHMLA_COMMIT", "")
    if not commit:
        try:
            git = ["git", "rev-parse", "--short", "HEAD"]
            commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = ""
    info = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        commit=commit or "unknown",
        dtype=args.dtype,
        graph=args.graph,
    )
    print(json.dumps(info))
    results = []
    if args.rows:
        rows = [tuple(int(x) for x in r.split(",")) for r in args.rows.split(";") if r]
        rows = [(b, s_q, h_q, s_k, bool(v)) for b, s_q, h_q, s_k, v in rows]
    elif args.quick:
        rows = QUICK
    elif args.small:
        rows = [r for r in SWEEP if r[0] <= 32]
    else:
        rows = SMALL_B if args.small_b else SWEEP
    for b, s_q, h_q, s_k, varlen in rows:
        causal = True
        q, k_cache, block_table, seqlens, nblk = make_case(b, s_q, h_q, s_k, varlen, dtype)
        total = int(seqlens.sum())
        flops = 2 * s_q * total * h_q * (576 + 512)
        nbytes = 2 * (total * 576 + b * s_q * h_q * 576 + b * s_q * h_q * 512)
        scale = 576**-0.5
        meta, ns = flashmla_ops.get_mla_metadata(seqlens, s_q * h_q, 1)
        ref, _ = mla_decode_reference(q, k_cache, block_table, seqlens, 512, meta, ns, scale, causal)
        row = dict(b=b, s_q=s_q, h_q=h_q, s_k=s_k, varlen=varlen, flops=flops, bytes=nbytes)
        for impl in impls:
            if impl is TorchPadded and b * int(nblk.max()) * PAGE * s_q * h_q * 4 > 8 << 30:
                continue
            try:
                f = impl(q, k_cache, block_table, seqlens, causal, scale)
                err = rel_err(f(), ref)
                us = bench(f)
                host = host_us(f)
            except Exception as e:  # a peer that is not installed or refuses the shape
                row[impl.name] = dict(error=f"{type(e).__name__}: {e}"[:200])
                continue
            row[impl.name] = dict(
                us=us, gbps=nbytes / us / 1e3, tflops=flops / us / 1e6, rel_err=err, host_us=host
            )
            if args.graph and impl is not TorchPadded:
                try:
                    g_us, layers = graph_us(impl, q, k_cache, block_table, seqlens, causal, scale)
                    row[impl.name].update(graph_us=g_us, graph_layers=layers)
                except Exception as e:  # e.g. out of memory for the layer copies
                    row[impl.name]["graph_error"] = f"{type(e).__name__}: {e}"[:200]
                torch.cuda.empty_cache()
        results.append(row)
        peer_names = ("FlashMLA", "FlashInfer")
        for key, suffix in (("us", ""), ("graph_us", "_graph")):
            ours = row.get("flashmla_ops", {}).get(key)
            peers = {k: v[key] for k, v in row.items() if k in peer_names and key in v}
            if ours:
                row[f"ratio_vs_fastest_peer{suffix}"] = min(peers.values()) / ours if peers else None
                for k, v in peers.items():
                    row[f"ratio_vs_{k}{suffix}"] = v / ours
        for key, suffix in (("us", ""), ("graph_us", "_graph")):
            inv = row.get(OursInvariant.name, {}).get(key)
            if inv and row.get("flashmla_ops", {}).get(key):
                row[f"ratio_invariant{suffix}"] = row["flashmla_ops"][key] / inv
        del q, k_cache, ref
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)

    ws = [] if args.only_ours else workspace_report(dtype)
    # Final table (the reply shows the end of the output).
    print("\nworkspace bytes per call (h_q=128, s_q=1):")
    for r in ws:
        print(f"  b={r['b']:>6} {r['impl']:<13} {r['bytes'] if r['bytes'] is not None else r.get('note')}")
    hdr = f"{'b':>4} {'sq':>2} {'hq':>4} {'sk':>6} {'var':>3} | {'ours us':>8} {'GB/s':>6} {'TF/s':>5} |"
    hdr += f" {'FlashMLA':>8} {'FlashInf':>8} {'torch':>8} | {'r/FM':>5} {'r/FI':>5} {'r/best':>6}"
    print("\n" + hdr)
    for r in results:
        o = r.get("flashmla_ops", {})
        nan = float("nan")
        line = (
            _row_key(r) + f"{o.get('us', nan):8.1f} {o.get('gbps', nan):6.0f} {o.get('tflops', nan):5.0f} |"
        )
        line += f" {_us(r, 'FlashMLA')} {_us(r, 'FlashInfer')} {_us(r, 'torch')} |"
        print(line + _ratios(r, ""))
    ratios = [r["ratio_vs_fastest_peer"] for r in results if r.get("ratio_vs_fastest_peer")]
    if ratios:
        geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"min ratio vs fastest peer: {min(ratios):.3f}; geomean {geomean:.3f}")
    if args.graph:
        print("\nCUDA-graph replay (µs per call, one call per layer in one graph):")
        head = f"{'b':>4} {'sq':>2} {'hq':>4} {'sk':>6} {'var':>3} | {'ours':>8} {'FlashMLA':>8}"
        print(head + f" {'FlashInf':>8} | {'r/FM':>5} {'r/FI':>5} {'r/best':>6} | layers")
        for r in results:
            line = _row_key(r) + " ".join(
                _us(r, n, "graph_us") for n in ("flashmla_ops", "FlashMLA", "FlashInfer")
            )
            print(
                line
                + " |"
                + _ratios(r, "_graph")
                + f" | {r.get('flashmla_ops', {}).get('graph_layers', '-')}"
            )
        g_ratios = [r["ratio_vs_fastest_peer_graph"] for r in results if r.get("ratio_vs_fastest_peer_graph")]
        if g_ratios:
            geomean = math.exp(sum(map(math.log, g_ratios)) / len(g_ratios))
            print(f"graph: min ratio vs fastest peer: {min(g_ratios):.3f}; geomean {geomean:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, rows=results, workspace=ws), f, indent=1)
    if args.png:
        plot(results, args.png, info)


def _row_key(r):
    return f"{r['b']:>4} {r['s_q']:>2} {r['h_q']:>4} {r['s_k']:>6} {'y' if r['varlen'] else 'n':>3} | "


def _us(r, name, key="us"):
    v = r.get(name, {})
    return f"{v[key]:8.1f}" if key in v else f"{'-':>8}"


def _ratios(r, suffix):
    """Ratios to FlashMLA, FlashInfer and the faster of them (columns r/FM r/FI r/best)."""
    cells = []
    for name in ("FlashMLA", "FlashInfer", "fastest_peer"):
        v = r.get(f"ratio_vs_{name}{suffix}")
        cells.append(f"{v:5.2f}" if v else f"{'-':>5}")
    return f" {cells[0]} {cells[1]} {cells[2]:>6}"


def plot(results, path, info):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["flashmla_ops", "FlashMLA", "FlashInfer"]
    labels = [f"b{r['b']} sq{r['s_q']} h{r['h_q']} k{r['s_k']}{' v' if r['varlen'] else ''}" for r in results]
    fig, ax = plt.subplots(figsize=(max(8, len(results) * 0.5), 5))
    w = 0.27
    for i, n in enumerate(names):
        ys = [r.get(n, {}).get("us", 0) for r in results]
        ax.bar([x + (i - 1) * w for x in range(len(results))], ys, w, label=n)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels(labels, rotation=75, fontsize=7)
    ax.set_ylabel("µs (median, lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"MLA decode, {info['device']}, {info['dtype']}, commit {info['commit']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
