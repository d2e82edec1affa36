"""The tile scheduler (flashmla::get_mla_metadata CPU kernel = reference): exact spec and invariants."""

from __future__ import annotations

import pytest
import torch
from _helpers import PAGE, scheduler_spec

import flashmla_ops  # noqa: F401  (registers the ops)

EMPTY = [0, 0, -1, 0, 0, 0, 0, 0]


def schedule(seqlens: list[int], num_parts: int) -> tuple[list[list[int]], list[int]]:
    sl = torch.tensor(seqlens, dtype=torch.int32)
    meta, num_splits = torch.ops.flashmla.get_mla_metadata(sl, 64, 1, num_parts)
    assert meta.dtype == torch.int32 and meta.shape == (num_parts, 8) and meta.is_contiguous()
    assert num_splits.dtype == torch.int32 and num_splits.shape == (len(seqlens) + 1,)
    return meta.tolist(), num_splits.tolist()


def check_invariants(
    seqlens: list[int], num_parts: int, meta: list[list[int]], num_splits: list[int]
) -> None:
    b = len(seqlens)
    nblk = [max(1, -(-max(s, 0) // PAGE)) for s in seqlens]
    parts_of: list[list[int]] = [[] for _ in range(b)]
    cursor = (0, 0)  # next (request, block) to be covered
    for p, rec in enumerate(meta):
        begin_req, begin_blk, end_req, end_blk, begin_split, first_split, last_split, reserved = rec
        assert reserved == 0
        if end_req < begin_req:
            assert rec == EMPTY, f"part {p}: empty parts are encoded as {EMPTY}, got {rec}"
            continue
        assert 0 <= begin_req <= end_req < b
        assert 0 <= begin_blk < nblk[begin_req]
        assert 0 < end_blk <= nblk[end_req]
        if begin_req == end_req:
            assert begin_blk < end_blk
        # parts cover (request, block) pairs in order, each exactly once
        assert (begin_req, begin_blk) == cursor, (
            f"part {p} starts at {(begin_req, begin_blk)}, expected {cursor}"
        )
        cursor = (end_req + 1, 0) if end_blk == nblk[end_req] else (end_req, end_blk)
        for i in range(begin_req, end_req + 1):
            parts_of[i].append(p)
    assert cursor == (b, 0), f"blocks from {cursor} on are not covered"

    assert num_splits[0] == 0
    for i in range(b):
        n_i = num_splits[i + 1] - num_splits[i]
        count = len(parts_of[i])
        assert n_i == (count if count > 1 else 0), f"request {i}: num_splits says {n_i}, covered by {count}"
    for p, rec in enumerate(meta):
        begin_req, _, end_req, _, begin_split, first_split, last_split, _ = rec
        if end_req < begin_req:
            continue
        # begin_split enumerates 0..n-1 over the parts that cover begin_req
        assert begin_split == parts_of[begin_req].index(p)
        assert first_split == int(len(parts_of[begin_req]) > 1)
        assert last_split == int(len(parts_of[end_req]) > 1)
    assert num_splits[b] <= 2 * (num_parts - 1)


def test_hand_computed_records():
    # nblk = [64, 1, 16], costs [69, 6, 21], total 96, cap = 24 + 5 = 29. Request 0 does not fit: parts 0
    # and 1 take 24 of its blocks each (29 - 5); part 2 takes its last 16 (cost 21) and request 1 (cost 6),
    # 2 units are left, too few for a piece of request 2 (5 + 1), which goes whole to part 3.
    meta, num_splits = schedule([4096, 64, 1000], 4)
    assert meta == [
        [0, 0, 0, 24, 0, 1, 1, 0],
        [0, 24, 0, 48, 1, 1, 1, 0],
        [0, 48, 1, 1, 2, 1, 0, 0],
        [2, 0, 2, 16, 0, 0, 0, 0],
    ]
    assert num_splits == [0, 3, 3, 3]


def test_hand_computed_cut_after_whole_request():
    # nblk [10, 10, 10], costs 15 each, total 45, cap = 23 + 5 = 28: part 0 takes request 0 (room 13 left) and
    # 13 - 5 = 8 blocks of request 1; part 1 its last 2 (cost 7) and request 2.
    meta, num_splits = schedule([640, 600, 577], 2)
    assert meta == [[0, 0, 1, 8, 0, 0, 1, 0], [1, 8, 2, 10, 1, 1, 0, 0]]
    assert num_splits == [0, 0, 2, 2]


def test_hand_computed_single_part():
    meta, num_splits = schedule([0, 1, 65], 1)
    # nblk [1, 1, 2], total 19, cap 24: everything in part 0, nothing split
    assert meta == [[0, 0, 2, 2, 0, 0, 0, 0]]
    assert num_splits == [0, 0, 0, 0]


def test_hand_computed_empty_parts():
    # one request, 1 block, cost 6, P = 8: cap = 1 + 5, part 0 takes it, the other 7 parts are empty
    meta, num_splits = schedule([10], 8)
    assert meta == [[0, 0, 0, 1, 0, 0, 0, 0]] + [EMPTY] * 7
    assert num_splits == [0, 0]


def test_hand_computed_whole_requests_per_part():
    # nblk [2, 2], costs [7, 7], total 14, P = 2: cap = 12, request 1 does not fit after request 0 and the 5
    # units left are no room for a piece: part p = request p
    meta, num_splits = schedule([128, 100], 2)
    assert meta == [[0, 0, 0, 2, 0, 0, 0, 0], [1, 0, 1, 2, 0, 0, 0, 0]]
    assert num_splits == [0, 0, 0]


def test_single_long_request_is_cut_over_every_part_it_needs():
    # One request of 512 blocks costs 517 on 66 parts: cap = ceil(517 / 66) + 5 = 13, so every piece holds 8
    # blocks: 64 pieces, 2 empty parts. (Until v8.0 a small-batch "parts budget" filled only 50 of the 66
    # parts here, 47 pieces of 11 blocks.)
    meta, num_splits = schedule([32768], 66)
    want = [[0, 8 * p, 0, 8 * (p + 1), p, 1, 1, 0] for p in range(64)]
    assert meta == want + [EMPTY] * 2
    assert num_splits == [0, 64]


@pytest.mark.parametrize(("num_parts", "per_part"), [(66, 2), (132, 1), (64, 2)])
def test_uniform_batches_are_not_split(num_parts, per_part):
    # 128 requests of 4096 tokens (cost 69): the slack of one overhead per part keeps them whole, so the
    # decode writes final outputs directly and the combine pass has nothing to do.
    meta, num_splits = schedule([4096] * 128, num_parts)
    used = 128 // per_part
    want = [[p * per_part, 0, (p + 1) * per_part - 1, 64, 0, 0, 0, 0] for p in range(used)]
    assert meta[:used] == want
    assert meta[used:] == [EMPTY] * (num_parts - used)
    assert num_splits == [0] * 129


def test_negative_lengths_count_as_empty():
    assert schedule([-5, 100, -1], 3) == schedule([0, 100, 0], 3)


def _random_case(seed: int) -> tuple[list[int], int]:
    gen = torch.Generator().manual_seed(seed)
    b = [1, 2, 3, 5, 17, 64, 129, 1000, 3000][seed % 9]
    num_parts = [1, 2, 3, 7, 16, 64, 78, 131, 132][int(torch.randint(9, (), generator=gen))]
    kind = seed % 4
    if kind == 0:  # uniform lengths up to 128k
        sl = torch.randint(0, 131073, (b,), generator=gen)
    elif kind == 1:  # short lengths with many zeros
        sl = torch.randint(0, 200, (b,), generator=gen)
        sl[torch.rand(b, generator=gen) < 0.3] = 0
    elif kind == 2:  # a few long requests among short ones
        sl = torch.randint(0, 64, (b,), generator=gen)
        sl[torch.rand(b, generator=gen) < 0.05] = 131072
    else:  # page-aligned lengths
        sl = torch.randint(0, 2049, (b,), generator=gen) * 64
    return sl.tolist(), num_parts


@pytest.mark.parametrize("seed", range(36))
def test_random_batches_invariants_and_spec(seed):
    seqlens, num_parts = _random_case(seed)
    meta, num_splits = schedule(seqlens, num_parts)
    check_invariants(seqlens, num_parts, meta, num_splits)
    want_meta, want_splits = scheduler_spec(seqlens, num_parts)
    assert meta == want_meta
    assert num_splits == want_splits


@pytest.mark.parametrize("num_parts", [1, 2, 5, 132])
def test_all_empty_and_all_long(num_parts):
    for seqlens in ([0] * 40, [131072] * 7, [64] * 200):
        meta, num_splits = schedule(seqlens, num_parts)
        check_invariants(seqlens, num_parts, meta, num_splits)
        assert (meta, num_splits) == scheduler_spec(seqlens, num_parts)


def test_num_q_tokens_and_heads_do_not_change_records():
    sl = torch.tensor([300, 0, 7000, 64], dtype=torch.int32)
    base = torch.ops.flashmla.get_mla_metadata(sl, 1, 1, 11)
    for tokens, heads in ((64, 1), (128, 1), (256, 2), (1000, 8)):
        got = torch.ops.flashmla.get_mla_metadata(sl, tokens, heads, 11)
        assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])


@pytest.mark.parametrize("num_parts", [1, 132])
def test_large_batch(num_parts):
    gen = torch.Generator().manual_seed(num_parts)
    seqlens = torch.randint(0, 131073, (3000,), generator=gen)
    seqlens[::7] = 0
    seqlens = seqlens.tolist()
    meta, num_splits = schedule(seqlens, num_parts)
    check_invariants(seqlens, num_parts, meta, num_splits)
    assert (meta, num_splits) == scheduler_spec(seqlens, num_parts)


@pytest.mark.parametrize("num_parts", [1500, 2000])
def test_many_parts_and_huge_lengths(num_parts):
    # More parts than the GPU kernel handles per chunk, negative and INT32_MAX lengths (64-bit cost sums).
    gen = torch.Generator().manual_seed(num_parts)
    seqlens = torch.randint(-100, 20000, (700,), generator=gen)
    seqlens[::5] = 0
    seqlens[1::97] = 2**31 - 1
    seqlens = seqlens.tolist()
    meta, num_splits = schedule(seqlens, num_parts)
    check_invariants(seqlens, num_parts, meta, num_splits)
    assert (meta, num_splits) == scheduler_spec(seqlens, num_parts)


def test_invariant_checker_catches_corruption():
    seqlens = [4096, 64, 1000]
    meta, num_splits = schedule(seqlens, 4)
    for p, field, delta in ((1, 1, 1), (2, 3, -1), (1, 4, 1), (3, 5, 1)):
        bad = [row[:] for row in meta]
        bad[p][field] += delta
        with pytest.raises(AssertionError):
            check_invariants(seqlens, 4, bad, num_splits)
    with pytest.raises(AssertionError):
        check_invariants(seqlens, 4, meta, [0, 2, 2, 2])
