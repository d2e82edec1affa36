"""The one place where the ``torch.ops.flashmla`` operator schemas are written.

Schemas are owned by Python (``torch.library.Library("flashmla", "DEF")``) so that the ops, their fake
implementations (``flashmla_ops.meta``) and their CPU reference kernels (``flashmla_ops.reference``) exist on
every machine, with or without the compiled CUDA extension. The CUDA extension (``flashmla_ops._C``) only
registers backend kernels for these names (``STABLE_TORCH_LIBRARY_IMPL(flashmla, CUDA, m)`` in
``csrc/api/``); it never defines a schema. Changing a schema here is an API change: the snapshot test in
``tests/test_schema.py`` pins the exact strings.
"""

from __future__ import annotations

import torch

NAMESPACE = "flashmla"

#: Record layout of one row of ``tile_scheduler_metadata`` (int32). See ``docs/architecture.md``.
TILE_SCHEDULER_METADATA_SIZE = 8

SCHEMAS: dict[str, str] = {
    # Scheduler: balances (request, 64-token block) work over `num_sm_parts` partitions.
    # Output shapes depend only on len(cache_seqlens) and num_sm_parts, never on values.
    "get_mla_metadata": (
        "get_mla_metadata(Tensor cache_seqlens, int num_q_tokens_per_head_k, int num_heads_k, "
        "int num_sm_parts) -> (Tensor, Tensor)"
    ),
    # Batch-invariant scheduler: every request cut at chunk boundaries that depend only on its own length
    # and the head geometry (flashmla_ops/reference.py: get_mla_metadata_batch_invariant_reference). Work goes
    # to the first num_work_parts parts; the rest are empty and size the split-partials workspace.
    "get_mla_metadata_batch_invariant": (
        "get_mla_metadata_batch_invariant(Tensor cache_seqlens, int num_q_tokens_per_head_k, "
        "int num_heads_k, int num_sm_parts, int num_work_parts) -> (Tensor, Tensor)"
    ),
    # Functional decode: returns (out [b, s_q, h_q, head_dim_v] in q's dtype, lse fp32 [b, h_q, s_q]).
    "mla_decode": (
        "mla_decode(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
        "Tensor tile_scheduler_metadata, Tensor num_splits, float softmax_scale, bool causal) "
        "-> (Tensor, Tensor)"
    ),
    # Out-variant for CUDA-graph callers: writes the preallocated `out` and `lse`, returns nothing. With a
    # preallocated float32 `workspace` (>= workspace_size(...) elements) for the split partials it allocates
    # nothing; without one it takes a workspace from the caching allocator for the call.
    "mla_decode_out": (
        "mla_decode_out(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, "
        "int head_dim_v, Tensor tile_scheduler_metadata, Tensor num_splits, float softmax_scale, "
        "bool causal, Tensor(a!) out, Tensor(b!) lse, Tensor(c!)? workspace=None) -> ()"
    ),
    # FP8 KV cache, q stays bfloat16/float16, out in q's dtype, lse fp32. The cache format follows from
    # k_cache's dtype and last dim: float8_e4m3fn [num_pages, 64, h_kv, 576] with a per-tensor float32
    # k_scale of shape [1] (a tensor, so a captured CUDA graph sees a new value), or uint8
    # [num_pages, 64, h_kv, 656] (DeepSeek V3.2: 512 e4m3 + 4 float32 scales + 64 bfloat16 per token) with
    # k_scale None. Separate ops rather than an extra argument of mla_decode: the dense schemas, for which
    # the compiled extension registers its kernels, stay as they are.
    "mla_decode_fp8": (
        "mla_decode_fp8(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
        "Tensor tile_scheduler_metadata, Tensor num_splits, float softmax_scale, bool causal, "
        "Tensor? k_scale) -> (Tensor, Tensor)"
    ),
    "mla_decode_fp8_out": (
        "mla_decode_fp8_out(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, "
        "int head_dim_v, Tensor tile_scheduler_metadata, Tensor num_splits, float softmax_scale, "
        "bool causal, Tensor? k_scale, Tensor(a!) out, Tensor(b!) lse, Tensor(c!)? workspace=None) -> ()"
    ),
}

#: The ops that read an FP8 KV cache. Until the compiled extension registers a CUDA kernel for one of them,
#: ``flashmla_ops/__init__.py`` gives it a CUDA stub that raises ``NotImplementedError``.
FP8_OPS: tuple[str, ...] = ("mla_decode_fp8", "mla_decode_fp8_out")

_lib = torch.library.Library(NAMESPACE, "DEF")  # noqa: TOR901 - the library must outlive this module
for _schema in SCHEMAS.values():
    _lib.define(_schema)
