"""The sm_90a decode kernels against the pure-PyTorch reference, on FlashMLA's test grid and corner cases.

Runs only on a Hopper GPU with the CUDA extension built; skipped (with the reason) elsewhere.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _gpu import (
    GARBAGE_PAGE_ID,
    PAGE,
    assert_allclose_flashmla,
    make_inputs,
    make_seqlens,
    requires_hopper,
    run_decode,
)

import flashmla_ops
from flashmla_ops.reference import mla_decode_reference

pytestmark = [requires_hopper, pytest.mark.gpu]

HEAD_PAIRS = [(h_q, h_kv) for h_q in (1, 3, 9, 63, 64, 126, 128) for h_kv in (1, 2, 3, 8) if h_q % h_kv == 0]
assert len(HEAD_PAIRS) == 16

OUT_TOL = dict(abs_tol=8e-4, rel_tol=2.01 / 128, cos_tol=5e-6)
LSE_TOL = dict(abs_tol=1e-6, rel_tol=8.01 / 65536)


def check_case(
    b, s_q, s_k, h_q, h_kv, varlen, causal, dtype, zero_frac=0.0, softmax_scale=None, seqlens=None
):
    if seqlens is None:
        seqlens = make_seqlens(b, s_k, varlen, zero_frac)
    q, k_cache, block_table = make_inputs(b, s_q, h_q, h_kv, seqlens, dtype)
    out, lse, meta, num_splits = run_decode(q, k_cache, block_table, seqlens, causal, softmax_scale)
    scale = softmax_scale if softmax_scale is not None else 576**-0.5
    ref_out, ref_lse = mla_decode_reference(
        q, k_cache, block_table, seqlens, 512, meta, num_splits, scale, causal
    )
    assert_allclose_flashmla(out, ref_out, **OUT_TOL)
    assert_allclose_flashmla(lse, ref_lse, **LSE_TOL)
    return q, k_cache, block_table, seqlens, out, lse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b", [1, 2, 6, 64])
@pytest.mark.parametrize("s_q", [1, 2, 4])
@pytest.mark.parametrize("s_k", [20, 140, 4096])
@pytest.mark.parametrize("varlen", [False, True], ids=["fixed", "varlen"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flashmla_grid(dtype, b, s_q, s_k, varlen, causal):
    """FlashMLA's dense decoding grid; the 16 (h_q, h_kv) pairs run inside one test to bound overhead."""
    torch.manual_seed(hash((b, s_q, s_k, varlen, causal)) % 2**31)
    for h_q, h_kv in HEAD_PAIRS:
        try:
            check_case(b, s_q, s_k, h_q, h_kv, varlen, causal, dtype)
        except AssertionError as e:
            raise AssertionError(f"h_q={h_q} h_kv={h_kv}: {e}") from e


@pytest.mark.parametrize("h_q,h_kv", HEAD_PAIRS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_half_the_requests_empty(h_q, h_kv, causal):
    torch.manual_seed(h_q * 10 + h_kv)
    check_case(128, 2, 4096, h_q, h_kv, True, causal, torch.bfloat16, zero_frac=0.5)


@pytest.mark.parametrize("s_q", [1, 2])
def test_all_requests_empty(s_q):
    seqlens = torch.zeros(8, dtype=torch.int32, device="cuda")
    _, _, _, _, out, lse = check_case(8, s_q, 0, 128, 1, False, True, torch.bfloat16, seqlens=seqlens)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isposinf(lse).all()


def test_large_batch():
    torch.manual_seed(0)
    seqlens = torch.randint(0, 200, (16384,), dtype=torch.int32, device="cuda")
    check_case(16384, 1, 0, 16, 1, False, False, torch.bfloat16, seqlens=seqlens)


@pytest.mark.parametrize("h_q", [16, 128])
def test_one_long_sequence(h_q):
    torch.manual_seed(1)
    seqlens = torch.tensor([131072], dtype=torch.int32, device="cuda")
    check_case(1, 2, 0, h_q, 1, False, True, torch.bfloat16, seqlens=seqlens)


# Zero and negative scales too, on both main loops (h_q 8 at s_q 2: serial; h_q 64: seesaw): a kernel that
# took the row max before scaling (cheaper; tried in v7.1) would be wrong for them unless it took the min.
@pytest.mark.parametrize("h_q", [8, 64])
@pytest.mark.parametrize("softmax_scale", [0.01, 0.1352, 1.0, 0.0, -0.1352])
def test_softmax_scale(softmax_scale, h_q):
    torch.manual_seed(2)
    check_case(6, 2, 1000, h_q, 1, True, True, torch.bfloat16, softmax_scale=softmax_scale)


# The kernels keep the running row max a page's P is taken against unless a page's row max exceeds it by
# more than 8 log2 units (kMaxSlackLog2 in kernels/sm90/common.cuh): P values reach 2^8 and O is
# rescaled only when the max is replaced. Here every token's logit rises by 1.5 log2 units per page along its
# request (the max is replaced after ~6 pages of small rises) and three pages jump: request 0's pages 20 and
# 31 (both parities, so both seesaw warpgroups take a replacement) by 14 and 30 units over the ramp, request
# 1's page 25 by 125. A kernel that never replaced the max would overflow fp16 P; one that took P against a
# different max than the one it rescales O with would be off by up to 2^8 on the pages that carry the
# result. One part (no split: every jump is inside a request's only piece) and three parts (pieces of ~30
# pages, combined by lse).
@pytest.mark.parametrize("num_sm_parts", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("h_q", [8, 64])  # at s_q 2: one 64-row tile (serial loop), two (seesaw loop)
def test_running_max_with_slack(num_sm_parts, dtype, h_q):
    torch.manual_seed(4)
    seqlens = torch.tensor([3000, 64 * 40 + 7], dtype=torch.int32, device="cuda")
    q, k_cache, block_table = make_inputs(2, 2, h_q, 1, seqlens, dtype)
    # q = 0.05 (+ noise) in every column, so adding x to every column of a token's K adds 0.05 * 576 * x to
    # its logit (softmax scale 1), times log2(e) in the kernels' log2 domain.
    unit = 1.0 / (0.05 * 576 * math.log2(math.e))  # K offset of one log2 unit
    q = (0.05 + torch.randn_like(q, dtype=torch.float32) / 100).to(dtype)
    k = k_cache.float()
    nblk = (seqlens.long() + PAGE - 1) // PAGE
    for i in range(2):
        n = int(nblk[i])
        pages = block_table[i, :n].long()
        ramp = 1.5 * torch.arange(n * PAGE, device="cuda").view(n, PAGE) / PAGE
        k[pages, :, 0, :] += (ramp * unit)[:, :, None]  # NaN slots past the end stay NaN
    for i, page_idx, jump in ((0, 20, 14.0), (0, 31, 30.0), (1, 25, 125.0)):
        k[block_table[i, page_idx].long(), :, 0, :] += jump * unit
    k_cache = k.to(dtype)
    meta, num_splits = torch.ops.flashmla.get_mla_metadata(seqlens, 2 * h_q, 1, num_sm_parts)
    out, lse = torch.ops.flashmla.mla_decode(
        q, k_cache, block_table, seqlens, 512, meta, num_splits, 1.0, True
    )
    ref_out, ref_lse = mla_decode_reference(
        q, k_cache, block_table, seqlens, 512, meta, num_splits, 1.0, True
    )
    assert_allclose_flashmla(out, ref_out, **OUT_TOL)
    assert_allclose_flashmla(lse, ref_lse, **LSE_TOL)


def test_functional_matches_out_variant_and_is_deterministic():
    torch.manual_seed(3)
    seqlens = make_seqlens(32, 3000, True)
    q, k_cache, block_table = make_inputs(32, 2, 128, 1, seqlens, torch.bfloat16)
    meta, num_splits = flashmla_ops.get_mla_metadata(seqlens, 2 * 128, 1)
    first = flashmla_ops.flash_mla_with_kvcache(
        q, k_cache, block_table, seqlens, 512, meta, num_splits, causal=True
    )
    for _ in range(10):
        out, lse = flashmla_ops.flash_mla_with_kvcache(
            q, k_cache, block_table, seqlens, 512, meta, num_splits, causal=True
        )
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1])
    out2, lse2, _, _ = run_decode(q, k_cache, block_table, seqlens, True)
    assert torch.equal(out2, first[0]) and torch.equal(lse2, first[1])


def test_out_variant_with_workspace_allocates_nothing():
    """out + lse + a preallocated workspace: the call takes no memory from the allocator (design rule: no
    per-call allocation on the decode path), reuses one workspace across layers, and computes bit for bit
    what the functional op computes."""
    torch.manual_seed(5)
    seqlens = make_seqlens(64, 2000, True)
    q, k_cache, block_table = make_inputs(64, 2, 128, 1, seqlens, torch.bfloat16)
    meta, num_splits = flashmla_ops.get_mla_metadata(seqlens, 2 * 128, 1)
    args = (q, k_cache, block_table, seqlens, 512, meta, num_splits)
    want = flashmla_ops.flash_mla_with_kvcache(*args, causal=True)
    out, lse = torch.full_like(want[0], float("nan")), torch.full_like(want[1], float("nan"))
    workspace = torch.empty(flashmla_ops.workspace_size(meta, 2 * 128, 1), dtype=torch.float32, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(5):
        flashmla_ops.flash_mla_with_kvcache(*args, causal=True, out=out, lse=lse, workspace=workspace)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    # without a workspace the out-variant takes its scratch from the caching allocator on every call
    flashmla_ops.flash_mla_with_kvcache(*args, causal=True, out=out, lse=lse)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] > before


def test_cuda_workspace_errors_match_the_python_messages():
    seqlens = torch.tensor([100, 7], dtype=torch.int32, device="cuda")
    q, k_cache, block_table = make_inputs(2, 1, 16, 1, seqlens, torch.bfloat16)
    meta, num_splits = flashmla_ops.get_mla_metadata(seqlens, 16, 1)
    need = flashmla_ops.workspace_size(meta, 16, 1)
    out = torch.empty(2, 1, 16, 512, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(2, 16, 1, device="cuda")
    bad = {  # made on each device (.cpu() of a strided tensor would come back contiguous)
        "dtype": lambda dev: torch.empty(need, dtype=torch.bfloat16, device=dev),
        "size": lambda dev: torch.empty(need - 1, device=dev),
        "not contiguous": lambda dev: torch.empty(2 * need, device=dev)[::2],
        "device": lambda dev: torch.empty(need),
        "misaligned": lambda dev: torch.empty(need + 2, device=dev)[2:],  # 8 bytes off
    }
    for name, make in bad.items():
        args = [q, k_cache, block_table, seqlens, 512, meta, num_splits, 0.1, False, out, lse]
        with pytest.raises(RuntimeError) as cuda_err:
            torch.ops.flashmla.mla_decode_out(*args, make("cuda"))
        if name == "device":
            assert "workspace must be on the same device as q (cuda:0), got cpu" in str(cuda_err.value)
            continue
        if name == "misaligned":  # only the CUDA kernels need alignment: the CPU reference accepts it
            assert "workspace must be 16-byte aligned (its data pointer), got an offset of 8 bytes" in str(
                cuda_err.value
            )
            continue
        cpu_args = [x.cpu() if isinstance(x, torch.Tensor) else x for x in args]
        with pytest.raises(RuntimeError) as cpu_err:
            torch.ops.flashmla.mla_decode_out(*cpu_args, make("cpu"))
        assert str(cpu_err.value) in str(cuda_err.value), f"{name}: {cuda_err.value!r} vs {cpu_err.value!r}"


def test_invalid_values_give_nan_not_memory_errors():
    """A request that needs more pages than block_table has, or names a page outside the cache, reads no
    memory out of bounds and gets NaN rows, while the other requests stay correct."""
    torch.manual_seed(4)
    seqlens = torch.tensor([300, 300, 300], dtype=torch.int32, device="cuda")
    q, k_cache, block_table = make_inputs(3, 1, 16, 1, seqlens, torch.bfloat16, extra_cols=0)
    block_table[1, 2] = GARBAGE_PAGE_ID  # page id outside the cache
    seqlens_bad = seqlens.clone()
    seqlens_bad[2] = 64 * block_table.shape[1] + 1  # needs one page more than the table has
    out, lse, meta, num_splits = run_decode(q, k_cache, block_table, seqlens_bad, False)
    torch.cuda.synchronize()
    assert torch.isnan(out[1:]).all() and torch.isnan(lse[1:]).all()
    ref_out, ref_lse = mla_decode_reference(
        q[:1], k_cache, block_table[:1], seqlens[:1], 512, meta, num_splits[:2], 576**-0.5, False
    )
    assert_allclose_flashmla(out[:1], ref_out, **OUT_TOL)
    assert_allclose_flashmla(lse[:1], ref_lse, **LSE_TOL)


# All three combine grids, as launch_combine picks them on 132 SMs: eight warps per row where a few requests
# are split into many pieces (b = 1 and 2 at h_q = 16, the three-CTA build; b = 1 at h_q = 128, the
# 64-register one; at b = 2 the other request's merge is checked), one warp per row with 8-byte lanes (b = 2
# and 4 at h_q = 128, past one wave of the eight-warp grid; b = 24, a small grid but ~4 pieces per request)
# and with 16-byte lanes (b = 64). On a 114-SM H100 PCIe b = 1 at h_q = 128 takes the 8-byte-lane grid and
# b = 4 at h_q = 128 the 16-byte one: all three grids are still covered, the 64-register build is not.
@pytest.mark.parametrize(
    "b,h_q,s_k",
    [
        (1, 16, 8192),
        (1, 128, 8192),
        (2, 16, 8192),
        (2, 128, 8192),
        (4, 128, 4096),
        (24, 16, 1024),
        (64, 16, 1024),
    ],
)
def test_num_splits_from_another_call_gives_nan_rows(b, h_q, s_k):
    """A num_splits tensor that does not match the metadata (its last request naming more pieces than the
    workspace holds) makes that request NaN, reads and writes nothing out of bounds, and leaves the other
    requests correct."""
    torch.manual_seed(8)
    seqlens = make_seqlens(b, s_k, False)
    q, k_cache, block_table = make_inputs(b, 1, h_q, 1, seqlens, torch.bfloat16)
    meta, num_splits = flashmla_ops.get_mla_metadata(seqlens, h_q, 1)
    wrong = num_splits.clone()
    wrong[b] = 2 * meta.shape[0] + 5
    out = torch.full((b, 1, h_q, 512), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((b, h_q, 1), float("nan"), dtype=torch.float32, device=q.device)
    flashmla_ops.flash_mla_with_kvcache(
        q, k_cache, block_table, seqlens, 512, meta, wrong, None, False, out=out, lse=lse
    )
    torch.cuda.synchronize()
    assert torch.isnan(out[b - 1]).all() and torch.isnan(lse[b - 1]).all()
    if b > 1:
        ref_out, ref_lse = mla_decode_reference(
            q[: b - 1],
            k_cache,
            block_table[: b - 1],
            seqlens[: b - 1],
            512,
            meta,
            num_splits[:b],
            576**-0.5,
            False,
        )
        assert_allclose_flashmla(out[: b - 1], ref_out, **OUT_TOL)
        assert_allclose_flashmla(lse[: b - 1], ref_lse, **LSE_TOL)


def test_cuda_input_errors_match_the_python_messages():
    """The C++ launcher raises the same messages as the Python validation used by the CPU kernels/fakes."""
    seqlens = torch.tensor([100], dtype=torch.int32, device="cuda")
    q, k_cache, block_table = make_inputs(1, 1, 16, 1, seqlens, torch.bfloat16)
    meta, num_splits = flashmla_ops.get_mla_metadata(seqlens, 16, 1)
    args = [q, k_cache, block_table, seqlens, 512, meta, num_splits, 0.1, False]
    cases = {
        "q dtype": (0, q.float()),
        "k dtype": (1, k_cache.half()),
        "block_table dtype": (2, block_table.long()),
        "head_dim_v": (4, 256),
        "q head dim": (0, q[..., :512]),
        "page size": (1, k_cache[:, :32]),
        "heads": (1, torch.cat([k_cache] * 3, dim=2)),
        "batch": (2, block_table[:0]),
        "num_splits": (6, num_splits[:1]),
        "metadata": (5, meta[:, :4]),
    }
    for name, (i, bad) in cases.items():
        a = list(args)
        a[i] = bad
        with pytest.raises(RuntimeError) as cuda_err:
            torch.ops.flashmla.mla_decode(*a)
        cpu_args = [x.cpu() if isinstance(x, torch.Tensor) else x for x in a]
        with pytest.raises(RuntimeError) as cpu_err:
            torch.ops.flashmla.mla_decode(*cpu_args)
        msg = str(cpu_err.value).replace("cpu", "cuda:0")
        assert msg in str(cuda_err.value), f"{name}: {cuda_err.value!r} != {msg!r}"
    a = list(args)
    a[3] = seqlens.cpu()
    with pytest.raises(
        RuntimeError, match="cache_seqlens must be on the same device as q \\(cuda:0\\), got cpu"
    ):
        torch.ops.flashmla.mla_decode(*a)
    with pytest.raises(RuntimeError, match="num_sm_parts must be >= 1, got 0"):
        torch.ops.flashmla.get_mla_metadata(seqlens, 16, 1, 0)


@pytest.mark.parametrize("b,s_q,h_q,h_kv", list(itertools.product([1, 37], [1, 3], [16, 128], [1, 2])))
def test_side_stream(b, s_q, h_q, h_kv):
    """The ops run on the current stream: work queued on a side stream is ordered correctly."""
    torch.manual_seed(5)
    seqlens = make_seqlens(b, 500, True)
    q, k_cache, block_table = make_inputs(b, s_q, h_q, h_kv, seqlens, torch.bfloat16)
    ref = run_decode(q, k_cache, block_table, seqlens, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(10_000_000)  # keep the side stream busy so a wrong-stream launch would race
        q2 = q * 1  # produced on the side stream
        out, lse, _, _ = run_decode(q2, k_cache, block_table, seqlens, True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1])


def test_seqlen_near_int32_max_is_flagged_not_read():
    """ceil(seqlen / 64) must not overflow int32: such a request reads no block-table entry past the table."""
    seqlens = torch.tensor([100, 2**31 - 1], dtype=torch.int32, device="cuda")
    q, k_cache, block_table = make_inputs(
        2, 1, 16, 1, torch.tensor([100, 100], dtype=torch.int32, device="cuda"), torch.bfloat16, extra_cols=0
    )
    out, lse, _, _ = run_decode(q, k_cache, block_table, seqlens, False)
    torch.cuda.synchronize()
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("b,s_k", [(1, 8192), (64, 140)], ids=["split", "unsplit"])
def test_nan_in_visible_data_propagates_like_the_reference(b, s_k):
    """NaN in q (or in a visible cache row) gives NaN in that row's out and lse, as in the reference, whether
    the request is split over several parts or not."""
    torch.manual_seed(6)
    seqlens = make_seqlens(b, s_k, False)
    q, k_cache, block_table = make_inputs(b, 1, 16, 1, seqlens, torch.bfloat16)
    q[0, 0, 3, 7] = float("nan")
    out, lse, meta, num_splits = run_decode(q, k_cache, block_table, seqlens, False)
    ref_out, ref_lse = mla_decode_reference(
        q, k_cache, block_table, seqlens, 512, meta, num_splits, 576**-0.5, False
    )
    assert torch.isnan(out[0, 0, 3]).all() and torch.isnan(lse[0, 3, 0])
    assert_allclose_flashmla(out, ref_out, **OUT_TOL)
    assert_allclose_flashmla(lse, ref_lse, **LSE_TOL)


def test_grid_limits_are_checked_before_launch():
    seqlens = torch.tensor([64], dtype=torch.int32, device="cuda")
    q, k_cache, block_table = make_inputs(1, 4097, 128, 1, seqlens, torch.bfloat16)
    meta, num_splits = flashmla_ops.get_mla_metadata(seqlens, 4097 * 128, 1)
    with pytest.raises(RuntimeError, match="query rows per request exceed"):
        flashmla_ops.flash_mla_with_kvcache(
            q, k_cache, block_table, seqlens, 512, meta, num_splits, causal=True
        )
    with pytest.raises(RuntimeError, match="num_sm_parts must be at most 65535"):
        torch.ops.flashmla.get_mla_metadata(seqlens, 16, 1, 65536)


@pytest.mark.parametrize("h_q", [16, 128], ids=["serial", "seesaw"])
@pytest.mark.parametrize("s_q", [1, 2])
def test_metadata_from_longer_lengths(h_q, s_q):
    """Metadata computed for longer lengths (e.g. kept from an earlier step) still covers every block of the
    shorter ones: the result is exact. Some parts then start past the end of their first request (an empty
    first segment) and go on into the next request; both loops must keep their page pipeline in step there."""
    torch.manual_seed(7 + h_q + s_q)
    b = 64
    meta_lens = torch.randint(200, 3000, (b,), dtype=torch.int32, device="cuda")
    seqlens = (meta_lens // 7).to(torch.int32)
    meta, num_splits = flashmla_ops.get_mla_metadata(meta_lens, s_q * h_q, 1)
    rec = meta.cpu().tolist()
    nblk = ((seqlens.long() + PAGE - 1) // PAGE).clamp(min=1).tolist()
    empty_then_more = [r for r in rec if r[0] < r[2] and r[1] >= nblk[r[0]]]
    assert empty_then_more, "the case must contain a part whose first segment is empty"
    q, k_cache, block_table = make_inputs(b, s_q, h_q, 1, seqlens, torch.bfloat16)
    out = torch.full((b, s_q, h_q, 512), float("nan"), dtype=q.dtype, device="cuda")
    lse = torch.full((b, h_q, s_q), float("nan"), dtype=torch.float32, device="cuda")
    flashmla_ops.flash_mla_with_kvcache(
        q, k_cache, block_table, seqlens, 512, meta, num_splits, causal=True, out=out, lse=lse
    )
    ref_out, ref_lse = mla_decode_reference(
        q, k_cache, block_table, seqlens, 512, meta, num_splits, 576**-0.5, True
    )
    assert_allclose_flashmla(out, ref_out, **OUT_TOL)
    assert_allclose_flashmla(lse, ref_lse, **LSE_TOL)
