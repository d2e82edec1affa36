"""The pure-PyTorch reference (the CPU kernels) against an independent float64 loop oracle."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from _helpers import D_V, PAD, loop_oracle, make_inputs, schedule_args

import flashmla_ops  # noqa: F401  (registers the ops)
from flashmla_ops import reference
from flashmla_ops._validation import FlashMLAInputError

HEADS = [(h_q, h_kv) for h_q, h_kv in itertools.product([1, 3, 16, 64, 128], [1, 2]) if h_q % h_kv == 0]
SCALE = 576**-0.5


def assert_matches_oracle(out, lse, inp, scale, causal):
    ref_out, ref_lse = loop_oracle(inp.q, inp.k_cache, inp.block_table, inp.seqlens, scale, causal)
    b, s_q, h_q, _ = inp.q.shape
    assert out.shape == (b, s_q, h_q, D_V) and out.dtype == inp.q.dtype and out.is_contiguous()
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32 and lse.is_contiguous()
    out64, lse64 = out.double(), lse.double()
    for name, got, want in (("out", out64, ref_out), ("lse", lse64, ref_lse)):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"NaN positions differ in {name}"
        assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"+inf positions differ in {name}"
        assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"-inf positions differ in {name}"
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse64[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("s_q", [1, 2, 4])
@pytest.mark.parametrize("h_q,h_kv", HEADS, ids=[f"hq{a}-hkv{b}" for a, b in HEADS])
def test_decode_matches_loop_oracle(h_q, h_kv, s_q, causal, dtype):
    # lengths: empty, shorter than s_q, page boundaries, several pages
    seqlens = [0, 2, 64, 65, 150]
    seed = h_q * 1000 + h_kv * 100 + s_q * 10 + 2 * int(causal) + int(dtype == torch.float16)  # deterministic
    inp = make_inputs(seqlens, s_q, h_q, h_kv, dtype, seed=seed)
    meta, num_splits = schedule_args(inp)
    out, lse = torch.ops.flashmla.mla_decode(*inp.args(meta, num_splits, SCALE, causal))
    assert_matches_oracle(out, lse, inp, SCALE, causal)
    # seqlen 0: out 0 and lse +inf for every head and token
    assert torch.all(out[0] == 0) and torch.all(lse[0] == math.inf)
    # the out-variant writes the same values
    out2 = torch.full_like(out, float("nan"))
    lse2 = torch.full_like(lse, float("nan"))
    torch.ops.flashmla.mla_decode_out(*inp.args(meta, num_splits, SCALE, causal), out2, lse2)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


@pytest.mark.parametrize("seed", range(4))
def test_decode_random_batches(seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    b = int(torch.randint(1, 7, (), generator=gen))
    seqlens = torch.randint(0, 300, (b,), generator=gen).tolist()
    h_q, h_kv = HEADS[int(torch.randint(len(HEADS), (), generator=gen))]
    s_q = int(torch.randint(1, 4, (), generator=gen))
    causal = bool(seed % 2)
    scale = float(torch.rand((), generator=gen)) * 0.1 + 0.01
    inp = make_inputs(seqlens, s_q, h_q, h_kv, torch.bfloat16, seed=seed, unused_pages=3, extra_cols=5)
    meta, num_splits = schedule_args(inp, num_parts=3)
    out, lse = torch.ops.flashmla.mla_decode(*inp.args(meta, num_splits, scale, causal))
    assert_matches_oracle(out, lse, inp, scale, causal)


def test_causal_equals_full_when_single_token():
    inp = make_inputs([5, 70, 0], s_q=1, h_q=16)
    meta, num_splits = schedule_args(inp)
    a = torch.ops.flashmla.mla_decode(*inp.args(meta, num_splits, SCALE, False))
    b = torch.ops.flashmla.mla_decode(*inp.args(meta, num_splits, SCALE, True))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_causal_rows_with_no_key_are_empty():
    # seqlen 2 with s_q 4: tokens 0 and 1 see nothing, token 2 sees key 0, token 3 sees keys 0..1
    inp = make_inputs([2], s_q=4, h_q=3)
    meta, num_splits = schedule_args(inp)
    out, lse = torch.ops.flashmla.mla_decode(*inp.args(meta, num_splits, SCALE, True))
    assert torch.all(out[0, :2] == 0) and torch.all(lse[0, :, :2] == math.inf)
    assert torch.all(torch.isfinite(lse[0, :, 2:]))
    # with one visible key, the output is that key's value row (rounded to the dtype)
    v0 = inp.k_cache[inp.block_table[0, 0], 0, 0, :D_V]
    assert torch.equal(out[0, 2], v0.expand(3, D_V))


def test_nan_in_unused_slots_never_leaks():
    inp = make_inputs([1, 63, 129], s_q=2, h_q=16, unused_pages=4)
    assert torch.isnan(inp.k_cache.float()).any()
    meta, num_splits = schedule_args(inp)
    for causal in (False, True):
        out, lse = torch.ops.flashmla.mla_decode(*inp.args(meta, num_splits, SCALE, causal))
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_chunking_does_not_change_results(monkeypatch):
    inp = make_inputs([100, 0, 3, 257, 64, 1], s_q=2, h_q=16, h_kv=2)
    meta, num_splits = schedule_args(inp)
    args = inp.args(meta, num_splits, SCALE, True)
    whole = reference.mla_decode_reference(*args)
    monkeypatch.setattr(reference, "_CHUNK_BYTES", 1)  # one request per chunk
    chunked = reference.mla_decode_reference(*args)
    torch.testing.assert_close(chunked[0], whole[0], atol=0, rtol=0)
    torch.testing.assert_close(chunked[1], whole[1], atol=1e-6, rtol=1e-6)


def test_all_requests_empty():
    inp = make_inputs([0, 0], s_q=2, h_q=4)
    meta, num_splits = schedule_args(inp)
    out, lse = torch.ops.flashmla.mla_decode(*inp.args(meta, num_splits, SCALE, False))
    assert torch.all(out == 0) and torch.all(lse == math.inf)


def test_strided_inputs_and_outputs():
    """Only the last dim of q / k_cache / block_table / out must be contiguous."""
    inp = make_inputs([70, 5], s_q=2, h_q=16)
    meta, num_splits = schedule_args(inp)
    want = torch.ops.flashmla.mla_decode(*inp.args(meta, num_splits, SCALE, True))
    q = torch.empty(2, 3, 16, 576, dtype=inp.q.dtype)[:, 1:].copy_(inp.q)  # batch/seq strides padded
    pages = inp.k_cache.shape[0]
    k = torch.empty(pages, 64, 2, 576, dtype=inp.k_cache.dtype)[:, :, :1].copy_(inp.k_cache)
    bt = torch.empty(2, inp.block_table.shape[1] + 3, dtype=torch.int32)[:, 3:].copy_(inp.block_table)
    assert not q.is_contiguous() and not k.is_contiguous() and not bt.is_contiguous()
    got = torch.ops.flashmla.mla_decode(q, k, bt, inp.cache_seqlens, D_V, meta, num_splits, SCALE, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    out = torch.zeros(2, 2, 32, 512, dtype=inp.q.dtype)[:, :, ::2]  # head stride 1024
    lse = torch.zeros(2, 2, 16).transpose(1, 2)  # [b, h_q, s_q], not contiguous
    torch.ops.flashmla.mla_decode_out(
        q, k, bt, inp.cache_seqlens, D_V, meta, num_splits, SCALE, True, out, lse
    )
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])


def test_value_errors():
    inp = make_inputs([70, 5], s_q=1, h_q=16)
    meta, num_splits = schedule_args(inp)

    def call(seqlens=None, block_table=None):
        sl = inp.cache_seqlens if seqlens is None else torch.tensor(seqlens, dtype=torch.int32)
        bt = inp.block_table if block_table is None else block_table
        return torch.ops.flashmla.mla_decode(inp.q, inp.k_cache, bt, sl, D_V, meta, num_splits, SCALE, False)

    with pytest.raises(FlashMLAInputError, match=re.escape("flashmla: cache_seqlens[1] = -1 is negative")):
        call(seqlens=[70, -1])
    cols = inp.block_table.shape[1]
    too_long = cols * 64 + 1
    msg = (
        f"flashmla: cache_seqlens[0] = {too_long} needs {cols + 1} pages but block_table has only {cols} "
        "columns"
    )
    with pytest.raises(FlashMLAInputError, match=re.escape(msg)):
        call(seqlens=[too_long, 5])
    num_pages = inp.k_cache.shape[0]
    for bad in (-1, num_pages, PAD):
        bt = inp.block_table.clone()
        bt[0, 1] = bad
        msg = (
            f"flashmla: block_table[0, 1] = {bad} is used (cache_seqlens[0] = 70) but is not a valid page "
            f"index in [0, {num_pages})"
        )
        with pytest.raises(FlashMLAInputError, match=re.escape(msg)):
            call(block_table=bt)
    # garbage past the used pages is fine
    bt = inp.block_table.clone()
    bt[1, 1:] = -7
    call(block_table=bt)


def test_reference_functions_called_directly():
    """The reference takes tensors on any device: run it on CPU directly (the GPU tests reuse it on CUDA)."""
    inp = make_inputs([33, 0, 64], s_q=2, h_q=16, h_kv=2, dtype=torch.float16)
    meta, num_splits = reference.get_mla_metadata_reference(inp.cache_seqlens, 16, 2, 5)
    out, lse = reference.mla_decode_reference(*inp.args(meta, num_splits, SCALE, True))
    assert_matches_oracle(out, lse, inp, SCALE, True)
