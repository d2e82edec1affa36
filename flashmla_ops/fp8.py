"""FP8 KV caches: the two formats, quantising a bfloat16/float16 cache into them and dequantising back.

Formats (``k_cache`` of ``torch.ops.flashmla.mla_decode_fp8``; q stays bfloat16/float16):

* **per-tensor** (``"per_tensor"``): ``torch.float8_e4m3fn`` ``[num_blocks, 64, h_kv, 576]``, one float32
  ``k_scale`` for the whole cache; value = stored * k_scale. The RoPE columns are e4m3 too.
* **DeepSeek V3.2** (``"v32"``): ``torch.uint8`` ``[num_blocks, 64, h_kv, 656]``; per (token, kv head) 656
  bytes: 512 e4m3 values (the latent / V part), then 4 float32 scales, one per 128 of those values
  (little-endian, bytes 512..527), then the 64 RoPE values as bfloat16 (little-endian, bytes 528..655). No
  ``k_scale``. The page (block) stride may be padded; only the last dim must be contiguous.

:func:`dequantize_rows` is the first step of the CPU kernels (``reference.py``); :func:`quantize_kv_cache` and
:func:`dequantize_kv_cache` are the public helpers. None of this is on the decode hot path.
"""

from __future__ import annotations

import math
import sys

import torch

from ._validation import (
    HEAD_DIM_K,
    HEAD_DIM_V,
    KV_FORMAT_PER_TENSOR,
    KV_FORMAT_V32,
    MSG_HEAD_DIM,
    MSG_K_SCALE_KV_DEVICE,
    MSG_K_SCALE_VALUE,
    MSG_QUANT_DTYPE,
    MSG_QUANT_FORMAT,
    MSG_QUANT_V32_K_SCALE,
    V32_BYTES_PER_TOKEN,
    FlashMLAInputError,
    check_k_scale,
    check_kv_fp8_format,
    fmt_dtype,
)

__all__ = ["E4M3_MAX", "V32_TILE", "dequantize_kv_cache", "dequantize_rows", "quantize_kv_cache"]

#: Largest finite float8_e4m3fn value.
E4M3_MAX = 448.0
#: Values per float32 scale in the DeepSeek V3.2 format.
V32_TILE = 128
_V32_SCALES = HEAD_DIM_V // V32_TILE  # 4
_V32_SCALE_END = HEAD_DIM_V + 4 * _V32_SCALES  # byte 528: the RoPE part starts here
_QUANT_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The helpers work through a cache in slices along dim 0 of about this many values, so that their float32
# temporaries stay small next to a real cache (tens of GB on a GPU).
_CHUNK_VALUES = 1 << 24


def _split_size(t: torch.Tensor) -> int:
    """Slices of dim 0 per chunk (the whole tensor for 0-D / 1-D / empty ones)."""
    if t.dim() < 2 or t.numel() == 0:
        return max(t.size(0) if t.dim() else 1, 1)
    return max(1, _CHUNK_VALUES // t[0].numel())


def _chunks(t: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    return t.split(n) if t.dim() >= 1 else (t,)


# ---- byte layout ------------------------------------------------------------------------------------------
def _from_le_bytes(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``[..., n * itemsize]`` little-endian bytes -> ``[..., n]`` of ``dtype`` (a copy)."""
    raw = raw.contiguous()  # a fresh tensor: the dtype view needs an aligned, dense last dim
    if sys.byteorder == "big":
        raw = raw.unflatten(-1, (-1, dtype.itemsize)).flip(-1).flatten(-2)
    return raw.view(dtype)


def _to_le_bytes(x: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` -> uint8 ``[..., n * itemsize]``, little-endian."""
    raw = x.contiguous().view(torch.uint8)
    if sys.byteorder == "big":
        raw = raw.unflatten(-1, (-1, x.dtype.itemsize)).flip(-1).flatten(-2)
    return raw


def _to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """Round float32 to e4m3 (nearest even), saturating at +-448; NaN stays NaN."""
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x.abs(), 0.0)


def _pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """``2 ** ceil(log2(amax / 448))`` as float32, exactly (1 where amax is 0; at least 2**-126, a normal).

    ``frexp`` gives ``r = m * 2**e`` with m in [0.5, 1): ``ceil(log2(r))`` is ``e - 1`` when ``m == 0.5``
    (r is a power of two) and ``e`` otherwise. The scale is built from its exponent bits, so no
    ``log2`` / ``exp2`` rounding can move it off the power of two."""
    ratio = amax.float() / E4M3_MAX
    mant, exp = torch.frexp(ratio)
    exp = torch.where(mant == 0.5, exp - 1, exp)
    exp = torch.where(ratio > 0, exp, 0).clamp(-126, 127)
    return ((exp + 127) << 23).to(torch.int32).view(torch.float32)


# ---- dequantisation ---------------------------------------------------------------------------------------
def dequantize_rows(
    raw: torch.Tensor, kv_format: str, k_scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Dequantise FP8 cache rows ``[..., 576]`` (float8_e4m3fn) or ``[..., 656]`` (uint8) to float32
    ``[..., 576]``. Unchecked (``kv_format`` from :func:`flashmla_ops._validation.check_kv_fp8_format`);
    garbage in (NaN bytes, NaN/inf scales) gives garbage out for that row only."""
    f32 = torch.float32
    if kv_format == KV_FORMAT_PER_TENSOR:
        return raw.to(f32) * k_scale
    assert kv_format == KV_FORMAT_V32, kv_format
    nope = raw[..., :HEAD_DIM_V].view(torch.float8_e4m3fn).to(f32)  # [..., 512]
    scales = _from_le_bytes(raw[..., HEAD_DIM_V:_V32_SCALE_END], f32)  # [..., 4]
    rope = _from_le_bytes(raw[..., _V32_SCALE_END:V32_BYTES_PER_TOKEN], torch.bfloat16).to(f32)  # [..., 64]
    nope = (nope.unflatten(-1, (_V32_SCALES, V32_TILE)) * scales[..., None]).flatten(-2)
    return torch.cat([nope, rope], dim=-1)


def _scale_tensor(k_scale: float, device: torch.device) -> torch.Tensor:
    value = float(k_scale)
    if not (math.isfinite(value) and value > 0):
        raise FlashMLAInputError(MSG_K_SCALE_VALUE.format(value=value))
    return torch.full((1,), value, dtype=torch.float32, device=device)


def dequantize_kv_cache(k_cache: torch.Tensor, k_scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Dequantise an FP8 KV cache to float32 ``[..., 576]`` (what the FP8 decode attends over).

    Arguments:
        k_cache: per-tensor FP8, float8_e4m3fn ``[..., 576]``, or DeepSeek V3.2, uint8 ``[..., 656]``
            (normally ``[num_blocks, 64, h_kv, D]``; any leading dims, any strides with a contiguous last
            dim).
        k_scale: per-tensor format only: float32 tensor ``[1]`` on k_cache's device, or a positive Python
            float. Must be None for the V3.2 format.

    Returns a new float32 tensor: ``stored * k_scale`` (per-tensor); ``e4m3 * scale of its 128-value tile``
    for the first 512 values and the bfloat16 RoPE values for the last 64 (V3.2). With V3.2's power-of-two
    scales every value is exactly representable in bfloat16, so ``.to(torch.bfloat16)`` of the result gives
    a dense cache that ``flash_mla_with_kvcache(is_fp8_kvcache=False)`` decodes to the same attention.

    Raises ``FlashMLAInputError`` for a dtype / last dim that is not one of the formats and for a missing,
    extra or malformed ``k_scale`` (the same messages as the decode ops).
    """
    kv_format = check_kv_fp8_format(k_cache)
    if k_scale is not None and not isinstance(k_scale, torch.Tensor):
        k_scale = _scale_tensor(k_scale, k_cache.device)
    check_k_scale(kv_format, k_scale, k_cache.device, MSG_K_SCALE_KV_DEVICE)
    out = torch.empty((*k_cache.shape[:-1], HEAD_DIM_K), dtype=torch.float32, device=k_cache.device)
    n = _split_size(k_cache)
    for src, dst in zip(_chunks(k_cache, n), _chunks(out, n), strict=True):
        dst.copy_(dequantize_rows(src, kv_format, k_scale))
    return out


# ---- quantisation -----------------------------------------------------------------------------------------
def quantize_kv_cache(
    k_cache: torch.Tensor, format: str = KV_FORMAT_PER_TENSOR, k_scale: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantise a dense KV cache into an FP8 format of ``flash_mla_with_kvcache(is_fp8_kvcache=True)``.

    Arguments:
        k_cache: bfloat16, float16 or float32 ``[num_blocks, 64, h_kv, 576]`` (any leading dims work; the
            last dim must be 576: 512 latent + 64 RoPE values).
        format: ``"per_tensor"`` or ``"v32"``.
        k_scale: ``"per_tensor"`` only: the scale to use (float32 tensor ``[1]`` on k_cache's device, or a
            positive float). Default: ``amax / 448`` over the finite values of the cache (1 for an all-zero
            cache), so the largest value maps to e4m3's largest. Must be None for ``"v32"``.

    Works through the cache in slices along dim 0, so its float32 temporaries stay small.

    Returns ``(quantised, k_scale)``, both new tensors on k_cache's device, ready for
    ``flash_mla_with_kvcache(..., is_fp8_kvcache=True, k_scale=k_scale)``:

    * ``"per_tensor"``: float8_e4m3fn ``[..., 576]`` = ``round_e4m3(clamp(x / k_scale, -448, 448))`` and
      ``k_scale`` float32 ``[1]`` (the given tensor itself when one is given);
    * ``"v32"``: uint8 ``[..., 656]`` (contiguous) and None. Each 128-value tile of the first 512 values
      gets the scale ``2 ** ceil(log2(amax / 448))`` (a power of two, as DeepSeek's tests round it; 1 for an
      all-zero tile; amax over the finite values), its values ``round_e4m3(clamp(x / scale, -448, 448))``;
      the 64 RoPE values are stored as bfloat16.

    Rounding is to nearest even; values beyond the range saturate at +-448 (times the scale); NaN stays NaN.
    Round trip (:func:`dequantize_kv_cache`): exact for values that are e4m3 numbers times the scale (and,
    for the RoPE part of V3.2, bfloat16 numbers); otherwise the error of a value x with scale s is at most
    ``max(|x| / 16, s / 1024)`` (half a unit in the last place of e4m3's 3-bit mantissa, or of its
    subnormal spacing 2**-9), plus float32 rounding of ``x / s`` and ``q * s`` when s is not a power of two.
    """
    if k_cache.dtype not in _QUANT_INPUT_DTYPES:
        raise FlashMLAInputError(MSG_QUANT_DTYPE.format(dtype=fmt_dtype(k_cache.dtype)))
    if k_cache.dim() < 1 or k_cache.size(-1) != HEAD_DIM_K:
        size = k_cache.size(-1) if k_cache.dim() else None
        raise FlashMLAInputError(MSG_HEAD_DIM.format(name="k_cache", size=size))
    if format not in (KV_FORMAT_PER_TENSOR, KV_FORMAT_V32):
        raise FlashMLAInputError(MSG_QUANT_FORMAT.format(format=repr(format)))
    device = k_cache.device
    n = _split_size(k_cache)

    if format == KV_FORMAT_PER_TENSOR:
        if k_scale is None:
            amax = torch.zeros((), device=device)
            for src in _chunks(k_cache, n):
                if src.numel():
                    amax = torch.maximum(amax, _finite_abs(src.float()).amax())
            k_scale = torch.where(amax > 0, amax / E4M3_MAX, 1.0).reshape(1)
        elif not isinstance(k_scale, torch.Tensor):
            k_scale = _scale_tensor(k_scale, device)
        check_k_scale(KV_FORMAT_PER_TENSOR, k_scale, device, MSG_K_SCALE_KV_DEVICE)
        out = torch.empty(k_cache.shape, dtype=torch.float8_e4m3fn, device=device)
        for src, dst in zip(_chunks(k_cache, n), _chunks(out, n), strict=True):
            dst.copy_(_to_e4m3(src.float() / k_scale))
        return out, k_scale

    if k_scale is not None:
        raise FlashMLAInputError(MSG_QUANT_V32_K_SCALE)
    out = torch.empty((*k_cache.shape[:-1], V32_BYTES_PER_TOKEN), dtype=torch.uint8, device=device)
    for src, dst in zip(_chunks(k_cache, n), _chunks(out, n), strict=True):
        tiles = src[..., :HEAD_DIM_V].float().unflatten(-1, (_V32_SCALES, V32_TILE))  # [..., 4, 128]
        scales = _pow2_scale(_finite_abs(tiles).amax(dim=-1))  # [..., 4]
        nope = _to_e4m3(tiles / scales[..., None]).flatten(-2)  # exact division: scales are powers of two
        dst[..., :HEAD_DIM_V] = nope.view(torch.uint8)
        dst[..., HEAD_DIM_V:_V32_SCALE_END] = _to_le_bytes(scales)
        dst[..., _V32_SCALE_END:] = _to_le_bytes(src[..., HEAD_DIM_V:].to(torch.bfloat16))
    return out, None
