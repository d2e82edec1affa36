"""FP8 test helpers: an independent float64 decoder of the two FP8 cache formats (bit arithmetic only: neither
flashmla_ops nor torch's float8 conversions), and FP8 decode inputs with poisoned unused slots."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from _helpers import D_V, PAGE, DecodeInputs, loop_oracle, make_inputs

import flashmla_ops

V32_BYTES = 656
E4M3_NAN_BYTES = (0x7F, 0xFF)


# ---- independent decoding ---------------------------------------------------------------------------------
def decode_float_bits(bits: torch.Tensor, exp_bits: int, man_bits: int, ieee: bool) -> torch.Tensor:
    """float64 value of each binary floating-point bit pattern in ``bits`` (any integer dtype).

    ``ieee``: an all-ones exponent is inf (mantissa 0) or NaN (float32, bfloat16). Otherwise the e4m3fn rule:
    only S.1111.111 is NaN and there is no inf."""
    bits = bits.long()
    bias = 2 ** (exp_bits - 1) - 1
    sign = (bits >> (exp_bits + man_bits)) & 1
    e = (bits >> man_bits) & ((1 << exp_bits) - 1)
    m = (bits & ((1 << man_bits) - 1)).double()
    normal = (m + 2.0**man_bits) * torch.pow(2.0, (e - bias - man_bits).double())
    subnormal = m * 2.0 ** (1 - bias - man_bits)
    mag = torch.where(e == 0, subnormal, normal)
    e_max = (1 << exp_bits) - 1
    if ieee:
        special = torch.where(m == 0, math.inf, math.nan).double()
        mag = torch.where(e == e_max, special, mag)
    else:
        mag = torch.where((e == e_max) & (m == (1 << man_bits) - 1), math.nan, mag)
    return torch.where(sign == 1, -mag, mag)


def le_uint(raw: torch.Tensor, nbytes: int) -> torch.Tensor:
    """uint8 ``[..., n * nbytes]`` little-endian -> int64 ``[..., n]``."""
    b = raw.long().unflatten(-1, (-1, nbytes))
    return sum(b[..., j] << (8 * j) for j in range(nbytes))


def e4m3_value(byte: int) -> float:
    return float(decode_float_bits(torch.tensor([byte]), 4, 3, ieee=False)[0])


def dequantize_f64(k_cache: torch.Tensor, k_scale: torch.Tensor | float | None) -> torch.Tensor:
    """float64 ``[..., 576]`` of a per-tensor (float8_e4m3fn, 576) or V3.2 (uint8, 656) cache."""
    k_cache = k_cache.detach().cpu()
    if k_cache.dtype == torch.float8_e4m3fn:
        return decode_float_bits(k_cache.view(torch.uint8), 4, 3, ieee=False) * float(k_scale)
    assert k_cache.dtype == torch.uint8 and k_cache.shape[-1] == V32_BYTES and k_scale is None
    nope = decode_float_bits(k_cache[..., :512], 4, 3, ieee=False)
    scales = decode_float_bits(le_uint(k_cache[..., 512:528], 4), 8, 23, ieee=True)  # [..., 4]
    rope = decode_float_bits(le_uint(k_cache[..., 528:656], 2), 8, 7, ieee=True)  # [..., 64]
    return torch.cat([(nope.unflatten(-1, (4, 128)) * scales[..., None]).flatten(-2), rope], dim=-1)


# ---- inputs -----------------------------------------------------------------------------------------------
@dataclass
class Fp8Inputs(DecodeInputs):
    k_scale: torch.Tensor | None = None
    dense: torch.Tensor | None = None  # the bf16/fp16 cache before quantisation

    def args(self, meta: torch.Tensor, num_splits: torch.Tensor, scale: float, causal: bool) -> tuple:
        """Positional arguments of torch.ops.flashmla.mla_decode_fp8."""
        return (*super().args(meta, num_splits, scale, causal), self.k_scale)

    def to_cuda(self) -> Fp8Inputs:
        """Move the inputs to the GPU in place, each with its strides (``Tensor.cuda()`` would make a padded
        V3.2 cache contiguous, dropping the page padding a test means to exercise)."""
        for name in ("q", "k_cache", "k_scale", "block_table", "cache_seqlens"):
            value = getattr(self, name)
            if value is not None:
                dev = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cuda")
                setattr(self, name, dev.copy_(value))
        return self


def slot_valid(block_table: torch.Tensor, seqlens: list[int], num_pages: int) -> torch.Tensor:
    """bool ``[num_pages, 64]``: the cache slots some request reads."""
    valid = torch.zeros(num_pages, PAGE, dtype=torch.bool)
    for i, s in enumerate(seqlens):
        for j in range(-(-s // PAGE)):
            valid[int(block_table[i, j]), : min(PAGE, s - j * PAGE)] = True
    return valid


def make_fp8_inputs(
    seqlens: list[int],
    s_q: int = 1,
    h_q: int = 16,
    h_kv: int = 1,
    kv_format: str = "per_tensor",
    dtype: torch.dtype = torch.bfloat16,
    *,
    seed: int = 0,
    page_pad: int = 0,
    poison: bool = True,
    **kwargs,
) -> Fp8Inputs:
    """Random decode inputs with an FP8 cache quantised from a random bf16/fp16 one.

    With ``poison``, every slot no request reads (the tail of a last page, unused pages) holds bytes that
    must never be used: e4m3 NaN (0x7F / 0xFF) in the per-tensor format; random bytes in the V3.2 format, with
    NaN and inf scales in some of them. ``page_pad`` (V3.2 only): that many garbage bytes after each page, so
    the page stride is ``64 * h_kv * 656 + page_pad``."""
    inp = make_inputs(seqlens, s_q, h_q, h_kv, dtype, seed=seed, poison=False, **kwargs)
    kq, k_scale = flashmla_ops.quantize_kv_cache(inp.k_cache, kv_format)
    gen = torch.Generator().manual_seed(seed + 7)
    num_pages = kq.shape[0]
    if page_pad:
        assert kv_format == "v32"
        page_bytes = PAGE * h_kv * V32_BYTES
        storage = torch.randint(0, 256, (num_pages, page_bytes + page_pad), generator=gen, dtype=torch.uint8)
        kq = storage[:, :page_bytes].view(num_pages, PAGE, h_kv, V32_BYTES).copy_(kq)
        assert kq.stride(0) == page_bytes + page_pad
    if poison:
        unused = ~slot_valid(inp.block_table, seqlens, num_pages)  # [num_pages, 64]
        raw = kq.view(torch.uint8)
        n = int(unused.sum()) * h_kv
        if kv_format == "per_tensor":
            pick = torch.randint(0, 2, (n, 576), generator=gen)
            junk = torch.where(pick == 0, E4M3_NAN_BYTES[0], E4M3_NAN_BYTES[1]).to(torch.uint8)
        else:
            junk = torch.randint(0, 256, (n, V32_BYTES), generator=gen, dtype=torch.uint8)
            junk[0::3, 512:516] = torch.tensor([0x00, 0x00, 0xC0, 0x7F], dtype=torch.uint8)  # NaN scale
            junk[1::3, 516:520] = torch.tensor([0x00, 0x00, 0x80, 0x7F], dtype=torch.uint8)  # +inf scale
            junk[2::3, :512] = 0x7F  # e4m3 NaN values
        raw[unused] = junk.view(-1, h_kv, raw.shape[-1])
    return Fp8Inputs(
        q=inp.q,
        k_cache=kq,
        k_scale=k_scale,
        block_table=inp.block_table,
        cache_seqlens=inp.cache_seqlens,
        seqlens=inp.seqlens,
        h_kv=h_kv,
        dense=inp.k_cache,
    )


def schedule(inp: Fp8Inputs, num_parts: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    s_q, h_q = inp.q.shape[1], inp.q.shape[2]
    return torch.ops.flashmla.get_mla_metadata(inp.cache_seqlens, s_q * h_q // inp.h_kv, inp.h_kv, num_parts)


def assert_close_to_oracle(out, lse, inp, scale, causal):
    """out: relative max error < 1e-2; lse: max error < 1e-3; same NaN / inf positions; shapes, dtypes."""
    deq = dequantize_f64(inp.k_cache, inp.k_scale)
    want_out, want_lse = loop_oracle(inp.q, deq, inp.block_table, inp.seqlens, scale, causal)
    b, s_q, h_q, _ = inp.q.shape
    assert out.shape == (b, s_q, h_q, D_V) and out.dtype == inp.q.dtype and out.is_contiguous()
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32 and lse.is_contiguous()
    for name, got, want in (("out", out.double(), want_out), ("lse", lse.double(), want_lse)):
        for fn in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(fn(got), fn(want)), f"{fn.__name__} positions differ in {name}"
    assert not torch.isnan(want_out).any()
    finite = torch.isfinite(want_lse)
    if finite.any():
        rel = (out.double() - want_out).abs().max() / want_out.abs().max()
        assert rel < 1e-2, f"out relative error {float(rel):.3e}"
        lse_err = (lse.double()[finite] - want_lse[finite]).abs().max()
        assert lse_err < 1e-3, f"lse max error {float(lse_err):.3e}"
