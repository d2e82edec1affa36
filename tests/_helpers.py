"""Shared test helpers: input generators and independent oracles (no flashmla_ops code is reused here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

D_QK = 576
D_V = 512
PAGE = 64
PAD = 2147480000  # garbage block-table entry that must never be dereferenced


@dataclass
class DecodeInputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    seqlens: list[int]
    h_kv: int

    def args(self, meta: torch.Tensor, num_splits: torch.Tensor, scale: float, causal: bool) -> tuple:
        """Positional arguments of torch.ops.flashmla.mla_decode."""
        return (
            self.q,
            self.k_cache,
            self.block_table,
            self.cache_seqlens,
            D_V,
            meta,
            num_splits,
            scale,
            causal,
        )


def make_inputs(
    seqlens: list[int],
    s_q: int = 1,
    h_q: int = 16,
    h_kv: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    *,
    seed: int = 0,
    extra_cols: int = 2,
    unused_pages: int = 2,
    permute: bool = True,
    poison: bool = True,
    device: str | torch.device = "cpu",
) -> DecodeInputs:
    """Random (never zero) decode inputs with a paged cache.

    * pages are handed out in a random order (``permute``) and ``unused_pages`` extra pages exist;
    * ``block_table`` has ``extra_cols`` more columns than needed, padded with ``PAD``;
    * with ``poison``, every cache row past a request's length (tail of its last page) and every unused
      page is NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    b = len(seqlens)
    npages = [math.ceil(s / PAGE) for s in seqlens]
    total_pages = sum(npages) + unused_pages
    cols = max(npages + [0]) + extra_cols
    order = torch.randperm(total_pages, generator=gen) if permute else torch.arange(total_pages)
    block_table = torch.full((b, max(cols, 1)), PAD, dtype=torch.int32)
    used = torch.zeros(total_pages, dtype=torch.bool)
    nxt = 0
    k_cache = _nonzero_randn((total_pages, PAGE, h_kv, D_QK), gen).to(dtype)
    for i, (s, n) in enumerate(zip(seqlens, npages, strict=True)):
        for j in range(n):
            page = int(order[nxt])
            nxt += 1
            block_table[i, j] = page
            used[page] = True
            if poison and j == n - 1 and s % PAGE:
                k_cache[page, s % PAGE :] = float("nan")
    if poison:
        k_cache[~used] = float("nan")
    q = _nonzero_randn((b, s_q, h_q, D_QK), gen).to(dtype)
    dev = torch.device(device)
    return DecodeInputs(
        q=q.to(dev),
        k_cache=k_cache.to(dev),
        block_table=block_table.to(dev),
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=dev),
        seqlens=list(seqlens),
        h_kv=h_kv,
    )


def _nonzero_randn(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    return torch.where(x.abs() < 1e-3, 1e-3, x)


def loop_oracle(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seqlens: list[int],
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 MLA decode with explicit loops: per request, per key (through the block table), per query
    token and per query head. Returns (out float64 [b, s_q, h_q, 512], lse float64 [b, h_q, s_q])."""
    q64 = q.detach().cpu().double()
    k64 = k_cache.detach().cpu().double()
    table = block_table.detach().cpu().tolist()
    b, s_q, h_q, _ = q64.shape
    h_kv = k64.shape[2]
    group = h_q // h_kv
    out = torch.zeros(b, s_q, h_q, D_V, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        length = seqlens[i]
        rows = [k64[table[i][t // PAGE], t % PAGE] for t in range(length)]  # each [h_kv, 576]
        if not rows:
            continue
        keys = torch.stack(rows)  # [length, h_kv, 576]
        for s in range(s_q):
            visible = length - (s_q - 1 - s) if causal else length
            if visible <= 0:
                continue
            for h in range(h_q):
                kh = keys[:visible, h // group]  # [visible, 576]
                logits = (kh @ q64[i, s, h]) * scale
                m = logits.max()
                w = torch.exp(logits - m)
                z = w.sum()
                lse[i, h, s] = m + torch.log(z)
                out[i, s, h] = (w[:, None] * kh[:, :D_V]).sum(0) / z
    return out, lse


def scheduler_spec(seqlens: list[int], num_parts: int) -> tuple[list[list[int]], list[int]]:
    """The scheduler specification, written literally: parts filled piece by piece with Python ints."""
    fixed = 5
    nblk = [max(1, -(-max(s, 0) // PAGE)) for s in seqlens]
    cap = -(-sum(n + fixed for n in nblk) // num_parts) + fixed
    parts_of: list[list[int]] = [[] for _ in seqlens]
    spans = []  # (begin_req, begin_blk, end_req, end_blk) per part with work
    req, blk = 0, 0
    for p in range(num_parts):
        if req == len(seqlens):
            break
        begin, room = (req, blk), cap
        while req < len(seqlens):
            left = nblk[req] - blk
            if fixed + left <= room:  # the whole rest of the request fits
                room -= fixed + left
                parts_of[req].append(p)
                end = (req, nblk[req])
                req, blk = req + 1, 0
            else:
                if room > fixed:  # cut it: as many blocks as fit
                    parts_of[req].append(p)
                    blk += room - fixed
                    end = (req, blk)
                break
        spans.append((*begin, *end))
    assert req == len(seqlens), "work left after the last part"
    meta = []
    for p, (bq, bb, eq, eb) in enumerate(spans):
        n_b, n_e = len(parts_of[bq]), len(parts_of[eq])
        meta.append([bq, bb, eq, eb, parts_of[bq].index(p), int(n_b > 1), int(n_e > 1), 0])
    meta += [[0, 0, -1, 0, 0, 0, 0, 0]] * (num_parts - len(spans))
    num_splits = [0]
    for owners in parts_of:
        num_splits.append(num_splits[-1] + (len(owners) if len(owners) > 1 else 0))
    return meta, num_splits


def schedule_args(inp: DecodeInputs, num_parts: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_scheduler_metadata, num_splits) for ``inp`` through the op."""
    s_q, h_q = inp.q.shape[1], inp.q.shape[2]
    return torch.ops.flashmla.get_mla_metadata(inp.cache_seqlens, s_q * h_q // inp.h_kv, inp.h_kv, num_parts)
