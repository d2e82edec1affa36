"""Public API: a drop-in replacement for the 2025 ``flash_mla`` Python API (dense MLA decode over a BF16/FP16
or FP8 KV cache).

Both functions are thin wrappers over the ``torch.ops.flashmla`` custom ops (schemas in ``_schema.py``).
They sit on the decode hot path: they do no tensor work, no device synchronisation, and are traced by
``torch.compile(fullgraph=True)`` without graph breaks.
"""

from __future__ import annotations

import functools

import torch

from ._invariant import ctas_per_part, invariant_max_pieces
from ._validation import (
    HEAD_DIM_K,
    MSG_FP8_CACHE_NEEDS_FLAG,
    MSG_INVARIANT_MAX_SEQLEN,
    MSG_INVARIANT_TOO_MANY_PARTS,
    MSG_K_SCALE_NEEDS_FP8,
    MSG_MAX_SEQLEN_NEEDS_INVARIANT,
    MSG_NONNEGATIVE_INT,
    MSG_OUT_LSE_TOGETHER,
    MSG_WORKSPACE_NEEDS_OUT,
    FlashMLAInputError,
    check_positive_int,
    fmt_dtype,
    workspace_numel,
)

__all__ = ["flash_mla_with_kvcache", "get_mla_metadata", "workspace_size"]

#: Multiprocessor count assumed for non-CUDA tensors (an H100 SXM), so CPU runs schedule like a GPU would.
_DEFAULT_SM_COUNT = 132
_DEFAULT_SOFTMAX_SCALE = HEAD_DIM_K**-0.5
_SPARSE_NOT_SUPPORTED = "flashmla: sparse (top-k) decode is not supported yet"
_FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.uint8)
#: The decode grid's z dimension holds one CTA per part.
_MAX_PARTS = 65535


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@torch.compiler.assume_constant_result
def _sm_count(device: torch.device) -> int:
    """Multiprocessor count of ``device`` (cached per device; 132 for non-CUDA devices).

    Marked constant for ``torch.compile``: Dynamo calls it once while tracing and bakes the result in.
    """
    if device.type != "cuda":
        return _DEFAULT_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


def get_mla_metadata(
    cache_seqlens: torch.Tensor,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
    *,
    batch_invariant: bool = False,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan the split-KV work of one decode step; run once per step, reuse the result for every layer.

    Arguments:
        cache_seqlens: int32 ``[batch_size]``, contiguous, on the device that will run the decode: number of
            tokens in each request's KV cache. Values are read on the device only (no host sync).
        num_q_tokens_per_head_k: ``s_q * num_heads_q // num_heads_k``, the number of query rows that share
            one KV head (MTP tokens times the query heads of a group).
        num_heads_k: number of KV heads ``h_kv`` (1 for DeepSeek MLA).
        num_heads_q: accepted for compatibility with FlashMLA's API; unused by dense decode.
        is_fp8_kvcache: accepted (either value): an FP8 KV cache uses the same scheduler, so the same
            metadata serves both kinds of cache.
        topk: must be None: sparse (top-k) decode is not supported.
        batch_invariant: plan a batch-invariant decode: each request's out and lse are then bitwise the
            same whatever else is in the batch (its size, the other requests, their order, padding rows)
            and whatever the GPU's SM count. Every request is cut into chunks that depend only on its own
            length and the head geometry (never cut up to 8,192 tokens; a long request into about as many
            chunks as fill 128 CTAs), each chunk of a cut request is its own partial, and the partials are
            merged in chunk order by one fixed arithmetic; the batch only decides which SM runs which chunk.
            Costs: the partials of cut requests, and whole short requests (no split to balance them).
        max_seqlen_k: with ``batch_invariant``, required: an upper bound of ``cache_seqlens`` (for example
            ``block_table.size(1) * 64``). It sizes the split-partials workspace (``num_sm_parts`` grows to
            ``batch_size * n(max_seqlen_k) / 2`` when that is larger, ``n`` the rule's target chunk count);
            a request longer than the bound may find no room for its partials and then returns NaN rows.
            The metadata must come from the call's own lengths and head geometry: unlike the default
            mode's, metadata planned for other (even longer) lengths is not reusable.

    Returns:
        ``(tile_scheduler_metadata, num_splits)``, both int32 and on ``cache_seqlens``'s device:

        * ``tile_scheduler_metadata``: ``[num_sm_parts, 8]``, one work record per SM partition (its first
          and last request and block, split bookkeeping; layout in ``csrc/kernels/params.h``);
        * ``num_splits``: ``[batch_size + 1]``, the exclusive prefix sum of the number of partial results
          each request is split into (0 for a request handled by one partition).

        Pass both unchanged to :func:`flash_mla_with_kvcache`. They depend on the values of
        ``cache_seqlens``, ``num_heads_k`` and the SM count, so recompute them when the lengths change.

    ``num_sm_parts = max(sm_count // num_heads_k // ceil(num_q_tokens_per_head_k / 64), 1)``, where
    ``sm_count`` is the multiprocessor count of ``cache_seqlens``'s CUDA device (queried once per device
    and cached) or 132 for CPU tensors. The output shapes depend only on ``batch_size`` and
    ``num_sm_parts``, so the call is CUDA-graph capturable.

    Raises:
        NotImplementedError: ``topk`` given.
        FlashMLAInputError (a ``ValueError`` and a ``RuntimeError``): invalid arguments, e.g.
            ``cache_seqlens`` not int32 / not 1-D / empty, ``num_heads_k < 1``.
    """
    if topk is not None:
        raise NotImplementedError(_SPARSE_NOT_SUPPORTED)
    check_positive_int(num_q_tokens_per_head_k, "num_q_tokens_per_head_k")
    check_positive_int(num_heads_k, "num_heads_k")
    if not batch_invariant:
        if max_seqlen_k is not None:
            raise FlashMLAInputError(MSG_MAX_SEQLEN_NEEDS_INVARIANT)
        _, num_sm_parts = metadata_parts(cache_seqlens.device, 0, num_q_tokens_per_head_k, num_heads_k)
        return torch.ops.flashmla.get_mla_metadata(
            cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts
        )
    if max_seqlen_k is None:
        raise FlashMLAInputError(MSG_INVARIANT_MAX_SEQLEN)
    if max_seqlen_k < 0:
        raise FlashMLAInputError(MSG_NONNEGATIVE_INT.format(name="max_seqlen_k", value=max_seqlen_k))
    parts, num_sm_parts = metadata_parts(
        cache_seqlens.device, cache_seqlens.size(0), num_q_tokens_per_head_k, num_heads_k, max_seqlen_k
    )
    return torch.ops.flashmla.get_mla_metadata_batch_invariant(
        cache_seqlens, num_q_tokens_per_head_k, num_heads_k, parts, num_sm_parts
    )


def metadata_parts(
    device: torch.device,
    batch_size: int,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    max_seqlen_k: int | None = None,
) -> tuple[int, int]:
    """``(rows, num_sm_parts)``: the rows of the ``tile_scheduler_metadata`` that :func:`get_mla_metadata`
    returns on ``device`` for ``batch_size`` requests, and the default schedule's part count. With
    ``max_seqlen_k`` (the batch-invariant mode) ``rows`` may exceed ``num_sm_parts`` and grows with the
    batch; without it both are ``num_sm_parts``. Host arithmetic only, for callers that preallocate the
    metadata (a CUDA-graph buffer sized for their largest batch).

    Raises:
        FlashMLAInputError: the batch-invariant schedule would need more than 65535 parts.
    """
    num_sm_parts = max(_sm_count(device) // ctas_per_part(num_q_tokens_per_head_k, num_heads_k), 1)
    if max_seqlen_k is None:
        return num_sm_parts, num_sm_parts
    pieces = invariant_max_pieces(batch_size, max_seqlen_k, num_q_tokens_per_head_k, num_heads_k)
    parts = max(num_sm_parts, (pieces + 1) // 2)
    if parts > _MAX_PARTS:
        raise FlashMLAInputError(
            MSG_INVARIANT_TOO_MANY_PARTS.format(b=batch_size, max_seqlen_k=max_seqlen_k, parts=parts)
        )
    return parts, num_sm_parts


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    k_scale: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head latent attention (MLA) decode over a paged KV cache ("MQA mode", absorbed weights).

    Arguments:
        q: ``[batch_size, seq_len_q, num_heads_q, 576]``, bfloat16 or float16. Each request's ``seq_len_q``
            query tokens (1, or more with multi-token prediction) are the *last* tokens of its sequence.
            Only the last dimension must be contiguous.
        k_cache: ``[num_blocks, 64, num_heads_k, 576]``, same dtype as ``q``: the paged latent cache,
            64 tokens per page (block). Each row is 512 latent ("NoPE") + 64 RoPE columns; the values are
            the first 512 columns of the same rows (there is no separate V cache). Only the last dimension
            must be contiguous. ``num_heads_q`` must be a multiple of ``num_heads_k``; query head h attends
            with KV head ``h // (num_heads_q // num_heads_k)``. With ``is_fp8_kvcache=True``, one of the
            FP8 formats instead (``q`` stays bfloat16/float16):

            * per-tensor: ``torch.float8_e4m3fn`` ``[num_blocks, 64, num_heads_k, 576]``; the value is
              ``stored * k_scale``;
            * DeepSeek V3.2: ``torch.uint8`` ``[num_blocks, 64, num_heads_k, 656]``: per token 512 e4m3
              values (latent / V), 4 float32 scales (one per 128 of them, little-endian), 64 bfloat16 RoPE
              values; value = e4m3 * its tile's scale. The page stride may be padded (last dim contiguous).

            :func:`flashmla_ops.quantize_kv_cache` makes either from a bfloat16/float16 cache.
        block_table: int32 ``[batch_size, max_num_blocks_per_seq]``, last dimension contiguous. Token t of
            request i lives in page ``block_table[i, t // 64]``, row ``t % 64``. Only the first
            ``ceil(cache_seqlens[i] / 64)`` entries of row i are read; the rest may hold anything
            (padding such as -1 or 2**31-1 is fine). Cache rows past ``cache_seqlens[i]`` are never used,
            even when they hold NaN.
        cache_seqlens: int32 ``[batch_size]``, contiguous: number of tokens in each request's cache,
            including its ``seq_len_q`` new tokens. 0 is allowed (the request's output is 0).
        head_dim_v: head dimension of the values and the output; must be 512.
        tile_scheduler_metadata: int32 ``[num_sm_parts, 8]`` from :func:`get_mla_metadata`.
        num_splits: int32 ``[batch_size + 1]`` from :func:`get_mla_metadata`.
        softmax_scale: scale of ``q . k`` before the softmax. Default ``1 / sqrt(576)`` (the q/k head dim).
        causal: apply a causal mask over the query tokens, aligned to the bottom right: query token s
            (0-based) sees the first ``cache_seqlens[i] - (seq_len_q - 1 - s)`` tokens. Irrelevant when
            ``seq_len_q == 1``.
        is_fp8_kvcache: True for an FP8 ``k_cache`` (the format follows from its dtype and last dim).
            Attention runs over the dequantised cache with fp32 accumulation; ``out`` has ``q``'s dtype.
        indices: must be None: sparse (top-k) attention is not supported.
        out: optional preallocated output, ``[batch_size, seq_len_q, num_heads_q, 512]``, ``q``'s dtype,
            last dimension contiguous. Give ``out`` and ``lse`` together (e.g. for CUDA-graph capture):
            the kernel writes them in place and returns them.
        lse: optional preallocated float32 ``[batch_size, num_heads_q, seq_len_q]`` (any strides).
        workspace: optional preallocated float32 scratch for the split partials, contiguous, 16-byte
            aligned on CUDA, at least :func:`workspace_size` elements; only with ``out`` and ``lse``. Then
            the call allocates nothing (without it, each call takes its scratch from PyTorch's caching
            allocator). One workspace may serve every layer of a step (the calls run one after another on
            the stream); calls that may run concurrently on different streams need their own.
        k_scale: the per-tensor FP8 format's scale (required there; None for a bf16/fp16 or V3.2 cache):
            a float32 tensor of shape ``[1]`` on ``q``'s device, read on the device, so a captured CUDA
            graph sees a new value written into it. A Python float is accepted for convenience; it is
            turned into a one-element tensor on each call (an allocation and a fill kernel, and a CUDA
            graph would keep the captured value): pass a tensor on the hot path.

    Returns:
        ``(out, softmax_lse)``:

        * ``out``: ``[batch_size, seq_len_q, num_heads_q, 512]``, ``q``'s dtype: softmax-weighted sum of
          the visible values, accumulated in fp32.
        * ``softmax_lse``: float32 ``[batch_size, num_heads_q, seq_len_q]`` (heads before tokens, unlike
          ``out``): natural-log log-sum-exp of the scaled logits over the visible keys.

        A query row that sees no key (``cache_seqlens[i] == 0``, or a causal row whose window is empty)
        gets ``out = 0`` and ``softmax_lse = +inf``. Freshly allocated outputs are contiguous.

    Not supported: sparse (top-k / ``indices``) attention, attention sinks, FP8 queries, head dims other
    than 576/512, page sizes other than 64, and autograd (this is a forward-only decode kernel). The CUDA
    kernel targets Hopper (sm_90a); this version has no CUDA kernel for an FP8 cache yet (CPU only: a CUDA
    FP8 call raises ``NotImplementedError``). Shapes, dtypes and devices are checked without reading tensor
    values; the CUDA kernel does not validate ``cache_seqlens`` / ``block_table`` values (a negative length,
    or a used block id out of range, gives NaN for that request), while the CPU implementation raises.

    Raises:
        NotImplementedError: ``indices`` given; an FP8 cache on CUDA tensors (no FP8 kernel in this version).
        FlashMLAInputError (a ``ValueError`` and a ``RuntimeError``): invalid shapes, dtypes, devices or
            strides; only one of ``out`` / ``lse`` given; an FP8 cache without ``is_fp8_kvcache=True``;
            ``k_scale`` missing for a per-tensor FP8 cache or given for any other. The CUDA kernel raises
            ``RuntimeError`` with the same message.
    """
    if indices is not None:
        raise NotImplementedError(_SPARSE_NOT_SUPPORTED)
    if softmax_scale is None:
        # == q.shape[-1] ** -0.5 for every valid q (the op rejects any other head dim); a Python constant
        # keeps the scale a plain float under torch.compile with dynamic shapes.
        softmax_scale = _DEFAULT_SOFTMAX_SCALE
    if out is None or lse is None:
        if out is not None or lse is not None:
            raise FlashMLAInputError(MSG_OUT_LSE_TOGETHER)
        if workspace is not None:
            raise FlashMLAInputError(MSG_WORKSPACE_NEEDS_OUT)
    args = (q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits)

    if not is_fp8_kvcache:
        if k_scale is not None:
            raise FlashMLAInputError(MSG_K_SCALE_NEEDS_FP8)
        if k_cache.dtype in _FP8_KV_DTYPES:
            raise FlashMLAInputError(MSG_FP8_CACHE_NEEDS_FLAG.format(dtype=fmt_dtype(k_cache.dtype)))
        if out is None:
            return torch.ops.flashmla.mla_decode(*args, softmax_scale, causal)
        torch.ops.flashmla.mla_decode_out(*args, softmax_scale, causal, out, lse, workspace)
        return out, lse

    if k_scale is not None and not isinstance(k_scale, torch.Tensor):
        # Convenience only: an allocation and a fill on every call (no host sync).
        k_scale = torch.full((1,), k_scale, dtype=torch.float32, device=q.device)
    if out is None:
        return torch.ops.flashmla.mla_decode_fp8(*args, softmax_scale, causal, k_scale)
    torch.ops.flashmla.mla_decode_fp8_out(*args, softmax_scale, causal, k_scale, out, lse, workspace)
    return out, lse


def workspace_size(
    tile_scheduler_metadata: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int
) -> int:
    """Number of float32 elements the ``workspace`` of :func:`flash_mla_with_kvcache` needs.

    Arguments:
        tile_scheduler_metadata: from :func:`get_mla_metadata` (only its number of rows is read).
        num_q_tokens_per_head_k, num_heads_k: the values given to :func:`get_mla_metadata`
            (``seq_len_q * num_heads_q // num_heads_k`` and ``num_heads_k``).

    The size depends on the GPU's part count and the head geometry, never on the batch size or the
    lengths, so one buffer serves every step of a serving loop::

        meta, splits = flashmla_ops.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
        ws = torch.empty(flashmla_ops.workspace_size(meta, s_q * h_q // h_kv, h_kv),
                         dtype=torch.float32, device="cuda")
        flashmla_ops.flash_mla_with_kvcache(..., out=out, lse=lse, workspace=ws)

    At h_q = 128, s_q = 1, h_kv = 1 on an H100 (66 parts) that is 8,667,648 elements (34.7 MB).
    """
    check_positive_int(num_q_tokens_per_head_k, "num_q_tokens_per_head_k")
    check_positive_int(num_heads_k, "num_heads_k")
    return workspace_numel(tile_scheduler_metadata.size(0), num_heads_k, num_q_tokens_per_head_k)
