"""FP8 KV cache on CUDA tensors: the sm_90a FP8 kernels against an independent float64 computation on the
dequantised cache (both formats, MTP, several kv heads, zero lengths, poisoned unused slots, a padded V3.2
page stride), and CUDA-graph replay with a new k_scale. A build without the FP8 kernels (no CUDA extension)
must raise the NotImplementedError that says so.

Skipped (with the reason) without a CUDA device; the kernel checks also need a Hopper GPU and the extension.
"""

from __future__ import annotations

import pytest
import torch
from _fp8 import assert_close_to_oracle, make_fp8_inputs, schedule
from _gpu import HOPPER_SKIP_REASON
from _helpers import D_V

import flashmla_ops
from flashmla_ops import flash_mla_with_kvcache, get_mla_metadata

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.gpu,
]

FORMATS = ["per_tensor", "v32"]
SCALE = 576**-0.5


def _has_fp8_kernel() -> bool:
    return not set(flashmla_ops._schema.FP8_OPS) & flashmla_ops._CUDA_STUB_OPS


@pytest.mark.parametrize("kv_format", FORMATS)
def test_fp8_without_kernel_raises(kv_format):
    if _has_fp8_kernel():
        pytest.skip("the compiled extension has FP8 kernels")
    inp = make_fp8_inputs([70, 5], 1, 16, 1, kv_format, poison=False).to_cuda()
    # CPU scheduler (the CUDA one needs the extension); its values do not matter here
    meta, num_splits = (
        t.cuda() for t in torch.ops.flashmla.get_mla_metadata(inp.cache_seqlens.cpu(), 16, 1, 8)
    )
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, D_V, meta, num_splits)
    out = torch.empty(2, 1, 16, D_V, dtype=inp.q.dtype, device="cuda")
    lse = torch.empty(2, 16, 1, device="cuda")
    for kw in ({}, {"out": out, "lse": lse}):
        with pytest.raises(NotImplementedError, match="FP8 KV-cache kernels for sm_90a are not built"):
            flash_mla_with_kvcache(*args, causal=True, is_fp8_kvcache=True, k_scale=inp.k_scale, **kw)


def _decode(inp, meta, num_splits, **kw):
    """flash_mla_with_kvcache on an FP8 case: default softmax scale, causal, k_scale as the case has it; `kw`:
    out, lse, workspace."""
    return flash_mla_with_kvcache(
        inp.q,
        inp.k_cache,
        inp.block_table,
        inp.cache_seqlens,
        D_V,
        meta,
        num_splits,
        None,
        True,
        True,
        k_scale=inp.k_scale,
        **kw,
    )


def _needs_kernel():
    if not _has_fp8_kernel():
        pytest.skip("no FP8 CUDA kernel in this version")
    if HOPPER_SKIP_REASON is not None:
        pytest.skip(HOPPER_SKIP_REASON)


@pytest.mark.parametrize("kv_format", FORMATS)
# Up to 32 query rows per kv head the ping-pong kernel runs (16 or 32 wide: (1, 16), (1, 8) padded, (2, 16)
# and (3, 8) with the causal mask, (1, 32, 2) with two kv heads); more rows the serial loop.
@pytest.mark.parametrize(
    "s_q,h_q,h_kv",
    [(1, 16, 1), (1, 8, 1), (2, 16, 1), (3, 8, 1), (2, 64, 1), (4, 128, 1), (1, 32, 2), (2, 128, 2)],
)
def test_fp8_kernel_matches_oracle(kv_format, s_q, h_q, h_kv):
    _needs_kernel()
    seqlens = [0, 1, 64, 65, 700, 4097][: 2 + s_q]
    inp = make_fp8_inputs(
        seqlens, s_q, h_q, h_kv, kv_format, seed=h_q + s_q, page_pad=64 * (kv_format == "v32")
    )
    inp.to_cuda()
    meta, num_splits = get_mla_metadata(inp.cache_seqlens, s_q * h_q // h_kv, h_kv, is_fp8_kvcache=True)
    out, lse = _decode(inp, meta, num_splits)
    assert_close_to_oracle(out.cpu(), lse.cpu(), inp, SCALE, True)


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("s_q,h_q", [(1, 16), (2, 16)])
def test_fp8_many_requests_per_part(kv_format, s_q, h_q):
    """Parts holding many requests, empty ones among them: the ping-pong kernel's producer walks the pages
    of every request of a part ahead of the consumers, across request boundaries, and its two warpgroups merge
    their states at every segment's end."""
    _needs_kernel()
    gen = torch.Generator().manual_seed(5)
    seqlens = torch.randint(0, 200, (150,), generator=gen).tolist()
    seqlens[3] = seqlens[40] = seqlens[41] = 0
    seqlens[7] = 3000
    inp = make_fp8_inputs(seqlens, s_q, h_q, 1, kv_format, seed=11, page_pad=64 * (kv_format == "v32"))
    inp.to_cuda()
    meta, num_splits = schedule(inp, num_parts=8)  # ~20 requests per part
    out, lse = _decode(inp, meta, num_splits)
    assert_close_to_oracle(out.cpu(), lse.cpu(), inp, SCALE, True)


@pytest.mark.parametrize("s_q,h_q", [(1, 16), (2, 16)])
def test_fp8_fp16_q(s_q, h_q):
    """Per-tensor FP8 with an fp16 q: the page is converted into fp16."""
    _needs_kernel()
    inp = make_fp8_inputs([0, 70, 1000, 64], s_q, h_q, 1, "per_tensor", dtype=torch.float16, seed=4)
    inp.to_cuda()
    meta, num_splits = get_mla_metadata(inp.cache_seqlens, s_q * h_q, 1, is_fp8_kvcache=True)
    out, lse = _decode(inp, meta, num_splits)
    assert_close_to_oracle(out.cpu(), lse.cpu(), inp, SCALE, True)


def test_fp8_cuda_graph_sees_a_new_k_scale():
    _needs_kernel()
    inp = make_fp8_inputs([300, 0, 65], 2, 64, 1, "per_tensor", seed=3).to_cuda()
    meta, num_splits = get_mla_metadata(inp.cache_seqlens, 128, 1, is_fp8_kvcache=True)
    out = torch.empty(3, 2, 64, D_V, dtype=inp.q.dtype, device="cuda")
    lse = torch.empty(3, 64, 2, device="cuda")
    ws = torch.empty(flashmla_ops.workspace_size(meta, 128, 1), device="cuda")

    def step():
        _decode(inp, meta, num_splits, out=out, lse=lse, workspace=ws)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    inp.k_scale.mul_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_oracle(out.cpu(), lse.cpu(), inp, SCALE, True)


def test_fp8_cuda_only_checks():
    """What only the CUDA kernels need, refused with a message before any launch: a V3.2 cache with a page
    stride TMA cannot read (not a multiple of 16 bytes), and V3.2 with an fp16 q (its kernel dequantises into
    bf16)."""
    _needs_kernel()
    odd = make_fp8_inputs([70, 5], 1, 16, 1, "v32", seed=2, page_pad=8).to_cuda()
    meta, num_splits = get_mla_metadata(odd.cache_seqlens, 16, 1, is_fp8_kvcache=True)
    args = (odd.q, odd.k_cache, odd.block_table, odd.cache_seqlens, D_V, meta, num_splits)
    with pytest.raises(RuntimeError, match="strides that are multiples of 16 bytes"):
        flash_mla_with_kvcache(*args, None, True, True)
    inp = make_fp8_inputs([70, 5], 1, 16, 1, "v32", seed=2).to_cuda()
    args = (inp.q.half(), inp.k_cache, inp.block_table, inp.cache_seqlens, D_V, meta, num_splits)
    with pytest.raises(RuntimeError, match="takes bfloat16 q on CUDA, got float16"):
        flash_mla_with_kvcache(*args, None, True, True)


def test_fp8_v32_large_group_scales():
    """V3.2 tile scales of 2^16 and beyond (a cache with values past 448 * 2^15): the kernel applies the scale
    in its own multiply, so the product stays finite and exact (one multiply by 2^112 * scale would overflow
    bf16 and turn every value of the tile into inf or NaN)."""
    _needs_kernel()
    inp = make_fp8_inputs([300, 65], 1, 16, 1, "v32", seed=9, poison=False)
    scales = inp.k_cache[..., 512:528].contiguous().view(torch.float32)
    inp.k_cache[..., 512:528] = (scales * 2.0**24).view(torch.uint8)  # 2^-7 -> 2^17
    inp.q = inp.q * 2.0**-24  # the same logits (exact: powers of two), outputs 2^24 larger
    inp.to_cuda()
    meta, num_splits = get_mla_metadata(inp.cache_seqlens, 16, 1, is_fp8_kvcache=True)
    out, lse = _decode(inp, meta, num_splits)  # k_scale None: V3.2
    assert torch.isfinite(out).all()
    assert_close_to_oracle(out.cpu(), lse.cpu(), inp, SCALE, True)
