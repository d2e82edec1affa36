"""Input checks shared by the fake kernels (``flashmla_ops.meta``) and the CPU reference (``reference.py``).

Every check reads only tensor metadata (shape, dtype, device, strides), never values, so the same code runs
on real tensors, on ``FakeTensor``\\ s, on ``meta`` tensors and under ``torch.compile`` with symbolic sizes
(conditions go through ``torch._check_with``, which guards on backed symbolic sizes and defers a runtime
assert for unbacked ones).

A failed check raises :class:`FlashMLAInputError`, which is both a ``ValueError`` and a ``RuntimeError``:
the CUDA launcher (C++, ``csrc/api``) raises a plain ``RuntimeError`` with the **same text**, so callers
can catch ``RuntimeError`` for either backend, and Python callers can also catch ``ValueError``.

The message templates are the module-level ``MSG_*`` constants below. They are ``str.format`` templates
whose fields are filled with plain, language-neutral spellings so C++ can reproduce them byte for byte:

* shapes and strides: ``[2, 1, 16, 576]`` (see :func:`fmt_shape`; a 0-D tensor is ``[]``);
* dtypes: the torch name without the ``torch.`` prefix: ``bfloat16``, ``float16``, ``float32``, ``int32``,
  ``int64`` ... (see :func:`fmt_dtype`);
* devices: ``str(device)``: ``cpu``, ``cuda:0``, ``meta``;
* integers in decimal.

Every message starts with ``"flashmla: "``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "FlashMLAInputError",
    "HEAD_DIM_K",
    "HEAD_DIM_V",
    "META_FLAG_BATCH_INVARIANT",
    "PAGE_SIZE",
    "TILE_SCHEDULER_METADATA_SIZE",
    "check_get_mla_metadata",
    "check_get_mla_metadata_batch_invariant",
    "check_k_scale",
    "check_kv_fp8_format",
    "check_mla_decode",
    "check_mla_decode_fp8",
    "check_mla_decode_fp8_out",
    "check_mla_decode_out",
    "check_positive_int",
    "workspace_numel",
    "fmt_dtype",
    "fmt_shape",
    "KV_FORMAT_PER_TENSOR",
    "KV_FORMAT_V32",
    "V32_BYTES_PER_TOKEN",
]

#: q / k width: 512 latent ("NoPE") columns + 64 RoPE columns.
HEAD_DIM_K = 576
#: v width: v is the first 512 columns of each k_cache row.
HEAD_DIM_V = 512
#: Tokens per KV-cache page (k_cache.size(1)).
PAGE_SIZE = 64
#: int32 fields per row of tile_scheduler_metadata (csrc/kernels/params.h: kMetaSize).
TILE_SCHEDULER_METADATA_SIZE = 8
#: Field 7 of every record of a batch-invariant schedule (csrc/kernels/params.h: kMetaFlagBatchInvariant).
META_FLAG_BATCH_INVARIANT = 1

_Q_DTYPES = (torch.bfloat16, torch.float16)
_FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.uint8)

# ---- FP8 KV-cache formats (docs/architecture.md, "FP8 KV cache") ------------------------------------------
#: float8_e4m3fn ``[num_pages, 64, h_kv, 576]``; dequantised value = stored * k_scale (float32 ``[1]``).
KV_FORMAT_PER_TENSOR = "per_tensor"
#: uint8 ``[num_pages, 64, h_kv, 656]``: per token 512 e4m3 (latent / V), 4 float32 scales (one per 128
#: values, little-endian), 64 bfloat16 RoPE values (little-endian); no k_scale.
KV_FORMAT_V32 = "v32"
#: Bytes per (token, kv head) of the DeepSeek V3.2 format: 512 + 4 * 4 + 64 * 2.
V32_BYTES_PER_TOKEN = 656

# ---- Message templates (mirrored verbatim by the C++ launcher) -------------------------------------------
MSG_Q_DTYPE = "flashmla: q must be bfloat16 or float16, got {dtype}"
MSG_KV_DTYPE = "flashmla: k_cache must have the same dtype as q ({q_dtype}), got {dtype}"
MSG_INT32 = "flashmla: {name} must be int32, got {dtype}"
MSG_NDIM = "flashmla: {name} must be a {ndim}-D tensor {layout}, got shape {shape}"
MSG_HEAD_DIM = "flashmla: {name} must have head dim (size(-1)) 576, got {size}"
MSG_HEAD_DIM_V = "flashmla: head_dim_v must be 512, got {value}"
MSG_PAGE_SIZE = "flashmla: k_cache page size (size(1)) must be 64, got {size}"
MSG_NUM_HEADS = "flashmla: the number of query heads ({h_q}) must be a positive multiple of h_kv ({h_kv})"
MSG_SEQLEN_Q = "flashmla: q must have at least one query token per request (s_q >= 1), got shape {shape}"
MSG_BATCH = "flashmla: batch size must be positive, got {b}"
MSG_BATCH_MISMATCH = "flashmla: {name} has batch size {got}, but q has batch size {b}"
MSG_BLOCK_TABLE_EMPTY = "flashmla: block_table must have at least one column, got shape {shape}"
MSG_SHAPE = "flashmla: {name} must have shape {expected}, got {shape}"
MSG_METADATA_SHAPE = "flashmla: tile_scheduler_metadata must have shape [num_sm_parts >= 1, 8], got {shape}"
MSG_METADATA_BATCH = (
    "flashmla: num_splits has {n} entries: the metadata was computed for batch size {meta_b}, but q has "
    "batch size {b}; call get_mla_metadata with this batch's cache_seqlens"
)
MSG_DEVICE = "flashmla: {name} must be on the same device as q ({expected}), got {device}"
MSG_LAST_DIM_CONTIGUOUS = "flashmla: {name} must have a contiguous last dimension, got strides {strides}"
MSG_CONTIGUOUS = "flashmla: {name} must be contiguous, got shape {shape} and strides {strides}"
MSG_OUT_DTYPE = "flashmla: out must have the same dtype as q ({q_dtype}), got {dtype}"
MSG_LSE_DTYPE = "flashmla: lse must be float32, got {dtype}"
MSG_WORKSPACE_DTYPE = "flashmla: workspace must be float32, got {dtype}"
MSG_WORKSPACE_SIZE = (
    "flashmla: workspace must have at least {need} elements (2 * num_sm_parts * h_kv * s_q * (h_q / h_kv) * "
    "513), got {numel}"
)
MSG_POSITIVE_INT = "flashmla: {name} must be >= 1, got {value}"
MSG_WORK_PARTS = "flashmla: num_work_parts ({num_work_parts}) must be at most num_sm_parts ({num_sm_parts})"
MSG_INVARIANT_MAX_SEQLEN = (
    "flashmla: batch_invariant=True needs max_seqlen_k, an upper bound of cache_seqlens (e.g. the block "
    "table's width times 64): it sizes the split partials without reading the lengths on the host"
)
MSG_MAX_SEQLEN_NEEDS_INVARIANT = "flashmla: max_seqlen_k is used only with batch_invariant=True"
MSG_NONNEGATIVE_INT = "flashmla: {name} must be >= 0, got {value}"
MSG_INVARIANT_TOO_MANY_PARTS = (
    "flashmla: a batch-invariant schedule of {b} requests of up to {max_seqlen_k} tokens needs {parts} "
    "parts (at most 65535); lower max_seqlen_k or split the batch"
)

# FP8 KV cache (mla_decode_fp8 / mla_decode_fp8_out; also quantize_kv_cache / dequantize_kv_cache). The
# format follows from k_cache's dtype, then its last dim must match it.
MSG_KV_FP8_DTYPE = (
    "flashmla: an FP8 k_cache must be float8_e4m3fn (per-tensor scale, [num_pages, 64, h_kv, 576]) or uint8 "
    "(DeepSeek V3.2, [num_pages, 64, h_kv, 656]), got {dtype}"
)
MSG_KV_PER_TENSOR_DIM = (
    "flashmla: a float8_e4m3fn k_cache (per-tensor FP8) must have head dim (size(-1)) 576, got {size}; "
    "a DeepSeek V3.2 cache (656 bytes per token) must be uint8"
)
MSG_KV_V32_DIM = (
    "flashmla: a uint8 k_cache (DeepSeek V3.2 FP8) must have 656 bytes per token (size(-1)), got {size}; "
    "a per-tensor FP8 cache (576 values per token) must be float8_e4m3fn"
)
MSG_K_SCALE_MISSING = (
    "flashmla: a float8_e4m3fn k_cache (per-tensor FP8) needs k_scale, a float32 tensor of shape [1]"
)
MSG_K_SCALE_V32 = (
    "flashmla: k_scale must be None for a uint8 k_cache (DeepSeek V3.2 FP8 keeps its scales in the cache)"
)
MSG_K_SCALE_DTYPE = "flashmla: k_scale must be float32, got {dtype}"

# Python-only (raised by the public wrappers in ops.py, never by an op):
MSG_OUT_LSE_TOGETHER = "flashmla: out and lse must be given together (both or neither)"
MSG_WORKSPACE_NEEDS_OUT = "flashmla: workspace is used by the out-variant only: give out and lse with it"
MSG_K_SCALE_NEEDS_FP8 = "flashmla: k_scale is used only with is_fp8_kvcache=True"
MSG_FP8_CACHE_NEEDS_FLAG = (
    "flashmla: k_cache has dtype {dtype}, an FP8 KV cache: pass is_fp8_kvcache=True (and k_scale for a "
    "float8_e4m3fn cache)"
)

# Python-only (flashmla_ops.quantize_kv_cache / dequantize_kv_cache; no q there, so k_scale follows k_cache).
MSG_QUANT_DTYPE = "flashmla: quantize_kv_cache takes a bfloat16, float16 or float32 k_cache, got {dtype}"
MSG_QUANT_FORMAT = "flashmla: format must be 'per_tensor' or 'v32', got {format}"
MSG_QUANT_V32_K_SCALE = (
    "flashmla: quantize_kv_cache(format='v32') computes a scale per 128 values: k_scale must be None"
)
MSG_K_SCALE_VALUE = "flashmla: k_scale must be a positive finite number, got {value}"
MSG_K_SCALE_KV_DEVICE = "flashmla: k_scale must be on k_cache's device ({expected}), got {device}"

# Value checks of the CPU reference (reference.py). The CUDA kernel does not read values on the host: it
# writes NaN to out and lse for a request with such inputs instead of raising.
MSG_NEGATIVE_SEQLEN = "flashmla: cache_seqlens[{i}] = {seqlen} is negative"
MSG_TOO_FEW_BLOCKS = (
    "flashmla: cache_seqlens[{i}] = {seqlen} needs {needed} pages but block_table has only {cols} columns"
)
MSG_BAD_PAGE = (
    "flashmla: block_table[{i}, {j}] = {page} is used (cache_seqlens[{i}] = {seqlen}) but is not a valid "
    "page index in [0, {num_pages})"
)


class FlashMLAInputError(ValueError, RuntimeError):
    """Invalid arguments to a ``torch.ops.flashmla`` op. Catch it as ``ValueError`` or ``RuntimeError``."""


# ---- Formatting helpers -----------------------------------------------------------------------------------
def fmt_shape(sizes: Sequence[object]) -> str:
    """``[2, 1, 16, 576]``: the spelling of shapes and strides in the messages."""
    return "[" + ", ".join(str(s) for s in sizes) + "]"


def fmt_dtype(dtype: torch.dtype) -> str:
    """``bfloat16``: the spelling of dtypes in the messages."""
    return str(dtype).removeprefix("torch.")


def _require(cond: bool | torch.SymBool, template: str, **fields: object) -> None:
    # The message is built lazily: only when the check fails.
    torch._check_with(FlashMLAInputError, cond, lambda: template.format(**fields))


def _check_int32(t: torch.Tensor, name: str) -> None:
    _require(t.dtype == torch.int32, MSG_INT32, name=name, dtype=fmt_dtype(t.dtype))


def _check_ndim(t: torch.Tensor, name: str, ndim: int, layout: str) -> None:
    _require(t.dim() == ndim, MSG_NDIM, name=name, ndim=ndim, layout=layout, shape=fmt_shape(t.shape))


def _check_last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    _require(t.stride(-1) == 1, MSG_LAST_DIM_CONTIGUOUS, name=name, strides=fmt_shape(t.stride()))


def _check_contiguous(t: torch.Tensor, name: str) -> None:
    _require(
        t.is_contiguous(), MSG_CONTIGUOUS, name=name, shape=fmt_shape(t.shape), strides=fmt_shape(t.stride())
    )


def _check_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    _require(t.device == device, MSG_DEVICE, name=name, expected=device, device=t.device)


def check_positive_int(value: int, name: str) -> None:
    """``value >= 1`` for an integer argument (``num_heads_k``, ``num_sm_parts``, ...).

    A plain ``if`` (no ``torch._check_with``): the public wrappers call this while Dynamo traces them, and
    Dynamo handles a comparison on a symbolic int (it adds a guard) but not a lazy-message closure over it.
    """
    if value < 1:
        raise FlashMLAInputError(MSG_POSITIVE_INT.format(name=name, value=value))


# ---- Op-level checks -------------------------------------------------------------------------------------
def check_get_mla_metadata(
    cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int, num_sm_parts: int
) -> int:
    """Validate the arguments of ``flashmla::get_mla_metadata``; return the batch size."""
    _check_int32(cache_seqlens, "cache_seqlens")
    _check_ndim(cache_seqlens, "cache_seqlens", 1, "[b]")
    b = cache_seqlens.size(0)
    _require(b > 0, MSG_BATCH, b=b)
    _check_contiguous(cache_seqlens, "cache_seqlens")
    check_positive_int(num_q_tokens_per_head_k, "num_q_tokens_per_head_k")
    check_positive_int(num_heads_k, "num_heads_k")
    check_positive_int(num_sm_parts, "num_sm_parts")
    return b


def check_get_mla_metadata_batch_invariant(
    cache_seqlens: torch.Tensor,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    num_sm_parts: int,
    num_work_parts: int,
) -> int:
    """Validate the arguments of ``flashmla::get_mla_metadata_batch_invariant``; return the batch size."""
    b = check_get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts)
    check_positive_int(num_work_parts, "num_work_parts")
    _require(
        num_work_parts <= num_sm_parts,
        MSG_WORK_PARTS,
        num_work_parts=num_work_parts,
        num_sm_parts=num_sm_parts,
    )
    return b


def check_kv_fp8_format(k_cache: torch.Tensor) -> str:
    """The FP8 format of ``k_cache``, from its dtype (``float8_e4m3fn``: per-tensor, ``uint8``: DeepSeek
    V3.2), after checking that its last dim fits that format. Returns ``KV_FORMAT_PER_TENSOR`` or
    ``KV_FORMAT_V32``."""
    _require(k_cache.dtype in _FP8_KV_DTYPES, MSG_KV_FP8_DTYPE, dtype=fmt_dtype(k_cache.dtype))
    if k_cache.dtype == torch.float8_e4m3fn:
        _require(k_cache.size(-1) == HEAD_DIM_K, MSG_KV_PER_TENSOR_DIM, size=k_cache.size(-1))
        return KV_FORMAT_PER_TENSOR
    _require(k_cache.size(-1) == V32_BYTES_PER_TOKEN, MSG_KV_V32_DIM, size=k_cache.size(-1))
    return KV_FORMAT_V32


def check_k_scale(
    kv_format: str, k_scale: torch.Tensor | None, device: torch.device, device_template: str = MSG_DEVICE
) -> None:
    """``k_scale``: a float32 ``[1]`` tensor on ``device`` for the per-tensor format, None for V3.2.

    ``device_template``: ``MSG_DEVICE`` (the ops: q's device) or ``MSG_K_SCALE_KV_DEVICE`` (the quantiser).
    The None checks are plain ``if`` statements: whether an optional tensor is given is static under
    tracing."""
    if kv_format == KV_FORMAT_V32:
        if k_scale is not None:
            raise FlashMLAInputError(MSG_K_SCALE_V32)
        return
    if k_scale is None:
        raise FlashMLAInputError(MSG_K_SCALE_MISSING)
    _require(k_scale.dtype == torch.float32, MSG_K_SCALE_DTYPE, dtype=fmt_dtype(k_scale.dtype))
    _require(
        k_scale.dim() == 1 and k_scale.size(0) == 1,
        MSG_SHAPE,
        name="k_scale",
        expected="[1]",
        shape=fmt_shape(k_scale.shape),
    )
    _require(
        k_scale.device == device, device_template, name="k_scale", expected=device, device=k_scale.device
    )


def check_mla_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
) -> tuple[int, int, int, int]:
    """Validate the arguments of ``flashmla::mla_decode``; return ``(b, s_q, h_q, h_kv)``."""
    return _check_decode(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, None
    )


def check_mla_decode_fp8(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    k_scale: torch.Tensor | None,
) -> tuple[int, int, int, int]:
    """Validate the arguments of ``flashmla::mla_decode_fp8``; return ``(b, s_q, h_q, h_kv)``.

    The same checks, in the same order, as :func:`check_mla_decode`, except that k_cache's dtype and last dim
    must be one of the FP8 formats (:func:`check_kv_fp8_format`) instead of q's dtype and 576; then
    ``k_scale`` (:func:`check_k_scale`)."""
    return _check_decode(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, k_scale, True
    )


def _check_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    k_scale: torch.Tensor | None,
    fp8: bool = False,
) -> tuple[int, int, int, int]:
    # dtypes
    _require(q.dtype in _Q_DTYPES, MSG_Q_DTYPE, dtype=fmt_dtype(q.dtype))
    if fp8:
        _require(k_cache.dtype in _FP8_KV_DTYPES, MSG_KV_FP8_DTYPE, dtype=fmt_dtype(k_cache.dtype))
    else:
        _require(
            k_cache.dtype == q.dtype, MSG_KV_DTYPE, q_dtype=fmt_dtype(q.dtype), dtype=fmt_dtype(k_cache.dtype)
        )
    _check_int32(block_table, "block_table")
    _check_int32(cache_seqlens, "cache_seqlens")
    _check_int32(tile_scheduler_metadata, "tile_scheduler_metadata")
    _check_int32(num_splits, "num_splits")

    # q [b, s_q, h_q, 576], k_cache [num_pages, 64, h_kv, 576] (656 bytes for DeepSeek V3.2 FP8)
    _check_ndim(q, "q", 4, "[b, s_q, h_q, 576]")
    v32 = fp8 and k_cache.dtype == torch.uint8
    _check_ndim(k_cache, "k_cache", 4, "[num_pages, 64, h_kv, 656]" if v32 else "[num_pages, 64, h_kv, 576]")
    _require(q.size(-1) == HEAD_DIM_K, MSG_HEAD_DIM, name="q", size=q.size(-1))
    if fp8:
        kv_format = check_kv_fp8_format(k_cache)
    else:
        _require(k_cache.size(-1) == HEAD_DIM_K, MSG_HEAD_DIM, name="k_cache", size=k_cache.size(-1))
    _require(head_dim_v == HEAD_DIM_V, MSG_HEAD_DIM_V, value=head_dim_v)
    _require(k_cache.size(1) == PAGE_SIZE, MSG_PAGE_SIZE, size=k_cache.size(1))
    b, s_q, h_q, _ = q.shape
    h_kv = k_cache.size(2)
    _require(h_kv >= 1 and h_q >= 1 and h_q % h_kv == 0, MSG_NUM_HEADS, h_q=h_q, h_kv=h_kv)
    _require(s_q >= 1, MSG_SEQLEN_Q, shape=fmt_shape(q.shape))
    _require(b > 0, MSG_BATCH, b=b)

    # per-request tensors
    _check_ndim(block_table, "block_table", 2, "[b, max_blocks_per_seq]")
    _require(block_table.size(0) == b, MSG_BATCH_MISMATCH, name="block_table", got=block_table.size(0), b=b)
    _require(block_table.size(1) >= 1, MSG_BLOCK_TABLE_EMPTY, shape=fmt_shape(block_table.shape))
    _check_ndim(cache_seqlens, "cache_seqlens", 1, "[b]")
    _require(
        cache_seqlens.size(0) == b, MSG_BATCH_MISMATCH, name="cache_seqlens", got=cache_seqlens.size(0), b=b
    )
    _check_contiguous(cache_seqlens, "cache_seqlens")

    # scheduler outputs
    _require(
        tile_scheduler_metadata.dim() == 2
        and tile_scheduler_metadata.size(0) >= 1
        and tile_scheduler_metadata.size(1) == TILE_SCHEDULER_METADATA_SIZE,
        MSG_METADATA_SHAPE,
        shape=fmt_shape(tile_scheduler_metadata.shape),
    )
    if num_splits.dim() == 1:  # the likely cause of a wrong length: metadata of another decode step's batch
        n = num_splits.size(0)
        _require(n == b + 1, MSG_METADATA_BATCH, n=n, meta_b=n - 1, b=b)
    _require(
        num_splits.dim() == 1 and num_splits.size(0) == b + 1,
        MSG_SHAPE,
        name="num_splits",
        expected=fmt_shape([b + 1]),
        shape=fmt_shape(num_splits.shape),
    )

    # devices
    device = q.device
    _check_device(k_cache, "k_cache", device)
    _check_device(block_table, "block_table", device)
    _check_device(cache_seqlens, "cache_seqlens", device)
    _check_device(tile_scheduler_metadata, "tile_scheduler_metadata", device)
    _check_device(num_splits, "num_splits", device)

    # strides
    _check_last_dim_contiguous(q, "q")
    _check_last_dim_contiguous(k_cache, "k_cache")
    _check_last_dim_contiguous(block_table, "block_table")
    _check_contiguous(tile_scheduler_metadata, "tile_scheduler_metadata")
    _check_contiguous(num_splits, "num_splits")

    if fp8:
        check_k_scale(kv_format, k_scale, device)
    return b, s_q, h_q, h_kv


def workspace_numel(num_sm_parts: int, num_heads_k: int, num_q_tokens_per_head_k: int) -> int:
    """float32 elements of the split-partials workspace of one decode call: ``2 * num_sm_parts`` slots (no
    more pieces can exist, whatever the batch), each holding ``num_heads_k * num_q_tokens_per_head_k`` rows of
    512 output partials plus one LSE. Mirrors ``run_decode`` in ``csrc/api/mla_decode.cpp``."""
    return 2 * num_sm_parts * num_heads_k * num_q_tokens_per_head_k * (HEAD_DIM_V + 1)


def check_mla_decode_out(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    workspace: torch.Tensor | None = None,
) -> tuple[int, int, int, int]:
    """Validate the arguments of ``flashmla::mla_decode_out``; return ``(b, s_q, h_q, h_kv)``."""
    b, s_q, h_q, h_kv = check_mla_decode(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits
    )
    _check_out_args(q, tile_scheduler_metadata, out, lse, workspace, b, s_q, h_q, h_kv)
    return b, s_q, h_q, h_kv


def check_mla_decode_fp8_out(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    k_scale: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    workspace: torch.Tensor | None = None,
) -> tuple[int, int, int, int]:
    """Validate the arguments of ``flashmla::mla_decode_fp8_out``; return ``(b, s_q, h_q, h_kv)``."""
    b, s_q, h_q, h_kv = check_mla_decode_fp8(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, k_scale
    )
    _check_out_args(q, tile_scheduler_metadata, out, lse, workspace, b, s_q, h_q, h_kv)
    return b, s_q, h_q, h_kv


def _check_out_args(
    q: torch.Tensor,
    tile_scheduler_metadata: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    workspace: torch.Tensor | None,
    b: int,
    s_q: int,
    h_q: int,
    h_kv: int,
) -> None:
    _require(out.dtype == q.dtype, MSG_OUT_DTYPE, q_dtype=fmt_dtype(q.dtype), dtype=fmt_dtype(out.dtype))
    expected_out = (b, s_q, h_q, HEAD_DIM_V)
    _require(
        out.dim() == 4 and all(out.size(i) == expected_out[i] for i in range(4)),
        MSG_SHAPE,
        name="out",
        expected=fmt_shape(expected_out),
        shape=fmt_shape(out.shape),
    )
    _require(lse.dtype == torch.float32, MSG_LSE_DTYPE, dtype=fmt_dtype(lse.dtype))
    expected_lse = (b, h_q, s_q)
    _require(
        lse.dim() == 3 and all(lse.size(i) == expected_lse[i] for i in range(3)),
        MSG_SHAPE,
        name="lse",
        expected=fmt_shape(expected_lse),
        shape=fmt_shape(lse.shape),
    )
    _check_device(out, "out", q.device)
    _check_device(lse, "lse", q.device)
    _check_last_dim_contiguous(out, "out")
    if workspace is not None:
        _require(workspace.dtype == torch.float32, MSG_WORKSPACE_DTYPE, dtype=fmt_dtype(workspace.dtype))
        need = workspace_numel(tile_scheduler_metadata.size(0), h_kv, s_q * (h_q // h_kv))
        _require(workspace.numel() >= need, MSG_WORKSPACE_SIZE, need=need, numel=workspace.numel())
        _check_device(workspace, "workspace", q.device)
        _check_contiguous(workspace, "workspace")
