"""Pure-PyTorch reference implementations of the ``torch.ops.flashmla`` ops.

They are registered below as the ``cpu`` kernels of the ops, so the ops (and ``opcheck``, ``torch.compile``)
work on any machine. They are written with device-agnostic torch code, so the GPU tests also call them on
CUDA tensors as the oracle for the CUDA kernels:

* :func:`get_mla_metadata_reference` is the specification of the tile scheduler, and
  :func:`get_mla_metadata_batch_invariant_reference` of its batch-invariant variant; the CUDA scheduler
  kernels must produce bit-identical output.
* :func:`mla_decode_reference` / :func:`mla_decode_out_reference` compute MLA decode attention with fp32
  accumulation.
* :func:`mla_decode_fp8_reference` / :func:`mla_decode_fp8_out_reference` do the same over an FP8 KV cache
  (per-tensor e4m3 or DeepSeek V3.2's 656-byte format), dequantising the pages they use to float32 first
  (``flashmla_ops.fp8``).

Unlike the fakes and the CUDA launchers, the references *do* read values on the host: the scheduler walks
the ``cache_seqlens`` list; the decode reads ``cache_seqlens`` and ``block_table`` (one host sync) to size its
work and to reject out-of-range values. That is fine for a CPU kernel and for a test oracle, but it makes
these functions unsuitable for CUDA-graph capture.

There is no autograd support (decode only).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable

import torch

from ._invariant import ctas_per_part, invariant_chunks
from ._validation import (
    HEAD_DIM_V,
    META_FLAG_BATCH_INVARIANT,
    MSG_BAD_PAGE,
    MSG_NEGATIVE_SEQLEN,
    MSG_TOO_FEW_BLOCKS,
    PAGE_SIZE,
    TILE_SCHEDULER_METADATA_SIZE,
    FlashMLAInputError,
    check_get_mla_metadata,
    check_get_mla_metadata_batch_invariant,
    check_kv_fp8_format,
    check_mla_decode,
    check_mla_decode_fp8,
    check_mla_decode_fp8_out,
    check_mla_decode_out,
)
from .fp8 import dequantize_rows

__all__ = [
    "FIXED_OVERHEAD",
    "get_mla_metadata_batch_invariant_reference",
    "get_mla_metadata_reference",
    "mla_decode_fp8_out_reference",
    "mla_decode_fp8_reference",
    "mla_decode_out_reference",
    "mla_decode_reference",
]

#: Cost, in 64-token "block units", charged per request for its prologue/epilogue
#: (csrc/kernels/params.h: kFixedOverhead).
FIXED_OVERHEAD = 5

# Rough upper bound, in bytes, of the temporaries of one batch chunk of the decode reference.
_CHUNK_BYTES = 256 * 2**20


# ---- Scheduler ------------------------------------------------------------------------------------------
def _request_blocks(cache_seqlens: torch.Tensor) -> list[int]:
    """Blocks of each request as both schedulers count them: ``max(1, ceil(max(seqlen, 0) / 64))`` (a request
    of length 0 still gets one, empty, block so that its output is written). Reads the lengths on the host."""
    return [max(1, -(-max(s, 0) // PAGE_SIZE)) for s in cache_seqlens.tolist()]


def _scheduler_outputs(
    records: list[list[int]], num_splits: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tile_scheduler_metadata [parts, 8], num_splits [b + 1])``, int32 on ``device``, from host lists."""
    meta = torch.tensor(records, dtype=torch.int32).reshape(len(records), TILE_SCHEDULER_METADATA_SIZE)
    return meta.to(device), torch.tensor(num_splits, dtype=torch.int32).to(device)


def get_mla_metadata_reference(
    cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int, num_sm_parts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference tile scheduler: fill ``num_sm_parts`` parts greedily with the batch's KV blocks.

    Args:
        cache_seqlens: int32 ``[b]``, contiguous, b >= 1. Negative lengths count as 0.
        num_q_tokens_per_head_k: ``s_q * h_q // h_kv`` (>= 1). Validated only; it does not change the result.
        num_heads_k: ``h_kv`` (>= 1). Validated only; it does not change the result.
        num_sm_parts: number of parts P (>= 1).

    Returns:
        ``(tile_scheduler_metadata, num_splits)`` on ``cache_seqlens``'s device:

        * ``tile_scheduler_metadata``: int32 ``[P, 8]``, one record per part (layout in
          ``csrc/kernels/params.h``).
        * ``num_splits``: int32 ``[b + 1]``, exclusive prefix sum of the per-request split counts.

    The rule, with ``F = FIXED_OVERHEAD = 5``:

    * request i has ``nblk_i = max(1, ceil(max(seqlen_i, 0) / 64))`` blocks; a piece of a request costs
      ``F`` plus its blocks; ``total = sum(nblk_i + F)``; every part has a capacity ``ceil(total / P) + F``;
    * parts are filled in order, each starting where the previous one stopped: the next piece (a whole
      request, or the rest of a cut one) is taken whole while its cost fits in the room left; the first piece
      that does not fit is cut to ``room - F`` blocks if that is >= 1 (the part is then full), else the part
      ends;
    * part p's record is ``[begin_req, begin_block, end_req, end_block, split index of begin_req's piece,
      begin_req split?, end_req split?, 0]``; parts left over get ``[0, 0, -1, 0, 0, 0, 0, 0]``.

    A part that ends with a cut is charged the full capacity (its continuation pays one ``F`` again), any
    other part but the last at least ``ceil(total / P)``, so P parts always suffice.
    With uniform lengths and at most a few requests per part nothing is split (no partials to combine).
    Reads the lengths on the host (the CUDA kernel does the same walk on the device).
    """
    check_get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts)
    nblk = _request_blocks(cache_seqlens)
    b = len(nblk)
    # ends[i]: cost of requests 0..i, so whole requests r+1..j cost ends[j] - ends[r].
    ends = list(itertools.accumulate(n + FIXED_OVERHEAD for n in nblk))
    cap = -(-ends[-1] // num_sm_parts) + FIXED_OVERHEAD

    records: list[list[int]] = []
    pieces = [1] * b
    req, blk, split = 0, 0, 0  # the next piece: request `req` from block `blk`, its piece number `split`
    while req < b:
        assert len(records) < num_sm_parts, "the greedy fill always fits in num_sm_parts parts"
        begin = (req, blk, split)
        first_cost = FIXED_OVERHEAD + nblk[req] - blk
        if first_cost > cap:  # cut the first piece itself
            end_req, end_blk = req, blk + cap - FIXED_OVERHEAD
            req, blk, split = req, end_blk, split + 1
        else:
            room = cap - first_cost
            last = bisect.bisect_right(ends, ends[req] + room) - 1  # last request taken whole
            room -= ends[last] - ends[req]
            if last + 1 < b and room > FIXED_OVERHEAD:
                end_req, end_blk = last + 1, room - FIXED_OVERHEAD
                req, blk, split = last + 1, end_blk, 1
            else:
                end_req, end_blk = last, nblk[last]
                req, blk, split = last + 1, 0, 0
        if split > 0:
            pieces[req] = split + 1
        records.append([begin[0], begin[1], end_req, end_blk, begin[2], 0, 0, 0])
    for rec in records:
        rec[5] = int(pieces[rec[0]] > 1)
        rec[6] = int(pieces[rec[2]] > 1)
    records += [[0, 0, -1, 0, 0, 0, 0, 0]] * (num_sm_parts - len(records))
    num_splits = [0, *itertools.accumulate(n if n > 1 else 0 for n in pieces)]

    return _scheduler_outputs(records, num_splits, cache_seqlens.device)


# ---- Batch-invariant scheduler -----------------------------------------------------------------------
def get_mla_metadata_batch_invariant_reference(
    cache_seqlens: torch.Tensor,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    num_sm_parts: int,
    num_work_parts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference batch-invariant scheduler (``flashmla::get_mla_metadata_batch_invariant``).

    Every request is cut into the chunks of ``flashmla_ops._invariant.invariant_chunks``, which depend only on
    its own length and the head geometry; a request with more than one chunk leaves one partial per chunk (the
    combine merges them in chunk order), one with a single chunk is written whole. The chunks, in (request,
    chunk) order, each cost ``FIXED_OVERHEAD`` plus its blocks; chunk i goes to part ``floor(start_i / W)`` of
    the first ``num_work_parts`` parts, ``start_i`` its offset in that cost space and ``W = ceil(total /
    num_work_parts)``. The batch therefore decides only which part runs a chunk, never where a request is cut
    or how its pieces are merged. Parts ``num_work_parts .. num_sm_parts - 1`` are empty: they exist so that
    the split-partials workspace (``2 * num_sm_parts`` pieces) holds every chunk.

    Records as :func:`get_mla_metadata_reference`'s, with field 4 the chunk index of the part's first
    chunk and field 7 = 1 (batch-invariant: the decode kernels end a segment at every chunk boundary and
    store chunk k of a request as its partial k) in every record, empty ones included.
    """
    check_get_mla_metadata_batch_invariant(
        cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts, num_work_parts
    )
    ctas = ctas_per_part(num_q_tokens_per_head_k, num_heads_k)
    nblk = _request_blocks(cache_seqlens)
    b = len(nblk)
    cuts = [invariant_chunks(n, ctas) for n in nblk]
    cost = [n + c[1] * FIXED_OVERHEAD for n, c in zip(nblk, cuts, strict=True)]
    ends = list(itertools.accumulate(cost))
    width = -(-ends[-1] // num_work_parts)

    def first_item(target: int) -> tuple[int, int]:
        """The first chunk (request, index) whose cost-space start is >= target; (b, 0) if none."""
        r = bisect.bisect_right(ends, target)  # smallest r with ends[r] > target
        if r >= b:
            return b, 0
        start = ends[r] - cost[r]
        if target <= start:
            return r, 0
        k = -(-(target - start) // (cuts[r][0] + FIXED_OVERHEAD))
        return (r, k) if k < cuts[r][1] else (r + 1, 0)

    empty = [0, 0, -1, 0, 0, 0, 0, META_FLAG_BATCH_INVARIANT]
    records = []
    for part in range(num_sm_parts):
        if part >= num_work_parts:
            records.append(empty)
            continue
        first = first_item(part * width)
        nxt = first_item((part + 1) * width) if part + 1 < num_work_parts else (b, 0)
        if first >= nxt:
            records.append(empty)
            continue
        if nxt[1] > 0:  # the next part starts inside request nxt[0]
            end_req, end_blk = nxt[0], nxt[1] * cuts[nxt[0]][0]
        else:
            end_req, end_blk = nxt[0] - 1, nblk[nxt[0] - 1]
        records.append(
            [
                first[0],
                first[1] * cuts[first[0]][0],
                end_req,
                end_blk,
                first[1],
                int(cuts[first[0]][1] > 1),
                int(cuts[end_req][1] > 1),
                META_FLAG_BATCH_INVARIANT,
            ]
        )
    num_splits = [0, *itertools.accumulate(c[1] if c[1] > 1 else 0 for c in cuts)]
    return _scheduler_outputs(records, num_splits, cache_seqlens.device)


# ---- Decode ---------------------------------------------------------------------------------------------
def _check_values(
    cache_seqlens: torch.Tensor, block_table: torch.Tensor, num_pages: int
) -> tuple[list[int], torch.Tensor]:
    """Value checks (host sync). Returns the seqlens as a list and the number of used pages per request."""
    seqlens = cache_seqlens.tolist()
    cols = block_table.size(1)
    for i, s in enumerate(seqlens):
        if s < 0:
            raise FlashMLAInputError(MSG_NEGATIVE_SEQLEN.format(i=i, seqlen=s))
        needed = -(-s // PAGE_SIZE)
        if needed > cols:
            raise FlashMLAInputError(MSG_TOO_FEW_BLOCKS.format(i=i, seqlen=s, needed=needed, cols=cols))
    used_pages = torch.div(cache_seqlens.to(torch.int64) + (PAGE_SIZE - 1), PAGE_SIZE, rounding_mode="floor")
    used = torch.arange(cols, device=block_table.device) < used_pages[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0].tolist())
        raise FlashMLAInputError(
            MSG_BAD_PAGE.format(i=i, j=j, page=int(block_table[i, j]), seqlen=seqlens[i], num_pages=num_pages)
        )
    return seqlens, used_pages


def _decode_into(
    out: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    dequantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Write attention output into ``out`` [b, s_q, h_q, 512] and ``lse`` [b, h_q, s_q], chunk by chunk.

    ``dequantize`` (FP8 caches) turns gathered cache rows ``[..., k_cache.size(-1)]`` into float32
    ``[..., 576]``; only the pages a chunk uses are dequantised, never the whole cache."""
    b, s_q, h_q, d = q.shape
    num_pages, _, h_kv, _ = k_cache.shape
    group = h_q // h_kv
    rows = s_q * group  # query rows per (request, kv head)
    device = q.device
    seqlens, used_pages = _check_values(cache_seqlens, block_table, num_pages)

    # Peak bytes per key position of one request: the gathered k (stored bytes + 2 fp32 copies while it is
    # converted and masked, + 2 more while FP8 is dequantised) and up to 4 fp32 copies of the logits block
    # (rows x keys per kv head).
    stored = k_cache.size(-1) * k_cache.element_size()
    per_key = h_kv * (stored + d * (8 if dequantize is None else 16)) + 4 * 4 * h_kv * rows
    r0 = 0
    while r0 < b:
        # Grow the chunk while its padded key length times its size fits the budget.
        r1 = r0 + 1
        max_len = seqlens[r0]
        while r1 < b:
            cand = max(max_len, seqlens[r1])
            cand_pad = -(-cand // PAGE_SIZE) * PAGE_SIZE
            if (r1 + 1 - r0) * cand_pad * per_key > _CHUNK_BYTES:
                break
            max_len = cand
            r1 += 1
        _decode_chunk(
            out[r0:r1],
            lse[r0:r1],
            q[r0:r1],
            k_cache,
            block_table[r0:r1],
            cache_seqlens[r0:r1],
            used_pages[r0:r1],
            -(-max_len // PAGE_SIZE),
            softmax_scale,
            causal,
            group,
            device,
            dequantize,
        )
        r0 = r1


def _decode_chunk(
    out: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    used_pages: torch.Tensor,
    num_pages_max: int,
    softmax_scale: float,
    causal: bool,
    group: int,
    device: torch.device,
    dequantize: Callable[[torch.Tensor], torch.Tensor] | None,
) -> None:
    bc, s_q, h_q, d = q.shape
    h_kv = k_cache.size(2)
    if num_pages_max == 0:  # every request of the chunk is empty
        out.zero_()
        lse.fill_(float("inf"))
        return
    length = num_pages_max * PAGE_SIZE
    f32 = torch.float32

    # Gather the used pages; entries past a request's last page may be garbage: never index with them.
    page_idx = torch.arange(num_pages_max, device=device)
    pages = block_table[:, :num_pages_max].to(torch.int64)
    pages = torch.where(page_idx < used_pages[:, None], pages, 0)
    k = k_cache[pages]  # [bc, P, 64, h_kv, 576] (FP8: [..., 576] e4m3 or [..., 656] bytes)
    k = (k.to(f32) if dequantize is None else dequantize(k)).reshape(bc, length, h_kv, d)  # [bc, L, h_kv, d]
    # Zero every row past seqlen (NaN there must not leak through 0 * NaN in the matmuls).
    seqlens = cache_seqlens.to(torch.int64)
    key_pos = torch.arange(length, device=device)
    key_valid = key_pos < seqlens[:, None]  # [bc, L]
    k = torch.where(key_valid[:, :, None, None], k, 0.0)
    k = k.permute(0, 2, 1, 3)  # [bc, h_kv, L, 576]
    v = k[..., :HEAD_DIM_V]  # [bc, h_kv, L, 512]

    # Rows are (token s, head j of the group): q [bc, s_q, h_kv, group, 576] -> [bc, h_kv, rows, 576]
    qf = q.to(f32).reshape(bc, s_q, h_kv, group, d).permute(0, 2, 1, 3, 4).reshape(bc, h_kv, s_q * group, d)
    logits = torch.matmul(qf, k.transpose(-1, -2)) * softmax_scale  # [bc, h_kv, rows, L]
    logits = logits.view(bc, h_kv, s_q, group, length)

    # Token s sees keys [0, seqlen - (s_q - 1 - s)) when causal, [0, seqlen) otherwise.
    visible = seqlens[:, None].expand(bc, s_q)
    if causal:
        visible = visible - (s_q - 1 - torch.arange(s_q, device=device))
    key_mask = key_pos < visible[:, :, None]  # [bc, s_q, L]
    logits = logits.masked_fill(~key_mask[:, None, :, None, :], float("-inf"))

    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)  # empty rows: avoid -inf - -inf
    p = torch.exp(logits - row_max)
    del logits
    denom = p.sum(dim=-1, keepdim=True)  # 0 for a row with no visible key
    o = torch.matmul(p.view(bc, h_kv, s_q * group, length), v).view(bc, h_kv, s_q, group, HEAD_DIM_V)
    o = o / torch.where(denom == 0, 1.0, denom)
    row_lse = torch.where(denom == 0, float("inf"), torch.log(denom) + row_max).squeeze(-1)

    out.copy_(o.permute(0, 2, 1, 3, 4).reshape(bc, s_q, h_q, HEAD_DIM_V))  # [bc, s_q, h_kv, group, 512]
    lse.copy_(row_lse.permute(0, 1, 3, 2).reshape(bc, h_q, s_q))  # [bc, h_kv, s_q, group] -> [bc, h_q, s_q]


_DECODE_DOC_ARGS = """
    Args:
        q: ``[b, s_q, h_q, 576]`` bfloat16 or float16, last dim contiguous.
        k_cache: ``[num_pages, 64, h_kv, 576]``, q's dtype, last dim contiguous; v is ``k_cache[..., :512]``.
        block_table: int32 ``[b, max_blocks_per_seq]``; page j of request i is ``block_table[i, j]``. Only
            the first ``ceil(cache_seqlens[i] / 64)`` entries of a row are read; the rest may hold anything.
        cache_seqlens: int32 ``[b]``, contiguous: number of cached tokens of each request.
        head_dim_v: must be 512.
        tile_scheduler_metadata, num_splits: from ``get_mla_metadata``; shape-checked, not otherwise used.
        softmax_scale: scale applied to ``q . k`` before the softmax.
        causal: bottom-right-aligned causal mask over the s_q query tokens: token s sees the first
            ``seqlen - (s_q - 1 - s)`` keys. Same as non-causal when s_q == 1.

    Query head h attends with kv head ``h // (h_q // h_kv)``. A query row with no visible key gets
    ``out = 0`` and ``lse = +inf``. Accumulation is in fp32.

    Raises ``FlashMLAInputError`` for invalid shapes/dtypes/devices, and also (this function reads values)
    for a negative ``cache_seqlens[i]``, for ``ceil(cache_seqlens[i] / 64) > block_table.size(1)`` and for a
    used ``block_table`` entry outside ``[0, num_pages)``. The CUDA kernel never reads values on the host;
    for such a request it writes NaN to the request's ``out`` and ``lse`` instead.
"""


def mla_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, s_q, h_q, _ = check_mla_decode(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits
    )
    out = q.new_empty((b, s_q, h_q, head_dim_v))
    lse = q.new_empty((b, h_q, s_q), dtype=torch.float32)
    _decode_into(out, lse, q, k_cache, block_table, cache_seqlens, softmax_scale, causal)
    return out, lse


mla_decode_reference.__doc__ = (
    """Reference MLA decode. Returns ``(out [b, s_q, h_q, 512] in q's dtype, lse float32 [b, h_q, s_q])``,
    both contiguous; ``lse`` is the natural-log log-sum-exp of the scaled logits over the visible keys.
"""
    + _DECODE_DOC_ARGS
)


def mla_decode_out_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    out: torch.Tensor,
    lse: torch.Tensor,
    workspace: torch.Tensor | None = None,
) -> None:
    # The reference needs no scratch: `workspace` is only validated (same rules as the CUDA kernel's).
    check_mla_decode_out(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        head_dim_v,
        tile_scheduler_metadata,
        num_splits,
        out,
        lse,
        workspace,
    )
    _decode_into(out, lse, q, k_cache, block_table, cache_seqlens, softmax_scale, causal)


mla_decode_out_reference.__doc__ = (
    """Reference MLA decode, out-variant: writes ``out`` [b, s_q, h_q, 512] (q's dtype, last dim contiguous)
    and ``lse`` float32 [b, h_q, s_q] in place and returns None. ``workspace`` (optional, float32,
    contiguous, at least :func:`flashmla_ops.workspace_size` elements) is validated and otherwise unused.
"""
    + _DECODE_DOC_ARGS
)


# ---- FP8 KV cache: dequantise the used pages to float32, then the same decode ----------------------------
_FP8_DOC = """
    FP8 KV cache (``flashmla_ops.fp8``): ``k_cache`` is float8_e4m3fn ``[num_pages, 64, h_kv, 576]`` with
    ``k_scale`` a float32 tensor ``[1]`` on q's device (value = stored * k_scale), or uint8
    ``[num_pages, 64, h_kv, 656]`` (DeepSeek V3.2: 512 e4m3, 4 float32 scales, 64 bfloat16 RoPE values per
    token; any page stride, last dim contiguous) with ``k_scale`` None. The pages a request uses are
    dequantised to float32 and attended over exactly as by :func:`mla_decode_reference`. Cache rows past a
    request's length and unused pages may hold any bytes (NaN, garbage scales): they are never used.
"""


def _fp8_dequantizer(k_cache: torch.Tensor, k_scale: torch.Tensor | None) -> Callable:
    kv_format = check_kv_fp8_format(k_cache)
    return lambda raw: dequantize_rows(raw, kv_format, k_scale)


def mla_decode_fp8_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    k_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, s_q, h_q, _ = check_mla_decode_fp8(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, k_scale
    )
    out = q.new_empty((b, s_q, h_q, head_dim_v))
    lse = q.new_empty((b, h_q, s_q), dtype=torch.float32)
    dequantize = _fp8_dequantizer(k_cache, k_scale)
    _decode_into(out, lse, q, k_cache, block_table, cache_seqlens, softmax_scale, causal, dequantize)
    return out, lse


mla_decode_fp8_reference.__doc__ = (
    """Reference MLA decode over an FP8 KV cache. Returns ``(out [b, s_q, h_q, 512] in q's dtype, lse float32
    [b, h_q, s_q])``, as :func:`mla_decode_reference`.
"""
    + _FP8_DOC
    + _DECODE_DOC_ARGS
)


def mla_decode_fp8_out_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    k_scale: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    workspace: torch.Tensor | None = None,
) -> None:
    check_mla_decode_fp8_out(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        head_dim_v,
        tile_scheduler_metadata,
        num_splits,
        k_scale,
        out,
        lse,
        workspace,
    )
    dequantize = _fp8_dequantizer(k_cache, k_scale)
    _decode_into(out, lse, q, k_cache, block_table, cache_seqlens, softmax_scale, causal, dequantize)


mla_decode_fp8_out_reference.__doc__ = (
    """Reference MLA decode over an FP8 KV cache, out-variant: writes ``out`` and ``lse`` in place and returns
    None, as :func:`mla_decode_out_reference` (``workspace`` is validated and otherwise unused).
"""
    + _FP8_DOC
    + _DECODE_DOC_ARGS
)


# ---- Registration as the CPU kernels --------------------------------------------------------------------
torch.library.register_kernel("flashmla::get_mla_metadata", "cpu", get_mla_metadata_reference)
torch.library.register_kernel(
    "flashmla::get_mla_metadata_batch_invariant", "cpu", get_mla_metadata_batch_invariant_reference
)
torch.library.register_kernel("flashmla::mla_decode", "cpu", mla_decode_reference)
torch.library.register_kernel("flashmla::mla_decode_out", "cpu", mla_decode_out_reference)
torch.library.register_kernel("flashmla::mla_decode_fp8", "cpu", mla_decode_fp8_reference)
torch.library.register_kernel("flashmla::mla_decode_fp8_out", "cpu", mla_decode_fp8_out_reference)
