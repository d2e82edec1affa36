"""Fake (meta) implementations of the torch.ops.flashmla ops. Installed as ``flashmla_ops.meta``.

One ``torch.library.register_fake`` per op. A fake runs the same metadata-only validation as the real
kernels (``flashmla_ops._validation``) and returns empty outputs of the right shape, dtype and device. It
never reads values, never calls ``.item()`` and never queries a device, so it serves ``FakeTensorMode``,
``torch.compile`` (static and dynamic shapes) and the ``meta`` device alike.

Output shapes depend only on input shapes and int arguments:

* ``get_mla_metadata`` and ``get_mla_metadata_batch_invariant``: ``tile_scheduler_metadata`` int32
  ``[num_sm_parts, 8]`` and ``num_splits`` int32 ``[b + 1]``.
* ``mla_decode``: ``out`` ``[b, s_q, h_q, 512]`` in q's dtype and ``lse`` float32 ``[b, h_q, s_q]``, both
  contiguous.
* ``mla_decode_out``: returns None (it writes its ``out`` / ``lse`` arguments; ``workspace`` is scratch).
* ``mla_decode_fp8`` / ``mla_decode_fp8_out``: as ``mla_decode`` / ``mla_decode_out`` (out in q's dtype,
  whatever the FP8 cache format); the checks also infer the cache format and validate ``k_scale``.
"""

from __future__ import annotations

import torch

from flashmla_ops._validation import (
    TILE_SCHEDULER_METADATA_SIZE,
    check_get_mla_metadata,
    check_get_mla_metadata_batch_invariant,
    check_mla_decode,
    check_mla_decode_fp8,
    check_mla_decode_fp8_out,
    check_mla_decode_out,
)


def _metadata_outputs(
    cache_seqlens: torch.Tensor, b: int, num_sm_parts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both schedulers' outputs: ``tile_scheduler_metadata [num_sm_parts, 8]``, ``num_splits [b + 1]``."""
    meta = cache_seqlens.new_empty((num_sm_parts, TILE_SCHEDULER_METADATA_SIZE), dtype=torch.int32)
    return meta, cache_seqlens.new_empty((b + 1,), dtype=torch.int32)


@torch.library.register_fake("flashmla::get_mla_metadata")
def _get_mla_metadata_fake(
    cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int, num_sm_parts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    b = check_get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts)
    return _metadata_outputs(cache_seqlens, b, num_sm_parts)


@torch.library.register_fake("flashmla::get_mla_metadata_batch_invariant")
def _get_mla_metadata_batch_invariant_fake(
    cache_seqlens: torch.Tensor,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    num_sm_parts: int,
    num_work_parts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    b = check_get_mla_metadata_batch_invariant(
        cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts, num_work_parts
    )
    return _metadata_outputs(cache_seqlens, b, num_sm_parts)


@torch.library.register_fake("flashmla::mla_decode")
def _mla_decode_fake(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, s_q, h_q, _ = check_mla_decode(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits
    )
    out = q.new_empty((b, s_q, h_q, head_dim_v))
    lse = q.new_empty((b, h_q, s_q), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("flashmla::mla_decode_out")
def _mla_decode_out_fake(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    out: torch.Tensor,
    lse: torch.Tensor,
    workspace: torch.Tensor | None = None,
) -> None:
    check_mla_decode_out(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        head_dim_v,
        tile_scheduler_metadata,
        num_splits,
        out,
        lse,
        workspace,
    )
    return None


@torch.library.register_fake("flashmla::mla_decode_fp8")
def _mla_decode_fp8_fake(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    k_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, s_q, h_q, _ = check_mla_decode_fp8(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, k_scale
    )
    out = q.new_empty((b, s_q, h_q, head_dim_v))
    lse = q.new_empty((b, h_q, s_q), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("flashmla::mla_decode_fp8_out")
def _mla_decode_fp8_out_fake(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    k_scale: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    workspace: torch.Tensor | None = None,
) -> None:
    check_mla_decode_fp8_out(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        head_dim_v,
        tile_scheduler_metadata,
        num_splits,
        k_scale,
        out,
        lse,
        workspace,
    )
    return None
