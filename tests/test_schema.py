"""Snapshots of the torch.ops.flashmla schemas: changing one is an API/ABI change and must show up in review.

Update deliberately with ``EXPECTTEST_ACCEPT=1 pytest tests/test_schema.py``.
"""

from __future__ import annotations

import expecttest
import torch

import flashmla_ops
from flashmla_ops import _schema


class TestSchema(expecttest.TestCase):
    def test_get_mla_metadata(self):
        self.assertExpectedInline(
            str(torch.ops.flashmla.get_mla_metadata.default._schema),
            """flashmla::get_mla_metadata(Tensor cache_seqlens, int num_q_tokens_per_head_k, int num_heads_k, int num_sm_parts) -> (Tensor, Tensor)""",  # noqa: E501
        )

    def test_get_mla_metadata_batch_invariant(self):
        self.assertExpectedInline(
            str(torch.ops.flashmla.get_mla_metadata_batch_invariant.default._schema),
            """flashmla::get_mla_metadata_batch_invariant(Tensor cache_seqlens, int num_q_tokens_per_head_k, int num_heads_k, int num_sm_parts, int num_work_parts) -> (Tensor, Tensor)""",  # noqa: E501
        )

    def test_mla_decode(self):
        self.assertExpectedInline(
            str(torch.ops.flashmla.mla_decode.default._schema),
            """flashmla::mla_decode(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, Tensor tile_scheduler_metadata, Tensor num_splits, float softmax_scale, bool causal) -> (Tensor, Tensor)""",  # noqa: E501
        )

    def test_mla_decode_out(self):
        self.assertExpectedInline(
            str(torch.ops.flashmla.mla_decode_out.default._schema),
            """flashmla::mla_decode_out(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, Tensor tile_scheduler_metadata, Tensor num_splits, float softmax_scale, bool causal, Tensor(a!) out, Tensor(b!) lse, Tensor(c!)? workspace=None) -> ()""",  # noqa: E501
        )

    def test_mla_decode_fp8(self):
        self.assertExpectedInline(
            str(torch.ops.flashmla.mla_decode_fp8.default._schema),
            """flashmla::mla_decode_fp8(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, Tensor tile_scheduler_metadata, Tensor num_splits, float softmax_scale, bool causal, Tensor? k_scale) -> (Tensor, Tensor)""",  # noqa: E501
        )

    def test_mla_decode_fp8_out(self):
        self.assertExpectedInline(
            str(torch.ops.flashmla.mla_decode_fp8_out.default._schema),
            """flashmla::mla_decode_fp8_out(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, Tensor tile_scheduler_metadata, Tensor num_splits, float softmax_scale, bool causal, Tensor? k_scale, Tensor(a!) out, Tensor(b!) lse, Tensor(c!)? workspace=None) -> ()""",  # noqa: E501
        )

    def test_op_set(self):
        """Exactly these ops exist in the namespace, each with one (default) overload."""
        self.assertEqual(
            sorted(_schema.SCHEMAS),
            [
                "get_mla_metadata",
                "get_mla_metadata_batch_invariant",
                "mla_decode",
                "mla_decode_fp8",
                "mla_decode_fp8_out",
                "mla_decode_out",
            ],
        )
        self.assertEqual(_schema.FP8_OPS, ("mla_decode_fp8", "mla_decode_fp8_out"))
        for name in _schema.SCHEMAS:
            self.assertEqual(getattr(torch.ops.flashmla, name).overloads(), ["default"])

    def test_mutation_annotations(self):
        """Only the out-variants mutate (out, lse, their workspace); nothing returns a mutated tensor."""
        for name in _schema.SCHEMAS:
            schema = getattr(torch.ops.flashmla, name).default._schema
            mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
            is_out = name.endswith("_out")
            self.assertEqual(mutated, ["out", "lse", "workspace"] if is_out else [])
            self.assertTrue(all(r.alias_info is None for r in schema.returns))

    def test_kernels_registered(self):
        """CPU kernels (reference), fakes (meta) and CUDA kernels (compiled, or stubs) exist for every op."""
        for name in _schema.SCHEMAS:
            qualname = f"flashmla::{name}"
            for key in ("CPU", "CUDA", "Meta"):
                self.assertTrue(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), (name, key))
        self.assertIsInstance(flashmla_ops.cuda_extension_available(), bool)
