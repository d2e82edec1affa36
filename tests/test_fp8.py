"""FP8 KV cache on CPU: the ops against an independent float64 computation on the dequantised cache, the
quantiser, opcheck, fakes, torch.compile, the CUDA stubs and every new error message."""

from __future__ import annotations

import itertools
import math
import re
import struct
import subprocess
import sys

import pytest
import torch
import torch._dynamo
from _fp8 import (
    E4M3_NAN_BYTES,
    V32_BYTES,
    assert_close_to_oracle,
    decode_float_bits,
    dequantize_f64,
    e4m3_value,
    make_fp8_inputs,
    schedule,
    slot_valid,
)
from _helpers import D_QK, D_V, make_inputs, schedule_args
from torch._subclasses.fake_tensor import FakeTensorMode

import flashmla_ops
from flashmla_ops import _schema, dequantize_kv_cache, flash_mla_with_kvcache, get_mla_metadata
from flashmla_ops import quantize_kv_cache as quantize
from flashmla_ops._validation import FlashMLAInputError

SCALE = 576**-0.5
FORMATS = ["per_tensor", "v32"]
FP8_MESSAGE = "flashmla: FP8 KV-cache kernels for sm_90a are not built in this version; "
MSG_K_SCALE_V32 = (
    "flashmla: k_scale must be None for a uint8 k_cache (DeepSeek V3.2 FP8 keeps its scales in the cache)"
)


# ---- decode against the float64 oracle --------------------------------------------------------------------
GRID = [
    (fmt, h_q, h_kv, s_q)
    for fmt, h_q, h_kv, s_q in itertools.product(FORMATS, [16, 64, 128], [1, 2], [1, 2, 4])
    if h_q % h_kv == 0
]
# b = 1..4, varlen, zero lengths, a length shorter than s_q, page boundaries
SEQLENS = [[130], [0, 64], [65, 3, 0], [200, 1, 64, 127]]


@pytest.mark.parametrize(
    "kv_format,h_q,h_kv,s_q", GRID, ids=[f"{f}-hq{a}-hkv{b}-sq{c}" for f, a, b, c in GRID]
)
def test_decode_matches_float64_oracle(kv_format, h_q, h_kv, s_q):
    i = GRID.index((kv_format, h_q, h_kv, s_q))
    seqlens = SEQLENS[i % len(SEQLENS)]
    dtype = torch.bfloat16 if i % 3 else torch.float16
    page_pad = 48 * (i % 2) if kv_format == "v32" else 0  # padded page stride on every other V3.2 case
    inp = make_fp8_inputs(seqlens, s_q, h_q, h_kv, kv_format, dtype, seed=i, page_pad=page_pad)
    meta, num_splits = schedule(inp)
    out, lse = torch.ops.flashmla.mla_decode_fp8(*inp.args(meta, num_splits, SCALE, True))
    assert_close_to_oracle(out, lse, inp, SCALE, True)
    for r, s in enumerate(seqlens):
        if s == 0:
            assert torch.all(out[r] == 0) and torch.all(lse[r] == math.inf)
    # the out-variant writes the same values
    out2, lse2 = torch.full_like(out, math.nan), torch.full_like(lse, math.nan)
    torch.ops.flashmla.mla_decode_fp8_out(*inp.args(meta, num_splits, SCALE, True), out2, lse2)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


@pytest.mark.parametrize("seed", range(4))
def test_decode_random_batches(seed):
    gen = torch.Generator().manual_seed(2000 + seed)
    b = int(torch.randint(1, 5, (), generator=gen))
    seqlens = torch.randint(0, 260, (b,), generator=gen).tolist()
    h_q, h_kv = [(16, 1), (32, 2), (64, 1), (128, 2)][seed]
    s_q = int(torch.randint(1, 4, (), generator=gen))
    causal = bool(seed % 2)
    scale = float(torch.rand((), generator=gen)) * 0.1 + 0.01
    fmt = FORMATS[seed % 2]
    inp = make_fp8_inputs(
        seqlens, s_q, h_q, h_kv, fmt, seed=seed, unused_pages=3, extra_cols=4, page_pad=16 * (fmt == "v32")
    )
    meta, num_splits = schedule(inp, 3)
    out, lse = torch.ops.flashmla.mla_decode_fp8(*inp.args(meta, num_splits, scale, causal))
    assert_close_to_oracle(out, lse, inp, scale, causal)


def test_poisoned_slots_really_are_poisoned():
    """The inputs of the tests above do hold NaN / garbage where no request reads."""
    for fmt in FORMATS:
        inp = make_fp8_inputs([70, 5], 1, 16, 2, fmt, seed=3)
        unused = ~slot_valid(inp.block_table, inp.seqlens, inp.k_cache.shape[0])
        deq = dequantize_f64(inp.k_cache, inp.k_scale)
        assert torch.isnan(deq[unused]).any() and not torch.isnan(deq[~unused]).any()
        if fmt == "per_tensor":
            assert set(inp.k_cache.view(torch.uint8)[unused].unique().tolist()) == set(E4M3_NAN_BYTES)


@pytest.mark.parametrize("kv_format", FORMATS)
def test_fp8_equals_dense_decode_of_the_dequantised_cache(kv_format):
    """The FP8 op attends over exactly the dequantised values: with power-of-two scales they are exact in
    bfloat16, so the dense op on that bf16 cache gives the same result (up to the chunking of the batch)."""
    inp = make_fp8_inputs([100, 0, 64, 7], 2, 32, 2, kv_format, seed=5, poison=False)
    if kv_format == "per_tensor":
        inp.k_scale = torch.tensor([2.0**-5])
    meta, num_splits = schedule(inp)
    out, lse = torch.ops.flashmla.mla_decode_fp8(*inp.args(meta, num_splits, SCALE, True))
    dense = dequantize_kv_cache(inp.k_cache, inp.k_scale)
    assert torch.equal(dense.bfloat16().float(), dense)
    want = torch.ops.flashmla.mla_decode(
        inp.q, dense.bfloat16(), inp.block_table, inp.cache_seqlens, D_V, meta, num_splits, SCALE, True
    )
    torch.testing.assert_close(out, want[0], atol=0, rtol=0)
    torch.testing.assert_close(lse, want[1], atol=1e-6, rtol=1e-6)


def test_v32_padded_page_stride_and_any_strides():
    """A padded page stride (garbage in the padding) and a cache sliced out of a wider one give the same
    result as the contiguous cache."""
    inp = make_fp8_inputs([150, 20], 2, 16, 2, "v32", seed=9, page_pad=80)
    meta, num_splits = schedule(inp)
    got = torch.ops.flashmla.mla_decode_fp8(*inp.args(meta, num_splits, SCALE, True))
    assert not inp.k_cache.is_contiguous()
    contiguous = inp.k_cache.contiguous()
    want = torch.ops.flashmla.mla_decode_fp8(
        inp.q, contiguous, inp.block_table, inp.cache_seqlens, D_V, meta, num_splits, SCALE, True, None
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # the second of two kv heads of a [.., 2, 656] cache: head stride 656, token stride 1312
    wide = torch.stack([torch.zeros_like(contiguous), contiguous], dim=3).flatten(2, 3)  # [N, 64, 4, 656]
    one_head = wide[:, :, 1::2]
    got = torch.ops.flashmla.mla_decode_fp8(
        inp.q, one_head, inp.block_table, inp.cache_seqlens, D_V, meta, num_splits, SCALE, True, None
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_causal_single_visible_key_is_its_dequantised_value():
    inp = make_fp8_inputs([2], 4, 3, 1, "v32", seed=11)
    meta, num_splits = schedule(inp)
    out, lse = torch.ops.flashmla.mla_decode_fp8(*inp.args(meta, num_splits, SCALE, True))
    assert torch.all(out[0, :2] == 0) and torch.all(lse[0, :, :2] == math.inf)
    v0 = dequantize_kv_cache(inp.k_cache[inp.block_table[0, 0], 0, 0, :])[:D_V]
    assert torch.equal(out[0, 2], v0.to(out.dtype).expand(3, D_V))


def test_value_errors_as_the_dense_op():
    inp = make_fp8_inputs([70, 5], 1, 16, 1, "per_tensor", poison=False)
    meta, num_splits = schedule(inp)
    args = list(inp.args(meta, num_splits, SCALE, False))
    args[3] = torch.tensor([70, -1], dtype=torch.int32)
    with pytest.raises(FlashMLAInputError, match=re.escape("flashmla: cache_seqlens[1] = -1 is negative")):
        torch.ops.flashmla.mla_decode_fp8(*args)


# ---- public API -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_format", FORMATS)
def test_api_routes_to_the_fp8_ops(kv_format):
    inp = make_fp8_inputs([70, 0, 3], 2, 16, 1, kv_format, seed=1)
    meta, num_splits = get_mla_metadata(inp.cache_seqlens, 32, 1, is_fp8_kvcache=True)
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, D_V, meta, num_splits)
    want = torch.ops.flashmla.mla_decode_fp8(*args, SCALE, True, inp.k_scale)
    got = flash_mla_with_kvcache(*args, None, True, True, k_scale=inp.k_scale)  # FlashMLA's positions
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    out, lse = torch.full_like(want[0], 7.0), torch.full_like(want[1], 7.0)
    ws = torch.empty(flashmla_ops.workspace_size(meta, 32, 1))
    got = flash_mla_with_kvcache(
        *args, causal=True, is_fp8_kvcache=True, k_scale=inp.k_scale, out=out, lse=lse, workspace=ws
    )
    assert got[0] is out and got[1] is lse
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    if kv_format == "per_tensor":  # a Python float works too
        got = flash_mla_with_kvcache(*args, causal=True, is_fp8_kvcache=True, k_scale=float(inp.k_scale))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_api_k_scale_float_is_a_float32_tensor_on_qs_device(monkeypatch):
    inp = make_fp8_inputs([10], 1, 16, 1, "per_tensor", poison=False)
    meta, num_splits = get_mla_metadata(inp.cache_seqlens, 16, 1)
    seen = []

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    real = torch.ops.flashmla.mla_decode_fp8
    monkeypatch.setattr(torch.ops.flashmla, "mla_decode_fp8", spy)
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, D_V, meta, num_splits)
    flash_mla_with_kvcache(*args, is_fp8_kvcache=True, k_scale=0.25)
    (k_scale,) = seen
    assert k_scale.dtype == torch.float32 and k_scale.shape == (1,) and float(k_scale) == 0.25
    assert k_scale.device == inp.q.device


# ---- quantiser ---------------------------------------------------------------------------------------------
FINITE_E4M3_BYTES = torch.tensor([b for b in range(256) if b not in E4M3_NAN_BYTES], dtype=torch.uint8)


def _e4m3_grid(shape, gen) -> torch.Tensor:
    """Random finite e4m3 values (every code, subnormals included) as float32, drawn without torch's cast."""
    idx = torch.randint(0, len(FINITE_E4M3_BYTES), shape, generator=gen)
    return decode_bytes(FINITE_E4M3_BYTES[idx]).float()


def decode_bytes(b: torch.Tensor) -> torch.Tensor:
    return decode_float_bits(b, 4, 3, ieee=False)


def test_e4m3_decoder_agrees_with_torch():
    """The tests' independent decoder and torch's float8_e4m3fn agree on all 256 codes."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours = decode_bytes(codes)
    theirs = codes.view(torch.float8_e4m3fn).double()
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    assert e4m3_value(0x7E) == 448.0 and e4m3_value(0x01) == 2.0**-9 and math.isnan(e4m3_value(0xFF))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_per_tensor_round_trip_is_exact_for_representable_values(dtype):
    gen = torch.Generator().manual_seed(0)
    scale = 2.0**-3
    x = (_e4m3_grid((5, 64, 2, 576), gen) * scale).to(dtype)
    kq, k_scale = quantize(x, "per_tensor", scale)
    assert kq.dtype == torch.float8_e4m3fn and kq.shape == x.shape
    assert k_scale.dtype == torch.float32 and k_scale.shape == (1,) and float(k_scale) == scale
    assert torch.equal(dequantize_kv_cache(kq, k_scale), x.float())
    assert torch.equal(dequantize_f64(kq, k_scale), x.double())
    # the same scale as a tensor is used as is (and returned)
    t = torch.tensor([scale])
    kq2, k_scale2 = quantize(x, "per_tensor", t)
    assert k_scale2 is t and torch.equal(kq2.view(torch.uint8), kq.view(torch.uint8))


def _error_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Half an e4m3 ulp: |x| / 16 for normals, scale * 2**-10 below e4m3's smallest normal (times scale)."""
    return torch.maximum(x.abs() / 16, scale * 2.0**-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_tensor_default_scale_and_error_bound(dtype):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(7, 64, 1, 576, generator=gen) * 3).to(dtype)
    x[3, 5, 0, 100] = -40.0  # the amax
    kq, k_scale = quantize(x)
    assert torch.equal(k_scale, torch.tensor([40.0 / 448]))
    assert kq.view(torch.uint8)[3, 5, 0, 100] == 0xFE  # -448
    back = dequantize_kv_cache(kq, k_scale).double()
    bound = _error_bound(x.double(), k_scale.double()) * (1 + 1e-6)
    assert torch.all((back - x.double()).abs() <= bound)


def test_v32_round_trip_is_exact_for_representable_values():
    """Tiles of e4m3 values times 2**k whose amax is 448 * 2**k get the scale 2**k: exact round trip."""
    gen = torch.Generator().manual_seed(2)
    tiles = _e4m3_grid((6, 64, 2, 4, 128), gen)
    tiles[..., 17] = 448.0
    exps = torch.randint(-20, 10, (6, 64, 2, 4), generator=gen)
    nope = (tiles * torch.pow(2.0, exps.double()).float()[..., None]).flatten(-2)
    rope = torch.randn(6, 64, 2, 64, generator=gen)
    x = torch.cat([nope, rope], dim=-1).bfloat16()  # e4m3 * 2**k is exact in bfloat16
    kq, none = quantize(x, "v32")
    assert none is None and kq.dtype == torch.uint8 and kq.shape == (6, 64, 2, V32_BYTES)
    assert kq.is_contiguous()
    assert torch.equal(dequantize_kv_cache(kq), x.float())
    assert torch.equal(dequantize_f64(kq, None), x.double())
    scales = kq[..., 512:528].contiguous().view(torch.float32)  # exactly 2**k
    assert torch.equal(scales.double(), torch.pow(2.0, exps.double()))


def test_v32_byte_layout():
    """One token read with struct: 512 e4m3, 4 little-endian float32 scales, 64 little-endian bfloat16."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, 1, 576, generator=gen, dtype=torch.float32).bfloat16()
    x[0, 0, 0, :128] *= 1000.0
    x[0, 0, 0, 128:256] = 0.0  # an all-zero tile: scale 1
    x[0, 0, 0, 256:384] *= 1e-6
    kq, _ = quantize(x, "v32")
    token = bytes(kq[0, 0, 0].tolist())
    assert len(token) == 656
    scales = struct.unpack("<4f", token[512:528])
    for t, s in enumerate(scales):
        amax = float(x[0, 0, 0, 128 * t : 128 * (t + 1)].float().abs().max())
        want = 1.0 if amax == 0 else 2.0 ** math.ceil(math.log2(amax / 448))
        assert s == want, (t, s, want)
        assert math.frexp(s)[0] == 0.5  # a power of two
    rope_bits = struct.unpack("<64H", token[528:656])
    rope = torch.tensor([struct.unpack("<f", struct.pack("<I", b << 16))[0] for b in rope_bits])
    assert torch.equal(rope, x[0, 0, 0, 512:].float())
    values = torch.tensor([e4m3_value(b) for b in token[:512]])
    want = x[0, 0, 0, :512].float().view(4, 128) / torch.tensor(scales)[:, None]
    assert torch.all((values.view(4, 128) - want).abs() <= _error_bound(want, torch.tensor(1.0)))
    assert torch.all(values[128:256] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_v32_error_bound(dtype):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 64, 1, 576, generator=gen) * torch.rand(5, 64, 1, 1, generator=gen) * 50).to(dtype)
    kq, _ = quantize(x, "v32")
    back = dequantize_kv_cache(kq).double()
    xd = x.double()
    scales = kq[..., 512:528].contiguous().view(torch.float32).double()  # [5, 64, 1, 4]
    amax = xd[..., :512].unflatten(-1, (4, 128)).abs().amax(-1)
    assert torch.all(scales >= amax / 448) and torch.all(scales < amax / 224)  # the smallest power of two
    bound = _error_bound(xd[..., :512].unflatten(-1, (4, 128)), scales[..., None]).flatten(-2)
    assert torch.all((back[..., :512] - xd[..., :512]).abs() <= bound)
    assert torch.equal(back[..., 512:], x[..., 512:].bfloat16().double())  # RoPE: bfloat16 (exact for bf16)


def test_quantiser_corner_cases():
    zeros = torch.zeros(2, 64, 1, 576, dtype=torch.bfloat16)
    kq, k_scale = quantize(zeros)  # amax 0: scale 1
    assert float(k_scale) == 1.0 and torch.all(kq.view(torch.uint8) == 0)
    kv, _ = quantize(zeros, "v32")
    assert torch.all(kv[..., 512:528].contiguous().view(torch.float32) == 1.0)
    assert torch.equal(dequantize_kv_cache(kv), zeros.float())
    # saturation at +-448 * scale; NaN stays NaN; amax ignores non-finite values
    x = torch.full((1, 576), 0.25)
    x[0, :6] = torch.tensor([1.0, 1000.0, -1000.0, math.nan, math.inf, 0.5])
    kq, k_scale = quantize(x, "per_tensor", 1.0)
    codes = kq.view(torch.uint8)[0, :6].tolist()
    assert codes[:3] == [0x38, 0x7E, 0xFE] and codes[3] in E4M3_NAN_BYTES and codes[4:] == [0x7E, 0x30]
    _, k_scale = quantize(x)
    assert torch.equal(k_scale, torch.tensor([1000.0 / 448]))
    kv, _ = quantize(x, "v32")
    scales = kv[..., 512:528].contiguous().view(torch.float32)
    assert scales[0, 0] == 4.0  # 2 ** ceil(log2(1000 / 448)), the NaN and inf ignored
    back = dequantize_kv_cache(kv)
    assert back[0, 1] == 256 * 4.0 and back[0, 2] == -256 * 4.0  # 250 rounds to e4m3's 256
    assert math.isnan(back[0, 3]) and back[0, 4] == 448 * 4.0  # inf saturates
    # any leading dims; an empty cache
    assert quantize(torch.zeros(0, 576))[0].shape == (0, 576)
    assert quantize(torch.zeros(3, 576), "v32")[0].shape == (3, V32_BYTES)


@pytest.mark.parametrize("kv_format", FORMATS)
def test_quantiser_slices_give_the_same_result(kv_format, monkeypatch):
    """The helpers work through a big cache in slices along dim 0: the slicing changes nothing."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 64, 2, 576, generator=gen).bfloat16()
    x[4, 7, 1, 3] = 90.0  # the amax, in the last slice
    whole = quantize(x, kv_format)
    whole_back = dequantize_kv_cache(*whole)
    monkeypatch.setattr(flashmla_ops.fp8, "_CHUNK_VALUES", 2 * 64 * 2 * 576)  # 2 pages per slice
    sliced = quantize(x, kv_format)
    assert torch.equal(sliced[0].view(torch.uint8), whole[0].view(torch.uint8))
    assert (sliced[1] is None) == (whole[1] is None) and (
        whole[1] is None or torch.equal(sliced[1], whole[1])
    )
    assert torch.equal(dequantize_kv_cache(*sliced), whole_back)


def test_quantised_cache_decodes_close_to_the_dense_cache():
    """End to end: attention over the quantised cache stays close to attention over the original one."""
    inp = make_inputs([300, 64, 0], 2, 64, 1, seed=5, poison=False)
    meta, num_splits = schedule_args(inp)
    args = (inp.block_table, inp.cache_seqlens, D_V, meta, num_splits, SCALE, True)
    dense = torch.ops.flashmla.mla_decode(inp.q, inp.k_cache, *args)
    for fmt in FORMATS:
        kq, k_scale = quantize(inp.k_cache, fmt)
        out, lse = torch.ops.flashmla.mla_decode_fp8(inp.q, kq, *args, k_scale)
        assert (out.float() - dense[0].float()).abs().max() < 0.1 * dense[0].float().abs().max()
        assert (lse - dense[1])[:2].abs().max() < 0.1


# ---- fakes, opcheck, torch.compile -------------------------------------------------------------------------
@pytest.mark.parametrize("kv_format", FORMATS)
def test_fakes(kv_format):
    inp = make_fp8_inputs([65, 3], 2, 16, 2, kv_format, poison=False)
    meta, num_splits = schedule(inp)
    with FakeTensorMode() as mode:
        args = [
            mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
            for a in inp.args(meta, num_splits, 0.1, True)
        ]
        out, lse = torch.ops.flashmla.mla_decode_fp8(*args)
        assert out.shape == (2, 2, 16, D_V) and out.dtype == torch.bfloat16 and out.is_contiguous()
        assert lse.shape == (2, 16, 2) and lse.dtype == torch.float32 and lse.is_contiguous()
        assert (
            torch.ops.flashmla.mla_decode_fp8_out(*args, torch.empty_like(out), torch.empty_like(lse)) is None
        )
    # meta device: shapes only, no values anywhere
    dev = "meta"
    k = (
        torch.empty(9, 64, 2, 576, dtype=torch.float8_e4m3fn, device=dev)
        if kv_format == "per_tensor"
        else torch.empty(9, 64, 2, V32_BYTES, dtype=torch.uint8, device=dev)
    )
    k_scale = torch.empty(1, device=dev) if kv_format == "per_tensor" else None
    q = torch.empty(3, 4, 128, 576, dtype=torch.float16, device=dev)
    bt = torch.empty(3, 5, dtype=torch.int32, device=dev)
    sl = torch.empty(3, dtype=torch.int32, device=dev)
    m, ns = torch.ops.flashmla.get_mla_metadata(sl, 256, 2, 7)
    out, lse = torch.ops.flashmla.mla_decode_fp8(q, k, bt, sl, D_V, m, ns, SCALE, True, k_scale)
    assert out.device.type == dev and out.shape == (3, 4, 128, D_V) and out.dtype == torch.float16
    assert lse.device.type == dev and lse.shape == (3, 128, 4) and lse.dtype == torch.float32


OPCHECK_SAMPLES = [
    # (format, seqlens, s_q, h_q, h_kv, dtype, causal, num_parts)
    ("per_tensor", [0, 70, 129], 1, 16, 1, torch.bfloat16, False, 4),
    ("per_tensor", [3, 64], 2, 16, 2, torch.float16, True, 8),
    ("v32", [200], 4, 3, 1, torch.bfloat16, True, 1),
    ("v32", [1, 130, 65], 2, 64, 2, torch.float16, True, 5),
]


@pytest.mark.parametrize(
    "kv_format,seqlens,s_q,h_q,h_kv,dtype,causal,num_parts",
    OPCHECK_SAMPLES,
    ids=[f"{s[0]}-b{len(s[1])}-sq{s[2]}-hq{s[3]}-hkv{s[4]}" for s in OPCHECK_SAMPLES],
)
def test_opcheck(kv_format, seqlens, s_q, h_q, h_kv, dtype, causal, num_parts, monkeypatch):
    # opcheck's test_schema compares each argument before and after the call with torch.allclose, which
    # torch 2.13 does not implement for float8 on CPU ("mul_cpu_reduced_float"); compare float8 bitwise.
    allclose = torch.allclose

    def allclose_float8_bitwise(a, b, *args, **kwargs):
        if a.dtype == b.dtype == torch.float8_e4m3fn:
            return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        return allclose(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "allclose", allclose_float8_bitwise)
    inp = make_fp8_inputs(
        seqlens, s_q, h_q, h_kv, kv_format, dtype, seed=len(seqlens), page_pad=32 * (kv_format == "v32")
    )
    meta, num_splits = schedule(inp, num_parts)
    args = inp.args(meta, num_splits, SCALE, causal)
    torch.library.opcheck(torch.ops.flashmla.mla_decode_fp8.default, args)
    b = len(seqlens)
    out, lse = torch.empty(b, s_q, h_q, D_V, dtype=dtype), torch.empty(b, h_q, s_q)
    torch.library.opcheck(torch.ops.flashmla.mla_decode_fp8_out.default, (*args, out, lse))
    workspace = torch.empty(flashmla_ops.workspace_size(meta, s_q * h_q // h_kv, h_kv))
    torch.library.opcheck(torch.ops.flashmla.mla_decode_fp8_out.default, (*args, out, lse, workspace))


S_Q, H_Q = 2, 16


def _two_format_step(q, k_pt, k_scale, k_v32, block_table, cache_seqlens, out=None, lse=None):
    """One decode step over two layers: a per-tensor FP8 cache, then a V3.2 cache (out-variant if given)."""
    meta, num_splits = get_mla_metadata(cache_seqlens, S_Q * H_Q, 1, is_fp8_kvcache=True)
    kw = {} if out is None else {"out": out, "lse": lse}
    o1, l1 = flash_mla_with_kvcache(
        q, k_pt, block_table, cache_seqlens, D_V, meta, num_splits, None, True, True, k_scale=k_scale
    )
    o2, l2 = flash_mla_with_kvcache(
        o1.repeat(1, 1, 1, 2)[..., :D_QK].contiguous(),
        k_v32,
        block_table,
        cache_seqlens,
        D_V,
        meta,
        num_splits,
        causal=True,
        is_fp8_kvcache=True,
        **kw,
    )
    return o2.float().sum() + l1.clamp(max=50).sum(), o2, l2


def _compile_inputs(seqlens, seed):
    a = make_fp8_inputs(seqlens, S_Q, H_Q, 1, "per_tensor", seed=seed)
    b = make_fp8_inputs(seqlens, S_Q, H_Q, 1, "v32", seed=seed, page_pad=16)  # same pages as a
    return a.q, a.k_cache, a.k_scale, b.k_cache, a.block_table, a.cache_seqlens


def test_compile_fullgraph_inductor():
    """torch.compile(fullgraph=True) with Inductor: new values reuse the graph; same results as eager."""
    torch._dynamo.reset()
    compiled = torch.compile(_two_format_step, fullgraph=True)
    for i, seqlens in enumerate(([70, 0, 129], [5, 64, 190])):
        args = _compile_inputs(seqlens, i)
        want = _two_format_step(*args)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(*args)
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-2)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_compile_dynamic_out_variant():
    """Dynamic batch, out-variant (the caller's buffers are written), aot_eager."""
    torch._dynamo.reset()
    compiled = torch.compile(_two_format_step, fullgraph=True, dynamic=True, backend="aot_eager")
    for i, seqlens in enumerate(([70, 0, 129], [5, 64, 1, 300], [9] * 6)):
        args = _compile_inputs(seqlens, i)
        b = len(seqlens)
        want = _two_format_step(*args)
        out, lse = torch.zeros(b, S_Q, H_Q, D_V, dtype=torch.bfloat16), torch.zeros(b, H_Q, S_Q)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(*args, out, lse)
        assert torch.equal(out, want[1]) and torch.equal(lse, want[2]) and torch.equal(got[0], want[0])


def test_compile_python_float_k_scale():
    torch._dynamo.reset()
    inp = make_fp8_inputs([70, 3], S_Q, H_Q, 1, "per_tensor", seed=4)

    def step(q, k_cache, block_table, cache_seqlens):
        meta, num_splits = get_mla_metadata(cache_seqlens, S_Q * H_Q, 1, is_fp8_kvcache=True)
        return flash_mla_with_kvcache(
            q,
            k_cache,
            block_table,
            cache_seqlens,
            D_V,
            meta,
            num_splits,
            causal=True,
            is_fp8_kvcache=True,
            k_scale=0.0125,
        )

    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    want = step(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- CUDA stubs --------------------------------------------------------------------------------------------
def test_fp8_cuda_stubs():
    """Without a compiled FP8 kernel, the FP8 ops' CUDA kernels raise NotImplementedError (no GPU needed)."""
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    inp = make_fp8_inputs([5], 1, 16, 1, "per_tensor", poison=False)
    meta, num_splits = schedule(inp)
    args = inp.args(meta, num_splits, SCALE, False)
    out, lse = torch.empty(1, 1, 16, D_V, dtype=torch.bfloat16), torch.empty(1, 16, 1)
    calls = {"mla_decode_fp8": args, "mla_decode_fp8_out": (*args, out, lse)}
    assert set(calls) == set(_schema.FP8_OPS)
    for name, call_args in calls.items():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"flashmla::{name}", "CUDA")
        if name not in flashmla_ops._CUDA_STUB_OPS:  # a compiled kernel: nothing to check here
            continue
        with pytest.raises(NotImplementedError) as info:
            getattr(torch.ops.flashmla, name).default.redispatch(cuda, *call_args)
        msg = str(info.value)
        assert msg.startswith(FP8_MESSAGE + f"torch.ops.flashmla.{name} was called on CUDA tensors and ")
        assert "flashmla_ops.dequantize_kv_cache(k_cache, k_scale).to(q.dtype)" in msg
        if flashmla_ops.cuda_extension_available():
            assert "the compiled extension (flashmla_ops._C) registers no CUDA kernel for it" in msg
        else:
            assert flashmla_ops._C_IMPORT_ERROR in msg


_TAKEOVER = """
import importlib, sys, types
import torch

real_import = importlib.import_module


def fake_import(name, *args, **kwargs):
    # a stand-in for a compiled extension that registers a CUDA kernel for mla_decode_fp8 only
    if name == "flashmla_ops._C":
        module = types.ModuleType(name)
        module.lib = torch.library.Library("flashmla", "IMPL")
        module.lib.impl("mla_decode_fp8", lambda *a: None, "CUDA")
        sys.modules[name] = module
        return module
    return real_import(name, *args, **kwargs)


importlib.import_module = fake_import
import flashmla_ops

importlib.import_module = real_import
print(flashmla_ops.cuda_extension_available(), sorted(flashmla_ops._CUDA_STUB_OPS))
"""


def test_a_compiled_fp8_kernel_takes_over(tmp_path):
    """An extension that registers a CUDA kernel for an FP8 op gets no Python stub for it."""
    res = subprocess.run(
        [sys.executable, "-c", _TAKEOVER], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[0] == "True ['mla_decode_fp8_out']"


# ---- input errors ------------------------------------------------------------------------------------------
def expect(fn, message: str) -> None:
    with pytest.raises(RuntimeError, match=re.escape(message)) as info:
        fn()
    assert isinstance(info.value, ValueError) and isinstance(info.value, FlashMLAInputError)
    assert str(info.value) == message


def fp8_base(kv_format: str) -> dict:
    """Valid FP8 arguments: b=2, s_q=2, h_q=16, h_kv=1, bf16 q, 8 scheduler parts (as test_validation's)."""
    inp = make_fp8_inputs([70, 5], 2, 16, 1, kv_format, poison=False)
    meta, num_splits = schedule(inp, 8)
    return {
        "q": inp.q,
        "k_cache": inp.k_cache,
        "block_table": inp.block_table,
        "cache_seqlens": inp.cache_seqlens,
        "head_dim_v": D_V,
        "tile_scheduler_metadata": meta,
        "num_splits": num_splits,
        "k_scale": inp.k_scale,
        "out": torch.zeros(2, 2, 16, D_V, dtype=torch.bfloat16),
        "lse": torch.zeros(2, 16, 2),
        "workspace": torch.zeros(2 * 8 * 32 * 513),
    }


def run_fp8(route: str, d: dict, with_out: bool) -> None:
    args = [d[k] for k in ("q", "k_cache", "block_table", "cache_seqlens", "head_dim_v")]
    args += [d["tile_scheduler_metadata"], d["num_splits"], SCALE, True]
    if route == "api":
        kw = {"out": d["out"], "lse": d["lse"], "workspace": d["workspace"]} if with_out else {}
        flash_mla_with_kvcache(*args[:7], SCALE, True, True, k_scale=d["k_scale"], **kw)
        return
    args.append(d["k_scale"])
    if with_out:
        args += [d["out"], d["lse"], d["workspace"]]
    op = torch.ops.flashmla.mla_decode_fp8_out if with_out else torch.ops.flashmla.mla_decode_fp8
    if route == "op":
        op(*args)
        return
    with FakeTensorMode() as mode:
        op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))


def _strided_last(t: torch.Tensor) -> torch.Tensor:
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    return wide[..., ::2].copy_(t)


FP8_CASES = [
    # (id, formats, mutation, message)
    (
        "kv-bf16",
        FORMATS,
        lambda d: d.update(k_cache=torch.zeros(5, 64, 1, 576, dtype=torch.bfloat16)),
        "flashmla: an FP8 k_cache must be float8_e4m3fn (per-tensor scale, [num_pages, 64, h_kv, 576]) or "
        "uint8 (DeepSeek V3.2, [num_pages, 64, h_kv, 656]), got bfloat16",
    ),
    (
        "kv-int8",
        ["v32"],
        lambda d: d.update(k_cache=d["k_cache"].view(torch.int8)),
        "flashmla: an FP8 k_cache must be float8_e4m3fn (per-tensor scale, [num_pages, 64, h_kv, 576]) or "
        "uint8 (DeepSeek V3.2, [num_pages, 64, h_kv, 656]), got int8",
    ),
    (
        "kv-e5m2",
        ["per_tensor"],
        lambda d: d.update(k_cache=d["k_cache"].view(torch.float8_e5m2)),
        "flashmla: an FP8 k_cache must be float8_e4m3fn (per-tensor scale, [num_pages, 64, h_kv, 576]) or "
        "uint8 (DeepSeek V3.2, [num_pages, 64, h_kv, 656]), got float8_e5m2",
    ),
    (
        "uint8-576",
        ["per_tensor"],
        lambda d: d.update(k_cache=d["k_cache"].view(torch.uint8), k_scale=None),
        "flashmla: a uint8 k_cache (DeepSeek V3.2 FP8) must have 656 bytes per token (size(-1)), got 576; "
        "a per-tensor FP8 cache (576 values per token) must be float8_e4m3fn",
    ),
    (
        "e4m3-656",
        ["v32"],
        lambda d: d.update(k_cache=d["k_cache"].view(torch.float8_e4m3fn), k_scale=torch.ones(1)),
        "flashmla: a float8_e4m3fn k_cache (per-tensor FP8) must have head dim (size(-1)) 576, got 656; "
        "a DeepSeek V3.2 cache (656 bytes per token) must be uint8",
    ),
    (
        "v32-3d",
        ["v32"],
        lambda d: d.update(k_cache=d["k_cache"][:, :, 0]),
        "flashmla: k_cache must be a 4-D tensor [num_pages, 64, h_kv, 656], got shape [5, 64, 656]",
    ),
    (
        "per-tensor-5d",
        ["per_tensor"],
        lambda d: d.update(k_cache=d["k_cache"][None]),
        "flashmla: k_cache must be a 4-D tensor [num_pages, 64, h_kv, 576], got shape [1, 5, 64, 1, 576]",
    ),
    (
        "page-size",
        FORMATS,
        lambda d: d.update(k_cache=d["k_cache"][:, :32]),
        "flashmla: k_cache page size (size(1)) must be 64, got 32",
    ),
    (
        "heads-not-divisible",
        FORMATS,
        lambda d: d.update(k_cache=torch.cat([d["k_cache"]] * 3, dim=2)),
        "flashmla: the number of query heads (16) must be a positive multiple of h_kv (3)",
    ),
    (
        "k_cache-device",
        FORMATS,
        lambda d: d.update(k_cache=d["k_cache"].to("meta")),
        "flashmla: k_cache must be on the same device as q (cpu), got meta",
    ),
    (
        "v32-last-dim",
        ["v32"],
        lambda d: d.update(k_cache=_strided_last(d["k_cache"])),
        "flashmla: k_cache must have a contiguous last dimension, got strides [83968, 1312, 1312, 2]",
    ),
    (
        "k_scale-missing",
        ["per_tensor"],
        lambda d: d.update(k_scale=None),
        "flashmla: a float8_e4m3fn k_cache (per-tensor FP8) needs k_scale, a float32 tensor of shape [1]",
    ),
    (
        "k_scale-for-v32",
        ["v32"],
        lambda d: d.update(k_scale=torch.ones(1)),
        MSG_K_SCALE_V32,
    ),
    (
        "k_scale-float64",
        ["per_tensor"],
        lambda d: d.update(k_scale=d["k_scale"].double()),
        "flashmla: k_scale must be float32, got float64",
    ),
    (
        "k_scale-bf16",
        ["per_tensor"],
        lambda d: d.update(k_scale=d["k_scale"].bfloat16()),
        "flashmla: k_scale must be float32, got bfloat16",
    ),
    (
        "k_scale-0d",
        ["per_tensor"],
        lambda d: d.update(k_scale=d["k_scale"][0]),
        "flashmla: k_scale must have shape [1], got []",
    ),
    (
        "k_scale-2",
        ["per_tensor"],
        lambda d: d.update(k_scale=torch.ones(2)),
        "flashmla: k_scale must have shape [1], got [2]",
    ),
    (
        "k_scale-1x1",
        ["per_tensor"],
        lambda d: d.update(k_scale=torch.ones(1, 1)),
        "flashmla: k_scale must have shape [1], got [1, 1]",
    ),
    (
        "k_scale-device",
        ["per_tensor"],
        lambda d: d.update(k_scale=d["k_scale"].to("meta")),
        "flashmla: k_scale must be on the same device as q (cpu), got meta",
    ),
]
FP8_PARAMS = [
    pytest.param(fmt, mutate, message, id=f"{case_id}-{fmt}")
    for case_id, formats, mutate, message in FP8_CASES
    for fmt in formats
]
ROUTES = ["op", "fake", "api"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("with_out", [False, True], ids=["functional", "out"])
@pytest.mark.parametrize("kv_format,mutate,message", FP8_PARAMS)
def test_fp8_input_errors(kv_format, mutate, message, with_out, route):
    d = fp8_base(kv_format)
    run_fp8(route, d, with_out)  # valid inputs pass
    mutate(d)
    expect(lambda: run_fp8(route, d, with_out), message)


def _shared_cases():
    """test_validation's cases that leave k_cache alone: the FP8 ops check them too, in the same order."""
    from test_validation import DECODE_CASES, OUT_CASES
    from test_validation import base as dense_base

    params = []
    for cases, with_out in ((DECODE_CASES, None), (OUT_CASES, True)):
        for i, (case_id, mutate, message) in enumerate(cases):
            d = dense_base()
            k_cache = d["k_cache"]
            mutate(d)
            if d["k_cache"] is not k_cache:
                continue
            fmt = FORMATS[i % 2]
            outs = [False, True] if with_out is None else [True]
            params += [
                pytest.param(fmt, mutate, message, w, id=f"{case_id}-{fmt}-{'out' if w else 'fn'}")
                for w in outs
            ]
    return params


@pytest.mark.parametrize("route", ["op", "fake"])
@pytest.mark.parametrize("kv_format,mutate,message,with_out", _shared_cases())
def test_fp8_shared_input_errors(kv_format, mutate, message, with_out, route):
    d = fp8_base(kv_format)
    mutate(d)
    expect(lambda: run_fp8(route, d, with_out), message)


def test_api_only_errors():
    for fmt in FORMATS:
        d = fp8_base(fmt)
        args = [d[k] for k in ("q", "k_cache", "block_table", "cache_seqlens", "head_dim_v")]
        args += [d["tile_scheduler_metadata"], d["num_splits"]]
        dtype = "float8_e4m3fn" if fmt == "per_tensor" else "uint8"
        expect(
            lambda a=args: flash_mla_with_kvcache(*a),
            f"flashmla: k_cache has dtype {dtype}, an FP8 KV cache: pass is_fp8_kvcache=True (and k_scale "
            "for a float8_e4m3fn cache)",
        )
    dense = make_inputs([10], 1, 16)
    meta, num_splits = get_mla_metadata(dense.cache_seqlens, 16, 1)
    args = (dense.q, dense.k_cache, dense.block_table, dense.cache_seqlens, D_V, meta, num_splits)
    for k_scale in (1.0, torch.ones(1)):
        expect(
            lambda s=k_scale: flash_mla_with_kvcache(*args, k_scale=s),
            "flashmla: k_scale is used only with is_fp8_kvcache=True",
        )
    # is_fp8_kvcache=True with a bf16 cache: the op's dtype message
    expect(
        lambda: flash_mla_with_kvcache(*args, is_fp8_kvcache=True),
        "flashmla: an FP8 k_cache must be float8_e4m3fn (per-tensor scale, [num_pages, 64, h_kv, 576]) or "
        "uint8 (DeepSeek V3.2, [num_pages, 64, h_kv, 656]), got bfloat16",
    )


def test_quantiser_errors():
    x = torch.zeros(2, 64, 1, 576, dtype=torch.bfloat16)
    expect(
        lambda: quantize(x.to(torch.float8_e4m3fn)),
        "flashmla: quantize_kv_cache takes a bfloat16, float16 or float32 k_cache, got float8_e4m3fn",
    )
    expect(lambda: quantize(x[..., :512]), "flashmla: k_cache must have head dim (size(-1)) 576, got 512")
    expect(lambda: quantize(x, "fp8"), "flashmla: format must be 'per_tensor' or 'v32', got 'fp8'")
    expect(
        lambda: quantize(x, "v32", 1.0),
        "flashmla: quantize_kv_cache(format='v32') computes a scale per 128 values: k_scale must be None",
    )
    for bad in (0.0, -1.0, math.inf, math.nan):
        expect(
            lambda b=bad: quantize(x, "per_tensor", b),
            f"flashmla: k_scale must be a positive finite number, got {bad}",
        )
    expect(
        lambda: quantize(x, k_scale=torch.ones(1, dtype=torch.float64)),
        "flashmla: k_scale must be float32, got float64",
    )
    expect(lambda: quantize(x, k_scale=torch.ones(())), "flashmla: k_scale must have shape [1], got []")
    expect(
        lambda: quantize(x, k_scale=torch.ones(1, device="meta")),
        "flashmla: k_scale must be on k_cache's device (cpu), got meta",
    )


def test_dequantiser_errors():
    kq, k_scale = quantize(torch.ones(2, 64, 1, 576))
    kv, _ = quantize(torch.ones(2, 64, 1, 576), "v32")
    expect(
        lambda: dequantize_kv_cache(kq.float()),
        "flashmla: an FP8 k_cache must be float8_e4m3fn (per-tensor scale, [num_pages, 64, h_kv, 576]) or "
        "uint8 (DeepSeek V3.2, [num_pages, 64, h_kv, 656]), got float32",
    )
    expect(
        lambda: dequantize_kv_cache(kq),
        "flashmla: a float8_e4m3fn k_cache (per-tensor FP8) needs k_scale, a float32 tensor of shape [1]",
    )
    expect(
        lambda: dequantize_kv_cache(kv, k_scale),
        MSG_K_SCALE_V32,
    )
    expect(
        lambda: dequantize_kv_cache(kv[..., :600]),
        "flashmla: a uint8 k_cache (DeepSeek V3.2 FP8) must have 656 bytes per token (size(-1)), got 600; "
        "a per-tensor FP8 cache (576 values per token) must be float8_e4m3fn",
    )
    expect(
        lambda: dequantize_kv_cache(kq, k_scale.to("meta")),
        "flashmla: k_scale must be on k_cache's device (cpu), got meta",
    )
    expect(
        lambda: dequantize_kv_cache(kq, -2.0), "flashmla: k_scale must be a positive finite number, got -2.0"
    )
    assert torch.equal(dequantize_kv_cache(kq, float(k_scale)), dequantize_kv_cache(kq, k_scale))
