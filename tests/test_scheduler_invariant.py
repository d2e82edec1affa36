"""The batch-invariant scheduler (flashmla::get_mla_metadata_batch_invariant CPU kernel = reference) and
its public API: where a request is cut depends on nothing but its own length and the head geometry."""

from __future__ import annotations

import random

import pytest
import torch
from _helpers import PAGE

import flashmla_ops
from flashmla_ops import FlashMLAInputError
from flashmla_ops._invariant import invariant_chunks, invariant_max_pieces, invariant_target_chunks
from flashmla_ops.reference import FIXED_OVERHEAD

EMPTY = [0, 0, -1, 0, 0, 0, 0, 1]


def schedule(seqlens, q_rows=16, parts=132, work=132):
    sl = torch.tensor(seqlens, dtype=torch.int32)
    meta, splits = torch.ops.flashmla.get_mla_metadata_batch_invariant(sl, q_rows, 1, parts, work)
    assert meta.shape == (parts, 8) and meta.dtype == torch.int32
    assert splits.shape == (len(seqlens) + 1,) and splits.dtype == torch.int32
    return meta.tolist(), splits.tolist()


def segments(seqlens, meta, q_rows=16, with_part=False):
    """Every (request, first block, end block, piece index) segment the decode kernels run, as they walk
    the records: a part's blocks of each request, split at the request's chunk boundaries (``with_part``:
    the part index first)."""
    ctas = -(-q_rows // 64)
    nblk = [max(1, -(-max(s, 0) // PAGE)) for s in seqlens]
    out = []
    for part, rec in enumerate(meta):
        begin_req, begin_blk, end_req, end_blk, begin_split, _, _, flags = rec
        assert flags == 1
        if end_req < begin_req:
            assert rec == EMPTY
            continue
        for r in range(begin_req, end_req + 1):
            lo = begin_blk if r == begin_req else 0
            hi = end_blk if r == end_req else nblk[r]
            chunk, _ = invariant_chunks(nblk[r], ctas)
            assert lo % chunk == 0 and (hi % chunk == 0 or hi == nblk[r]), "parts hold whole chunks"
            if r == begin_req:
                assert begin_split == lo // chunk
            for c0 in range(lo, hi, chunk):
                seg = (r, c0, min(c0 + chunk, hi), c0 // chunk)
                out.append((part, *seg) if with_part else seg)
    return out


def own_cut(length, q_rows=16):
    """The segments of one request scheduled alone."""
    meta, _ = schedule([length], q_rows)
    return [(c0, c1, k) for _, c0, c1, k in segments([length], meta, q_rows)]


@pytest.mark.parametrize(
    "nblk,want",
    [(1, (1, 1)), (128, (128, 1)), (129, (65, 2)), (256, (32, 8)), (512, (8, 64)), (5000, (40, 125))],
)
def test_chunk_rule(nblk, want):
    assert invariant_chunks(nblk, 1) == want


@pytest.mark.parametrize("ctas", [1, 2, 3, 4, 8])
def test_workspace_bound_holds_for_every_shorter_length(ctas):
    """The realised chunk count is not monotone in the length (763 blocks: 128 chunks, 769: 110), so the
    bound is the target count, which is; every length up to the bound fits (a scan, not a sample)."""
    longest = 0
    for nblk in range(1, 6000):
        longest = max(longest, invariant_chunks(nblk, ctas)[1])
        assert longest <= invariant_target_chunks(nblk, ctas)
        pieces = invariant_max_pieces(1, nblk * PAGE, 64 * ctas, 1)
        assert pieces >= (longest if longest > 1 else 0), f"{nblk} blocks, {ctas} CTAs per part"
    assert invariant_chunks(763, 1)[1] == 128 and invariant_chunks(769, 1)[1] == 110


def test_public_api_fits_a_batch_of_lengths_at_a_dip():
    """A batch of requests just above a dip of the realised count, with the bound at the next length:
    every partial has a slot (2 * num_sm_parts)."""
    for tokens, bound in ((48_832, 49_216), (163_840, 163_844)):
        sl = torch.full((10,), tokens, dtype=torch.int32)
        meta, splits = flashmla_ops.get_mla_metadata(sl, 16, 1, batch_invariant=True, max_seqlen_k=bound)
        assert int(splits[-1]) <= 2 * meta.shape[0]


def test_chunk_rule_counts_ctas_per_part():
    # 128 CTAs in all: one tile per kv head gets up to 128 chunks, two tiles 64, more than 128 tiles 1.
    assert invariant_chunks(5000, 2)[1] == 64
    assert invariant_chunks(5000, 4)[1] == 32
    assert invariant_chunks(5000, 200)[1] == 1


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("q_rows", [16, 128, 256])
def test_cuts_depend_on_the_request_only(seed, q_rows):
    rng = random.Random(seed)
    b = rng.choice([1, 3, 40, 300])
    seqlens = [rng.choice([0, rng.randint(1, 3000), rng.randint(3000, 70_000)]) for _ in range(b)]
    parts = rng.choice([1, 7, 132])
    meta, splits = schedule(seqlens, q_rows, parts=parts + rng.randint(0, 50), work=parts)
    segs = segments(seqlens, meta, q_rows)
    # the parts cover every block once, in order, chunk by chunk
    nblk = [max(1, -(-max(s, 0) // PAGE)) for s in seqlens]
    assert [(r, c0) for r, c0, _, _ in segs] == [
        (r, c0) for r in range(b) for c0 in range(0, nblk[r], invariant_chunks(nblk[r], -(-q_rows // 64))[0])
    ]
    for r, length in enumerate(seqlens):
        mine = [(c0, c1, k) for rr, c0, c1, k in segs if rr == r]
        assert mine == own_cut(length, q_rows), f"request {r} ({length} tokens) cut differently in the batch"
        n = len(mine)
        assert splits[r + 1] - splits[r] == (n if n > 1 else 0)
    # every piece fits the workspace sized from the length bound
    assert splits[-1] <= invariant_max_pieces(b, max(seqlens + [0]), q_rows, 1)


def test_balance_and_empty_work_parts():
    # 64 requests of 20k tokens (15 chunks of 21 blocks each at 16 rows) over 132 parts: every part gets
    # about the same cost, at most one chunk's worth above the mean.
    seqlens = [20_000] * 64
    meta, _ = schedule(seqlens, parts=200, work=132)
    chunk, _ = invariant_chunks(313, 1)
    per_part = [0] * 200
    for p, _, c0, c1, _ in segments(seqlens, meta, with_part=True):
        per_part[p] += c1 - c0 + FIXED_OVERHEAD
    total = sum(per_part)
    assert max(per_part) <= -(-total // 132) + chunk + FIXED_OVERHEAD
    assert all(c == 0 for c in per_part[132:]), "parts past num_work_parts stay empty"
    assert all(rec == EMPTY for rec in meta[132:])


def test_public_api_sizes_the_parts_from_the_bound():
    sl = torch.tensor([100, 9000, 40_000], dtype=torch.int32)
    meta, splits = flashmla_ops.get_mla_metadata(sl, 16, 1, batch_invariant=True, max_seqlen_k=40_000)
    pieces = invariant_max_pieces(3, 40_000, 16, 1)
    assert meta.shape == (max(132, (pieces + 1) // 2), 8)
    assert int(splits[-1]) <= 2 * meta.shape[0]
    # short bounds keep the usual part count (nothing is cut up to 8192 tokens)
    meta, splits = flashmla_ops.get_mla_metadata(
        sl.clamp(max=8192), 16, 1, batch_invariant=True, max_seqlen_k=8192
    )
    assert meta.shape == (132, 8) and int(splits[-1]) == 0
    assert (meta[:, 7] == 1).all()


def test_public_api_errors():
    sl = torch.tensor([100], dtype=torch.int32)
    with pytest.raises(FlashMLAInputError, match="needs max_seqlen_k"):
        flashmla_ops.get_mla_metadata(sl, 16, 1, batch_invariant=True)
    with pytest.raises(FlashMLAInputError, match="only with batch_invariant=True"):
        flashmla_ops.get_mla_metadata(sl, 16, 1, max_seqlen_k=100)
    with pytest.raises(FlashMLAInputError, match="max_seqlen_k must be >= 0"):
        flashmla_ops.get_mla_metadata(sl, 16, 1, batch_invariant=True, max_seqlen_k=-1)
    big = torch.zeros(1100, dtype=torch.int32)
    with pytest.raises(FlashMLAInputError, match="at most 65535"):
        flashmla_ops.get_mla_metadata(big, 16, 1, batch_invariant=True, max_seqlen_k=1 << 20)
    with pytest.raises(FlashMLAInputError, match="num_work_parts"):
        torch.ops.flashmla.get_mla_metadata_batch_invariant(sl, 16, 1, 4, 5)


def test_reference_decode_is_the_same_with_either_schedule():
    """The CPU kernels compute every request whole, so both schedules give the same values."""
    from _helpers import make_inputs

    inp = make_inputs([100, 9000, 0])
    sl = inp.cache_seqlens
    m0, s0 = flashmla_ops.get_mla_metadata(sl, 16, 1)
    m1, s1 = flashmla_ops.get_mla_metadata(sl, 16, 1, batch_invariant=True, max_seqlen_k=9000)
    args = (inp.q, inp.k_cache, inp.block_table, sl, 512)
    a = flashmla_ops.flash_mla_with_kvcache(*args, m0, s0)
    b = flashmla_ops.flash_mla_with_kvcache(*args, m1, s1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
