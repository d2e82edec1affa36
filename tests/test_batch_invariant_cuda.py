"""Batch-invariant decode on the GPU: a request's out and lse are bitwise the same alone and inside any
batch (other requests, their number and order, padding rows, the part count), eagerly and in CUDA-graph
replay, for the bf16/fp16 and FP8 caches and for MTP."""

from __future__ import annotations

import pytest
import torch
from _gpu import requires_hopper

import flashmla_ops
from flashmla_ops.reference import get_mla_metadata_batch_invariant_reference

pytestmark = [requires_hopper, pytest.mark.gpu]

PAGE = 64
POOL_PAGES = 1024  # pages the other requests draw from (shared, so large batches stay small)
MAX_SEQLEN = 40_000
# (target length, what it exercises): never cut; the 128-block boundary; 2 chunks; many chunks; the most.
TARGETS = [100, 8192, 8193, 20_000, 40_000]
HEADS = [(1, 16), (1, 128), (2, 128)]  # (s_q, h_q): serial loop, seesaw loop, MTP seesaw


class Pool:
    """One cache holding a target request's own pages (NaN past its end) and a pool of pages that other
    requests draw from; q for the target and for up to ``max_others`` other requests."""

    def __init__(self, s_q: int, h_q: int, dtype: torch.dtype, seed: int, max_others: int = 1024):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.s_q, self.h_q, self.dtype = s_q, h_q, dtype
        self.target_pages = -(-MAX_SEQLEN // PAGE)
        pages = POOL_PAGES + self.target_pages
        k = torch.randn(pages, PAGE, 1, 576, device="cuda", generator=g) / 10
        self.k_cache = k.clamp(-1, 1).to(dtype)
        self.q = (torch.randn(max_others + 1, s_q, h_q, 576, device="cuda", generator=g) / 10).clamp(-1, 1)
        self.q = self.q.to(dtype)
        self.width = self.target_pages + 2
        self.others_table = torch.randint(
            0, POOL_PAGES, (max_others, self.width), device="cuda", dtype=torch.int32, generator=g
        )
        self.g = g

    def target_table(self, length: int) -> torch.Tensor:
        """The target's block table row: its own pages (fresh values), in a scrambled order; NaN in the
        slots past its end."""
        fresh = torch.randn(self.target_pages, PAGE, 1, 576, device="cuda", generator=self.g) / 10
        self.k_cache[POOL_PAGES:] = fresh.clamp(-1, 1).to(self.dtype)
        n = -(-length // PAGE)
        own = POOL_PAGES + torch.randperm(self.target_pages, device="cuda", generator=self.g)[:n].to(
            torch.int32
        )
        row = torch.full((self.width,), 2_000_000_000, dtype=torch.int32, device="cuda")
        row[:n] = own
        tail = length - (n - 1) * PAGE
        if tail < PAGE:
            self.k_cache[own[-1], tail:] = float("nan")
        return row

    def batch(self, target_len: int, target_row: torch.Tensor, others: list[int], pos: int):
        """(q, block_table, seqlens): the target at `pos` among requests of lengths `others`."""
        lens = list(others)
        lens.insert(pos, target_len)
        idx = list(range(1, len(others) + 1))
        idx.insert(pos, 0)
        q = self.q[idx]
        table = self.others_table[: len(others)]
        table = torch.cat([table[:pos], target_row[None], table[pos:]])
        return q, table.contiguous(), torch.tensor(lens, dtype=torch.int32, device="cuda")


def decode(q, k_cache, table, seqlens, k_scale=None, **meta_kw):
    s_q, h_q = q.shape[1], q.shape[2]
    meta, splits = flashmla_ops.get_mla_metadata(
        seqlens, s_q * h_q, 1, batch_invariant=True, max_seqlen_k=MAX_SEQLEN, **meta_kw
    )
    fp8 = k_cache.dtype in (torch.float8_e4m3fn, torch.uint8)
    return flashmla_ops.flash_mla_with_kvcache(
        q, k_cache, table, seqlens, 512, meta, splits, causal=True, is_fp8_kvcache=fp8, k_scale=k_scale
    )


def others_lengths(n: int, g: torch.Generator, long_frac: float = 0.05) -> list[int]:
    """Mostly short requests, some long ones, some padding rows (length 0)."""
    short = torch.randint(0, 3000, (n,), generator=g)
    long = torch.randint(3000, MAX_SEQLEN + 1, (n,), generator=g)
    pick = torch.rand(n, generator=g) < long_frac
    lens = torch.where(pick, long, short)
    lens[torch.rand(n, generator=g) < 0.1] = 0
    return lens.tolist()


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    same = a.view(torch.uint8) == b.view(torch.uint8) if a.element_size() == 1 else a == b
    if a.is_floating_point():
        same = same | (torch.isnan(a) & torch.isnan(b))
    assert bool(same.all()), f"{what}: {int((~same).sum())} elements differ"


@pytest.mark.parametrize("s_q,h_q", HEADS, ids=[f"sq{s}_h{h}" for s, h in HEADS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_alone_and_in_batches_bitwise(s_q, h_q, dtype):
    pool = Pool(s_q, h_q, dtype, seed=s_q * 1000 + h_q)
    g = torch.Generator().manual_seed(7)
    for length in TARGETS:
        row = pool.target_table(length)
        q, table, lens = pool.batch(length, row, [], 0)
        out0, lse0 = decode(q, pool.k_cache, table, lens)
        assert torch.isfinite(out0).all()
        for b_other in (1, 6, 63, 255, 1023):
            others = others_lengths(b_other, g)
            pos = int(torch.randint(0, b_other + 1, (1,), generator=g))
            q, table, lens = pool.batch(length, row, others, pos)
            out, lse = decode(q, pool.k_cache, table, lens)
            assert_bitwise(out[pos], out0[0], f"out, target {length}, {b_other + 1} requests, at {pos}")
            assert_bitwise(lse[pos], lse0[0], f"lse, target {length}, {b_other + 1} requests, at {pos}")


@pytest.mark.parametrize("fmt", ["per_tensor", "v32"])
@pytest.mark.parametrize("s_q,h_q", [(1, 16), (2, 128)], ids=["sq1_h16", "sq2_h128"])
def test_fp8_alone_and_in_batches_bitwise(fmt, s_q, h_q):
    pool = Pool(s_q, h_q, torch.bfloat16, seed=11 + h_q)
    g = torch.Generator().manual_seed(8)
    for length in (8193, 40_000):
        row = pool.target_table(length)
        k8, k_scale = flashmla_ops.quantize_kv_cache(pool.k_cache, fmt)
        q, table, lens = pool.batch(length, row, [], 0)
        out0, lse0 = decode(q, k8, table, lens, k_scale=k_scale)
        for b_other in (5, 200):
            others = others_lengths(b_other, g)
            pos = int(torch.randint(0, b_other + 1, (1,), generator=g))
            q, table, lens = pool.batch(length, row, others, pos)
            out, lse = decode(q, k8, table, lens, k_scale=k_scale)
            assert_bitwise(out[pos], out0[0], f"{fmt} out, target {length}, at {pos} of {b_other + 1}")
            assert_bitwise(lse[pos], lse0[0], f"{fmt} lse, target {length}, at {pos} of {b_other + 1}")


@pytest.mark.parametrize("s_q,h_q", [(1, 16), (2, 128)], ids=["sq1_h16", "sq2_h128"])
def test_part_count_does_not_matter(s_q, h_q):
    """The same batch scheduled over 132, 97, 7 and 1 parts (GPUs of other sizes): identical results."""
    pool = Pool(s_q, h_q, torch.bfloat16, seed=3)
    g = torch.Generator().manual_seed(9)
    row = pool.target_table(20_000)
    q, table, lens = pool.batch(20_000, row, others_lengths(40, g), 17)
    results = []
    for work in (132, 97, 7, 1):
        meta, splits = torch.ops.flashmla.get_mla_metadata_batch_invariant(lens, s_q * h_q, 1, 512, work)
        results.append(
            flashmla_ops.flash_mla_with_kvcache(q, pool.k_cache, table, lens, 512, meta, splits, causal=True)
        )
    for out, lse in results[1:]:
        assert_bitwise(out, results[0][0], "out over another part count")
        assert_bitwise(lse, results[0][1], "lse over another part count")


@pytest.mark.parametrize("s_q,h_q", [(1, 16), (1, 128)], ids=["sq1_h16", "sq1_h128"])
def test_cuda_graph_replay_at_a_larger_batch(s_q, h_q):
    """A graph captured at 64 requests (schedule, decode, combine), replayed with the target among 9 real
    requests and 54 padding rows, and among 63 others: bitwise the eager result of the target alone."""
    pool = Pool(s_q, h_q, torch.bfloat16, seed=5)
    g = torch.Generator().manual_seed(10)
    length = 20_000
    row = pool.target_table(length)
    q1, table1, lens1 = pool.batch(length, row, [], 0)
    out0, lse0 = decode(q1, pool.k_cache, table1, lens1)

    b = 64
    q, table, lens = pool.batch(length, row, others_lengths(b - 1, g), 0)
    sq, st, sl = q.clone(), table.clone(), lens.clone()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        decode(sq, pool.k_cache, st, sl)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s):
            g_out, g_lse = decode(sq, pool.k_cache, st, sl)
    torch.cuda.current_stream().wait_stream(s)
    for real in (10, 64):
        others = others_lengths(real - 1, g) + [0] * (b - real)
        pos = int(torch.randint(0, real, (1,), generator=g))
        q, table, lens = pool.batch(length, row, others, pos)
        sq.copy_(q)
        st.copy_(table)
        sl.copy_(lens)
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise(g_out[pos], out0[0], f"graph out, {real} real requests")
        assert_bitwise(g_lse[pos], lse0[0], f"graph lse, {real} real requests")


@pytest.mark.parametrize("b", [1, 37, 1000, 13_000])
@pytest.mark.parametrize("q_rows", [16, 128, 256])
def test_cuda_scheduler_matches_reference(b, q_rows):
    g = torch.Generator().manual_seed(b + q_rows)
    lens = torch.randint(-5, 70_000, (b,), generator=g, dtype=torch.int32)
    lens[torch.rand(b, generator=g) < 0.2] = 0
    lens = lens.cuda()
    for parts, work in ((132, 132), (500, 66), (9, 3)):
        got = torch.ops.flashmla.get_mla_metadata_batch_invariant(lens, q_rows, 1, parts, work)
        want = get_mla_metadata_batch_invariant_reference(lens.cpu(), q_rows, 1, parts, work)
        assert torch.equal(got[0].cpu(), want[0]), f"records, {parts} parts / {work} working"
        assert torch.equal(got[1].cpu(), want[1]), f"num_splits, {parts} parts / {work} working"


def test_default_mode_is_not_affected_by_the_flag_field():
    """The default schedule's records keep field 7 at 0 (the decode kernels read it as the mode)."""
    lens = torch.tensor([100, 9000, 40_000], dtype=torch.int32, device="cuda")
    meta, _ = flashmla_ops.get_mla_metadata(lens, 16, 1)
    assert int(meta[:, 7].abs().sum()) == 0
