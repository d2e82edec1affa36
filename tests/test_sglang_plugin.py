"""The SGLang integration (``integration/sglang_plugin.py``, ``sglang_backend.py``) without SGLang installed.

The entry point in the installed package's metadata, the factory's documented configuration errors (small
fake ``ModelRunner`` objects), the kernel adapters on CPU, the re-binding machinery on a small
``FlashMLABackend``-shaped class, ``register()`` with SGLang missing, the block-table widening and the
metadata's fit in SGLang's CUDA-graph buffer. They run everywhere. The tests against the real ``sglang``
package are in ``test_sglang_real.py``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import math
import sys
import types

import pytest
import torch
from _fp8 import make_fp8_inputs
from _helpers import make_inputs
from flashmla_ops.integration import sglang_backend, sglang_plugin
from flashmla_ops.integration.sglang_plugin import BACKEND_NAME, FlashMLAOpsSGLangError

import flashmla_ops


def _runner(**overrides: object) -> types.SimpleNamespace:
    """A fake SGLang ModelRunner with the attributes the factory reads; valid unless overridden."""
    fields: dict[str, object] = {
        "use_mla_backend": True,
        "page_size": 64,
        "kv_cache_dtype": torch.bfloat16,
        "model_config": types.SimpleNamespace(kv_lora_rank=512, qk_rope_head_dim=64),
    }
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


# ==== 1. No SGLang needed ===================================================================================
def test_entry_point_is_declared_in_the_installed_metadata():
    try:
        importlib.metadata.distribution("flashmla_ops")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("flashmla_ops is not installed (running from a source tree): no entry-point metadata")
    eps = [
        ep for ep in importlib.metadata.entry_points(group="sglang.srt.plugins") if ep.name == BACKEND_NAME
    ]
    assert len(eps) == 1, eps
    assert eps[0].value == "flashmla_ops.integration.sglang_plugin:register"
    assert eps[0].load() is sglang_plugin.register


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"use_mla_backend": False}, "serves MLA models only"),
        ({"page_size": 1}, r"needs a KV-cache page size of 64, got page_size=1: launch with --page-size 64"),
        ({"page_size": 32}, r"got page_size=32: launch with --page-size 64"),
        ({"page_size": None}, r"got page_size=None"),
        ({"kv_cache_dtype": torch.float8_e5m2}, r"does not support a torch.float8_e5m2 KV cache.*fp8_e4m3"),
        ({"kv_cache_dtype": torch.float32}, r"does not support a torch.float32 KV cache"),
        (
            {"model_config": types.SimpleNamespace(kv_lora_rank=256, qk_rope_head_dim=64)},
            r"got kv_lora_rank=256",
        ),
        (
            {"model_config": types.SimpleNamespace(kv_lora_rank=512, qk_rope_head_dim=32)},
            r"got qk_rope_head_dim=32",
        ),
        # the MLA check comes first: a non-MLA model with page size 1 is reported as non-MLA
        ({"use_mla_backend": False, "page_size": 1}, "serves MLA models only"),
    ],
)
def test_factory_rejects_unsupported_configurations(overrides, match):
    runner = _runner(**overrides)
    with pytest.raises(FlashMLAOpsSGLangError, match=match) as info:
        sglang_plugin.create_backend(runner)
    assert isinstance(info.value, ValueError)
    with pytest.raises(FlashMLAOpsSGLangError, match=match):
        sglang_plugin.check_runner(runner)


def test_factory_accepts_a_valid_runner_description():
    sglang_plugin.check_runner(_runner())
    sglang_plugin.check_runner(_runner(kv_cache_dtype=torch.float16, model_config=None))
    sglang_plugin.check_runner(_runner(kv_cache_dtype=torch.float8_e4m3fn))


def _args(inputs, meta, num_splits, scale: float) -> dict:
    """SGLang's keyword call of flash_mla_with_kvcache (flashmla_backend.py, bf16 path)."""
    return {
        "q": inputs.q,
        "k_cache": inputs.k_cache,
        "block_table": inputs.block_table,
        "cache_seqlens": inputs.cache_seqlens,
        "head_dim_v": 512,
        "tile_scheduler_metadata": meta,
        "num_splits": num_splits,
        "softmax_scale": scale,
        "causal": True,
    }


@pytest.mark.parametrize("s_q", [1, 2])
def test_kernel_adapters_match_flashmla_ops(s_q):
    inputs = make_inputs([3, 64, 130], s_q=s_q, h_q=16, seed=s_q)
    meta, num_splits = sglang_backend.get_mla_metadata(
        inputs.cache_seqlens, s_q * 16, 1, is_fp8_kvcache=False
    )
    ref_meta, ref_splits = flashmla_ops.get_mla_metadata(inputs.cache_seqlens, s_q * 16, 1)
    assert torch.equal(meta, ref_meta) and torch.equal(num_splits, ref_splits)
    out, lse = sglang_backend.flash_mla_with_kvcache(**_args(inputs, meta, num_splits, 0.125))
    ref_out, ref_lse = flashmla_ops.flash_mla_with_kvcache(
        inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512, meta, num_splits, 0.125, True
    )
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_adapter_compiles_without_graph_breaks_and_still_widens_the_capture_view():
    """Under torch.compile (SGLang's --enable-torch-compile) the adapter is one graph: the block-table
    widening, which reads the storage size, runs inside an opaque custom op. The narrow capture-time view
    is sliced inside the compiled region, as SGLang's forward does; the op must still see its row stride, or
    the requests longer than the view's one column would fail (the CPU kernel refuses a too-narrow table)."""
    inputs = make_inputs([3, 64, 130, 200], h_q=16, seed=3, extra_cols=0)
    buf = torch.zeros(6, 40, dtype=torch.int32)  # SGLang's cuda_graph_kv_indices: [max_bs, max_pages]
    buf[:4, : inputs.block_table.shape[1]] = inputs.block_table
    meta, num_splits = sglang_backend.get_mla_metadata(inputs.cache_seqlens, 16, 1)

    def step(buf, q, k_cache, seqlens, meta, num_splits):
        table = buf[: q.shape[0], :1]  # the view a captured graph bakes in
        return sglang_backend.flash_mla_with_kvcache(
            q, k_cache, table, seqlens, 512, meta, num_splits, 0.125, True
        )

    args = (buf, inputs.q, inputs.k_cache, inputs.cache_seqlens, meta, num_splits)
    explained = torch._dynamo.explain(step)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    out, lse = torch.compile(step, fullgraph=True)(*args)
    ref_out, ref_lse = flashmla_ops.flash_mla_with_kvcache(
        inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512, meta, num_splits, 0.125, True
    )
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def _fp8_reference(inputs, meta, num_splits, scale: float, k_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """flashmla_ops' own FP8 decode of ``inputs`` (causal), what the SGLang adapter must reproduce."""
    args = (inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512, meta, num_splits)
    return flashmla_ops.flash_mla_with_kvcache(*args, scale, True, is_fp8_kvcache=True, k_scale=k_scale)


def test_kernel_adapters_decode_an_fp8_cache_with_the_unquantised_query():
    """SGLang's FP8 call (e4m3 pool, descale_q / descale_k = the layer's k_scale) with the q that
    keep_q_unquantised handed back: flashmla_ops' FP8 op with k_scale = descale_k, q left in bf16."""
    inputs = make_fp8_inputs([3, 64, 130], 2, 16, seed=5)
    meta, num_splits = sglang_backend.get_mla_metadata(inputs.cache_seqlens, 32, 1, is_fp8_kvcache=True)
    ref_meta, ref_splits = flashmla_ops.get_mla_metadata(inputs.cache_seqlens, 32, 1)
    assert torch.equal(meta, ref_meta) and torch.equal(num_splits, ref_splits)
    q, scale = sglang_backend.keep_q_unquantised(inputs.q, inputs.k_scale)
    assert q is inputs.q and scale is inputs.k_scale
    ref_out, ref_lse = _fp8_reference(inputs, meta, num_splits, 0.125, inputs.k_scale)
    args = _args(inputs, meta, num_splits, 0.125)
    for extra in (
        {"descale_q": inputs.k_scale, "descale_k": inputs.k_scale},
        {"descale_k": inputs.k_scale, "is_fp8_kvcache": True},
    ):
        out, lse = sglang_backend.flash_mla_with_kvcache(**args, **extra)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    # a pool stored as bytes is viewed as e4m3
    as_bytes = dict(args, k_cache=inputs.k_cache.view(torch.uint8))
    out, lse = sglang_backend.flash_mla_with_kvcache(**as_bytes, descale_k=inputs.k_scale)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    # no descale_k: scale 1
    out, _ = sglang_backend.flash_mla_with_kvcache(**args, is_fp8_kvcache=True)
    ref_one, _ = _fp8_reference(inputs, meta, num_splits, 0.125, 1.0)
    assert torch.equal(out, ref_one)


def test_kernel_adapters_reject_fp8_queries_e5m2_and_the_sched_meta_api():
    inputs = make_fp8_inputs([10], 1, 16)
    meta, num_splits = sglang_backend.get_mla_metadata(inputs.cache_seqlens, 16, 1)
    fp8_q = dict(_args(inputs, meta, num_splits, 0.1), q=inputs.q.to(torch.float8_e4m3fn))
    with pytest.raises(NotImplementedError, match="handed an FP8 query"):
        sglang_backend.flash_mla_with_kvcache(**fp8_q, descale_q=inputs.k_scale, descale_k=inputs.k_scale)
    e5m2 = dict(_args(inputs, meta, num_splits, 0.1), k_cache=inputs.k_cache.to(torch.float8_e5m2))
    with pytest.raises(NotImplementedError, match="e4m3"):
        sglang_backend.flash_mla_with_kvcache(**e5m2, descale_k=inputs.k_scale)
    with pytest.raises(NotImplementedError, match="FlashMLASchedMeta"):
        sglang_backend.get_mla_metadata()


_FAKE_BACKEND_SOURCE = """
def get_mla_metadata(*args, **kwargs):
    raise AssertionError("builtin get_mla_metadata called")

def scaled_fp8_quant(x, scale):
    raise AssertionError("builtin scaled_fp8_quant called")

def flash_mla_with_kvcache(*args, **kwargs):
    raise AssertionError("builtin flash_mla_with_kvcache called")

class Parent:
    def forward_extend(self, *args):
        return "parent forward_extend"

class FlashMLABackend(Parent):
    def __init__(self, runner, fp8=None, dcp=1):
        self.data_type = fp8  # an FP8 dtype, or None
        self.is_fp8_kvcache = fp8 is not None
        self.dcp_world_size = dcp

    def init_forward_metadata(self, seqlens, q_tokens):
        self.meta = get_mla_metadata(seqlens, q_tokens, 1, is_fp8_kvcache=self.is_fp8_kvcache)

    def forward_decode(self, inputs, scale):
        q, fp8 = inputs.q, {}
        if self.is_fp8_kvcache:  # SGLang's FP8 branch: q quantised with the layer's k_scale
            q, _ = scaled_fp8_quant(q, inputs.k_scale)
            fp8 = dict(descale_q=inputs.k_scale, descale_k=inputs.k_scale)
        return flash_mla_with_kvcache(
            q=q, k_cache=inputs.k_cache, block_table=inputs.block_table,
            cache_seqlens=inputs.cache_seqlens, head_dim_v=512, tile_scheduler_metadata=self.meta[0],
            num_splits=self.meta[1], softmax_scale=scale, causal=True, **fp8,
        )

    def forward_extend(self, mode, *args):
        if mode == "extend":
            return super().forward_extend(*args)
        # a nested code object (a comprehension before Python 3.12) that loads a kernel global
        return [flash_mla_with_kvcache(*args) for _ in range(1)][0]

    def unrelated(self):
        return "unrelated"
"""


def _fake_backend_module(monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), vars(module))
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_rebinding_routes_the_kernels_and_leaves_the_base_class_alone(monkeypatch):
    module = _fake_backend_module(monkeypatch, "fake_sglang_flashmla_backend", _FAKE_BACKEND_SOURCE)
    base = module.FlashMLABackend
    assert sglang_backend.kernel_users(base) == {
        "init_forward_metadata": frozenset({"get_mla_metadata"}),
        "forward_decode": frozenset({"flash_mla_with_kvcache"}),
        "forward_extend": frozenset({"flash_mla_with_kvcache"}),
    }
    cls = sglang_backend.build_backend_class(base)
    assert issubclass(cls, base) and cls.__name__ == "FlashMLAOpsBackend"
    assert cls.rebound_methods == {"init_forward_metadata", "forward_decode", "forward_extend"}
    assert cls.unrelated is base.unrelated  # only the kernel callers are copied

    inputs = make_inputs([5, 100], h_q=16, seed=3)
    backend = cls(_runner())
    backend.init_forward_metadata(inputs.cache_seqlens, 16)
    out, lse = backend.forward_decode(inputs, 0.1)
    meta, num_splits = flashmla_ops.get_mla_metadata(inputs.cache_seqlens, 16, 1)
    ref_out, ref_lse = flashmla_ops.flash_mla_with_kvcache(
        inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512, meta, num_splits, 0.1, True
    )
    assert torch.equal(backend.meta[0], meta) and torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert backend.forward_extend("extend") == "parent forward_extend"  # zero-argument super() still works
    verify_out, _ = backend.forward_extend(
        "verify", inputs.q, inputs.k_cache, inputs.block_table, inputs.cache_seqlens, 512, meta, num_splits
    )
    assert verify_out.shape == inputs.q.shape[:-1] + (512,)

    # The base class and its module are untouched: they still call the "builtin" kernels.
    assert module.flash_mla_with_kvcache.__module__ == module.__name__
    builtin = base(_runner())
    with pytest.raises(AssertionError, match="builtin get_mla_metadata called"):
        builtin.init_forward_metadata(inputs.cache_seqlens, 16)
    builtin.meta = (meta, num_splits)
    with pytest.raises(AssertionError, match="builtin flash_mla_with_kvcache called"):
        builtin.forward_decode(inputs, 0.1)


def test_rebinding_serves_sglangs_fp8_branch_with_the_unquantised_query(monkeypatch):
    """SGLang's FP8 decode branch quantises q with scaled_fp8_quant; in the copied methods that name is
    keep_q_unquantised, so the kernel gets the bf16 q and the e4m3 cache with descale_k as k_scale. The base
    class still calls the builtin quantiser."""
    module = _fake_backend_module(monkeypatch, "fake_sglang_flashmla_backend", _FAKE_BACKEND_SOURCE)
    cls = sglang_backend.build_backend_class(module.FlashMLABackend)
    inputs = make_fp8_inputs([5, 100, 64], 1, 16, seed=4)
    backend = cls(_runner(kv_cache_dtype=torch.float8_e4m3fn), fp8=torch.float8_e4m3fn)
    backend.init_forward_metadata(inputs.cache_seqlens, 16)
    out, lse = backend.forward_decode(inputs, 0.1)
    meta, num_splits = flashmla_ops.get_mla_metadata(inputs.cache_seqlens, 16, 1)
    ref_out, ref_lse = _fp8_reference(inputs, meta, num_splits, 0.1, inputs.k_scale)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    builtin = module.FlashMLABackend(None, fp8=torch.float8_e4m3fn)
    builtin.meta = (meta, num_splits)
    with pytest.raises(AssertionError, match="builtin scaled_fp8_quant called"):
        builtin.forward_decode(inputs, 0.1)


def test_backend_init_rejects_unsupported_configurations(monkeypatch):
    module = _fake_backend_module(monkeypatch, "fake_sglang_flashmla_backend", _FAKE_BACKEND_SOURCE)
    cls = sglang_backend.build_backend_class(module.FlashMLABackend)
    with pytest.raises(FlashMLAOpsSGLangError, match="--page-size 64"):
        cls(_runner(page_size=16))
    with pytest.raises(FlashMLAOpsSGLangError, match="e4m3"):
        cls(_runner(), fp8=torch.float8_e5m2)
    with pytest.raises(FlashMLAOpsSGLangError, match="decode context parallelism"):
        cls(_runner(), dcp=2)


@pytest.mark.parametrize(
    "source,match",
    [
        # the kernels are no longer called from the class: an unsupported SGLang layout
        ("class FlashMLABackend:\n    def forward_decode(self):\n        return 1\n", "does not call"),
        # only one of the two is called
        (
            "def flash_mla_with_kvcache(): pass\n"
            "class FlashMLABackend:\n"
            "    def forward_decode(self):\n        return flash_mla_with_kvcache()\n",
            "does not call",
        ),
        # a module-level helper calls a kernel: re-binding the methods would miss it
        (
            "def get_mla_metadata(): pass\ndef flash_mla_with_kvcache(): pass\n"
            "def _run():\n    return flash_mla_with_kvcache()\n"
            "class FlashMLABackend:\n"
            "    def init_forward_metadata(self):\n        return get_mla_metadata()\n"
            "    def forward_decode(self):\n        return flash_mla_with_kvcache()\n",
            r"_run calls",
        ),
        # a kernel call in a static method cannot be re-bound as a plain function
        (
            "def get_mla_metadata(): pass\ndef flash_mla_with_kvcache(): pass\n"
            "class FlashMLABackend:\n"
            "    @staticmethod\n    def init_forward_metadata():\n        return get_mla_metadata()\n"
            "    def forward_decode(self):\n        return flash_mla_with_kvcache()\n",
            "only plain methods",
        ),
    ],
)
def test_rebinding_fails_loudly_on_unexpected_layouts(monkeypatch, source, match):
    module = _fake_backend_module(monkeypatch, "fake_sglang_flashmla_backend_bad", source)
    with pytest.raises(RuntimeError, match=match):
        sglang_backend.build_backend_class(module.FlashMLABackend)


def test_register_without_sglang_logs_every_failure_and_does_not_raise(monkeypatch, caplog):
    # None in sys.modules makes `import sglang...` raise ImportError, also for modules already imported.
    for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")] + ["sglang"]:
        monkeypatch.setitem(sys.modules, name, None)
    with caplog.at_level(logging.WARNING, logger=sglang_plugin.__name__):
        status = sglang_plugin.register()
    assert set(status) == {
        "argparse_choices",
        "chunked_prefix_cache",
        "attention_backend_factory",
        "deepseek_handler",
        "page_size_hook",
    }
    for step in ("argparse_choices", "chunked_prefix_cache", "attention_backend_factory", "page_size_hook"):
        assert status[step].startswith("failed: ") and "sglang" in status[step], status
        assert any(repr(step) in r.getMessage() for r in caplog.records), step
    assert status["deepseek_handler"].startswith("deferred")


def test_widen_block_table():
    buf = torch.arange(4 * 65, dtype=torch.int32).view(4, 65)
    narrow = buf[:3, :1]
    wide = sglang_backend.widen_block_table(narrow)
    assert wide.shape == (3, 65) and wide.data_ptr() == buf.data_ptr() and torch.equal(wide, buf[:3])
    # the last row of the buffer cannot grow past the storage (and every row gets that width)
    tail = buf.view(-1)[65 * 3 + 5 :].as_strided((1, 10), (65, 1))
    assert sglang_backend.widen_block_table(tail).shape == (1, 60)
    three = buf.view(-1).as_strided((3, 2), (65, 1), 10)  # rows start at 10, 75, 140; storage ends at 260
    wide3 = sglang_backend.widen_block_table(three)
    assert wide3.shape == (3, 65) and torch.equal(wide3[2], buf.view(-1)[140:205])
    short = buf.view(-1).as_strided((3, 2), (65, 1), 70)  # last row starts at 200: 60 elements left
    assert sglang_backend.widen_block_table(short).shape == (3, 60)
    # unchanged: a full-width table, a transposed one, a 1-D tensor, an empty one
    for t in (buf, buf.t(), buf.view(-1), buf[:0, :1]):
        assert sglang_backend.widen_block_table(t) is t


def test_metadata_fits_sglangs_cuda_graph_buffer_for_deepseek_head_counts():
    """SGLang preallocates [SM count, 8]; ours never needs more rows, for any TP head count and MTP depth."""
    seqlens = torch.tensor([1, 1000], dtype=torch.int32)
    for heads in (1, 8, 16, 32, 64, 128):
        for s_q in (1, 2, 3, 4):
            meta, num_splits = sglang_backend.get_mla_metadata(seqlens, s_q * heads, 1)
            assert 1 <= meta.shape[0] <= 132 and meta.shape[1] == 8 and num_splits.shape == (3,)
            assert meta.shape[0] == max(132 // math.ceil(s_q * heads / 64), 1)
