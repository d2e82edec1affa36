"""The SGLang integration (``integration/sglang_plugin.py``, ``sglang_backend.py``) without SGLang installed.

The entry point in the installed package's metadata, the factory's documented configuration errors (small
fake ``ModelRunner`` objects), the kernel adapters on CPU, the re-binding machinery on a small
``FlashMLABackend``-shaped class, ``register()`` with SGLang missing, the block-table widening and the
metadata's fit in SGLang's CUDA-graph buffer; deterministic inference: the bound, the batch-invariant
metadata the backend asks for (and the default it keeps otherwise), the CUDA-graph buffer it sizes, the
registration steps and the radix-cache hooks on stand-ins for SGLang. They run everywhere. The tests against
the real ``sglang`` package are in ``test_sglang_real.py``.
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


@pytest.mark.parametrize("s_q", [1, 2])
def test_adapter_compiles_an_fp8_decode_without_graph_breaks(s_q):
    """``--enable-torch-compile`` with ``--kv-cache-dtype fp8_e4m3``, decode (s_q = 1) and MTP verify
    (s_q = 2): the opaque op carries the cache's k_scale tensor to the FP8 decode, in the compiled region as
    in eager (its fake must pass it as ``k_scale``, not as a positional ``is_fp8_kvcache``), and still widens
    the narrow capture-time view of the block table."""
    inputs = make_fp8_inputs([3, 64, 130, 200], s_q, 16, seed=6 + s_q)
    buf = torch.zeros(6, 40, dtype=torch.int32)  # SGLang's cuda_graph_kv_indices: [max_bs, max_pages]
    buf[:4, : inputs.block_table.shape[1]] = inputs.block_table
    meta, num_splits = sglang_backend.get_mla_metadata(inputs.cache_seqlens, s_q * 16, 1, is_fp8_kvcache=True)
    ref_out, ref_lse = _fp8_reference(inputs, meta, num_splits, 0.125, inputs.k_scale)

    def step(buf, q, k_cache, seqlens, meta, num_splits, k_scale):
        table = buf[: q.shape[0], :1]  # the view a captured graph bakes in
        return sglang_backend.flash_mla_with_kvcache(
            q, k_cache, table, seqlens, 512, meta, num_splits, 0.125, True, descale_k=k_scale
        )

    args = (buf, inputs.q, inputs.k_cache, inputs.cache_seqlens, meta, num_splits, inputs.k_scale)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    out, lse = torch.compile(step, fullgraph=True)(*args)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


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
    failing = (
        "argparse_choices",
        "chunked_prefix_cache",
        "attention_backend_factory",
        "page_size_hook",
        "deterministic_choices",
        "deterministic_mla_models",
        "deterministic_radix_cache",
    )
    assert set(status) == {*failing, "deepseek_handler"}
    for step in failing:
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


# ==== 2. Deterministic inference (--enable-deterministic-inference): the batch-invariant schedule =========
def _deterministic_runner(enabled: bool = True, context_len: int = 4096, draft: int | None = None, **kw):
    """A fake ModelRunner as the factory sees it under ``--enable-deterministic-inference`` (or not)."""
    return _runner(
        server_args=types.SimpleNamespace(
            enable_deterministic_inference=enabled, speculative_num_draft_tokens=draft
        ),
        model_config=types.SimpleNamespace(kv_lora_rank=512, qk_rope_head_dim=64, context_len=context_len),
        **kw,
    )


def test_batch_invariant_bound_follows_deterministic_inference():
    assert not sglang_backend.deterministic_inference_enabled(_runner())
    assert sglang_backend.batch_invariant_max_seqlen_k(_runner()) is None  # no server_args: SGLang's default
    assert sglang_backend.batch_invariant_max_seqlen_k(_deterministic_runner(enabled=False)) is None
    assert sglang_backend.deterministic_inference_enabled(_deterministic_runner())
    assert sglang_backend.batch_invariant_max_seqlen_k(_deterministic_runner()) == 4096
    # a verify / draft-extend step appends its draft tokens to the longest cache
    assert sglang_backend.batch_invariant_max_seqlen_k(_deterministic_runner(draft=4)) == 4100
    no_context = _deterministic_runner()
    no_context.model_config.context_len = None
    with pytest.raises(FlashMLAOpsSGLangError, match="context_len is None"):
        sglang_backend.batch_invariant_max_seqlen_k(no_context)


def test_deterministic_inference_is_also_read_from_sglangs_runtime_context(monkeypatch):
    """SGLang 0.5.23's backends read the flag (and the draft-token count) from the published runtime
    context, which also carries a flag implied by another setting; it is consulted only where SGLang has
    imported it, and an unpublished context counts as off."""
    context = types.ModuleType("sglang.srt.runtime_context")
    context.get_exec = lambda: types.SimpleNamespace(
        deterministic=types.SimpleNamespace(enable_deterministic_inference=True)
    )
    context.get_spec = lambda: types.SimpleNamespace(speculative_num_draft_tokens=3)
    monkeypatch.setitem(sys.modules, "sglang.srt.runtime_context", context)
    runner = _deterministic_runner(enabled=False)
    assert sglang_backend.deterministic_inference_enabled(runner)
    assert sglang_backend.batch_invariant_max_seqlen_k(runner) == 4096 + 3

    def unpublished():
        raise ValueError("config namespace 'exec' not published")

    context.get_exec = context.get_spec = unpublished
    assert not sglang_backend.deterministic_inference_enabled(runner)
    assert sglang_backend.batch_invariant_max_seqlen_k(_deterministic_runner(draft=2)) == 4096 + 2


@pytest.mark.parametrize("enabled,expected", [(False, None), (True, 163_840)])
def test_factory_builds_the_backend_for_the_schedule(monkeypatch, enabled, expected):
    built = []

    def get_backend_class(max_seqlen_k=None):
        built.append(max_seqlen_k)
        return lambda runner: ("backend", runner)

    monkeypatch.setattr(sglang_backend, "get_backend_class", get_backend_class)
    monkeypatch.setattr(sglang_plugin, "_register_deepseek_handler", lambda import_module: "registered")
    runner = _deterministic_runner(enabled=enabled, context_len=163_840)
    assert sglang_plugin.create_backend(runner) == ("backend", runner)
    assert built == [expected]


def _spy_get_mla_metadata(monkeypatch) -> list[dict]:
    """Record the keyword arguments of every flashmla_ops.get_mla_metadata call (then run it)."""
    calls: list[dict] = []
    real = flashmla_ops.get_mla_metadata

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(flashmla_ops, "get_mla_metadata", spy)
    return calls


def _batch(inputs, rows: list[int]) -> types.SimpleNamespace:
    """The requests ``rows`` of ``inputs`` as a batch of their own (same cache)."""
    return types.SimpleNamespace(
        q=inputs.q[rows],
        k_cache=inputs.k_cache,
        block_table=inputs.block_table[rows],
        cache_seqlens=inputs.cache_seqlens[rows],
    )


def test_deterministic_backend_plans_batch_invariant_decodes(monkeypatch):
    """Under deterministic inference the copied methods' get_mla_metadata asks flashmla_ops for the
    batch-invariant schedule with the static bound; the default backend keeps the default schedule. A
    request then decodes bitwise the same alone and inside a batch, through the backend's own code."""
    module = _fake_backend_module(monkeypatch, "fake_sglang_flashmla_backend", _FAKE_BACKEND_SOURCE)
    calls = _spy_get_mla_metadata(monkeypatch)
    inputs = make_inputs([3000, 5, 700, 64, 129], h_q=16, seed=11)

    default = sglang_backend.build_backend_class(module.FlashMLABackend)(_runner())
    assert default.batch_invariant_max_seqlen_k is None
    default.init_forward_metadata(inputs.cache_seqlens, 16)
    assert calls[-1] == {"batch_invariant": False, "max_seqlen_k": None}
    ref_default = flashmla_ops.get_mla_metadata(inputs.cache_seqlens, 16, 1)
    assert all(torch.equal(a, b) for a, b in zip(default.meta, ref_default, strict=True))

    cls = sglang_backend.build_backend_class(module.FlashMLABackend, max_seqlen_k=4096)
    assert cls.batch_invariant_max_seqlen_k == 4096 and cls.rebound_methods == default.rebound_methods
    backend = cls(_deterministic_runner())
    backend.init_forward_metadata(inputs.cache_seqlens, 16)
    assert calls[-1] == {"batch_invariant": True, "max_seqlen_k": 4096}
    ref = flashmla_ops.get_mla_metadata(inputs.cache_seqlens, 16, 1, batch_invariant=True, max_seqlen_k=4096)
    assert all(torch.equal(a, b) for a, b in zip(backend.meta, ref, strict=True))

    outs = {}
    for name, rows in (("alone", [0]), ("batch", [1, 2, 0, 3, 4]), ("other batch", [4, 0])):
        batch = _batch(inputs, rows)
        backend.init_forward_metadata(batch.cache_seqlens, 16)
        out, lse = backend.forward_decode(batch, 0.1)
        outs[name] = (out[rows.index(0)], lse[rows.index(0)])
    for name in ("batch", "other batch"):
        assert torch.equal(outs[name][0], outs["alone"][0]) and torch.equal(outs[name][1], outs["alone"][1])


def test_batch_invariant_adapter_validates_its_bound():
    adapter = sglang_backend.batch_invariant_get_mla_metadata(8192)
    assert adapter.max_seqlen_k == 8192
    for bad in (0, -1, 4096.0, None, True):
        with pytest.raises(ValueError, match="positive int"):
            sglang_backend.batch_invariant_get_mla_metadata(bad)


# A FlashMLABackend-shaped class with SGLang's CUDA-graph metadata contract (as read from 0.5.17 and 0.5.23;
# written here): init_cuda_graph_state preallocates [SM count, 8]; the capture / replay refresh asserts that
# the step's metadata fits, warns when its row count differs from the previous step's, and copies it into
# the prefix.
_FAKE_GRAPH_BACKEND_SOURCE = """
import logging
import torch

logger = logging.getLogger("fake_sglang_flashmla_backend_graph")

def get_mla_metadata(*args, **kwargs):
    raise AssertionError("builtin get_mla_metadata called")

def flash_mla_with_kvcache(*args, **kwargs):
    raise AssertionError("builtin flash_mla_with_kvcache called")

class FlashMLABackend:
    def __init__(self, runner, heads=16, draft=None, pool=64, context_len=4096):
        self.num_q_heads = heads
        self.num_draft_tokens = draft
        self.max_context_len = context_len
        self.req_to_token = torch.zeros(pool, 1, dtype=torch.int32)
        self.cuda_graph_mla_metadata = None
        self.cuda_graph_mla_metadata_view = None

    def init_cuda_graph_state(self, max_bs, max_num_tokens, block_kv_indices=None):
        self.cuda_graph_mla_metadata = torch.empty(132, 8, dtype=torch.int32)  # an H100's SM count
        self.cuda_graph_num_splits = torch.empty(max_bs + 1, dtype=torch.int32)
        self.cuda_graph_mla_metadata_view = None

    def _apply_decode_target_verify_metadata(self, bs, seq_lens):
        meta, splits = get_mla_metadata(seq_lens[:bs].to(torch.int32), self.num_q_heads, 1)
        rows = meta.shape[0]
        assert rows <= self.cuda_graph_mla_metadata.shape[0], "exceeds preallocated max"
        view = self.cuda_graph_mla_metadata_view
        if view is None or view.shape[0] != rows:
            if view is not None:
                logger.warning("num_sm_parts mismatch in CUDA Graph replay")
            self.cuda_graph_mla_metadata_view = self.cuda_graph_mla_metadata[:rows]
        self.cuda_graph_mla_metadata[:rows].copy_(meta)
        self.cuda_graph_num_splits[: bs + 1].copy_(splits)
        self.meta = (self.cuda_graph_mla_metadata_view, self.cuda_graph_num_splits[: bs + 1])

    def forward_decode(self, *args):
        return flash_mla_with_kvcache(*args)
"""


def test_deterministic_backend_sizes_sglangs_cuda_graph_metadata_buffer(monkeypatch, caplog):
    """With a context longer than 8,192 tokens the batch-invariant metadata has more rows than SMs, more
    for larger batches: the buffer is regrown for max_bs, and a batch-size change between replays is not
    reported as a capture / replay mismatch. Each step's metadata is flashmla_ops' own."""
    module = _fake_backend_module(
        monkeypatch, "fake_sglang_flashmla_backend_graph", _FAKE_GRAPH_BACKEND_SOURCE
    )
    bound, max_bs = 163_840, 16
    cls = sglang_backend.build_backend_class(module.FlashMLABackend, max_seqlen_k=bound)
    backend = cls(_deterministic_runner(context_len=bound))
    backend.init_cuda_graph_state(max_bs, max_bs)
    rows = {
        bs: flashmla_ops.ops.metadata_parts(torch.device("cpu"), bs, 16, 1, bound)[0] for bs in (1, 5, max_bs)
    }
    assert rows[max_bs] > 132 and rows[5] != rows[max_bs]  # beyond SGLang's [SM count, 8] buffer
    assert backend.cuda_graph_mla_metadata.shape == (rows[max_bs], 8)
    seq_lens = torch.tensor([1, 20_000, 163_840, 7] + [300] * (max_bs - 4))
    with caplog.at_level(logging.WARNING, logger="fake_sglang_flashmla_backend_graph"):
        for bs in (max_bs, 5, 1, max_bs, 5):
            backend._apply_decode_target_verify_metadata(bs, seq_lens)
            meta, splits = backend.meta
            ref = flashmla_ops.get_mla_metadata(
                seq_lens[:bs].int(), 16, 1, batch_invariant=True, max_seqlen_k=bound
            )
            assert meta.shape[0] == rows[bs] and meta.data_ptr() == backend.cuda_graph_mla_metadata.data_ptr()
            assert torch.equal(meta, ref[0]) and torch.equal(splits, ref[1])
    assert not [r for r in caplog.records if "mismatch" in r.getMessage()]

    # the default schedule keeps SGLang's buffer (and a constant row count)
    default = sglang_backend.build_backend_class(module.FlashMLABackend)(_runner())
    default.init_cuda_graph_state(max_bs, max_bs)
    assert default.cuda_graph_mla_metadata.shape == (132, 8)
    assert "init_cuda_graph_state" not in vars(type(default))


def test_deterministic_backend_rejects_a_request_pool_beyond_the_schedule(monkeypatch):
    """flashmla_ops plans at most 65,535 parts: at a 163,840-token bound with 16 heads (128 chunks a
    request) a batch of 1,024 requests is one too many. The backend says so when it is created."""
    module = _fake_backend_module(
        monkeypatch, "fake_sglang_flashmla_backend_graph", _FAKE_GRAPH_BACKEND_SOURCE
    )
    cls = sglang_backend.build_backend_class(module.FlashMLABackend, max_seqlen_k=163_840)
    cls(_deterministic_runner(context_len=163_840), pool=1023)
    with pytest.raises(FlashMLAOpsSGLangError, match="lower --max-running-requests or --context-length"):
        cls(_deterministic_runner(context_len=163_840), pool=1024)
    # SGLang's own context length (plus draft tokens) beyond the bound the class was built for
    with pytest.raises(FlashMLAOpsSGLangError, match="serves up to 163844"):
        cls(_deterministic_runner(context_len=163_840), draft=4, context_len=163_840)


def _fake_sglang(monkeypatch, modules: dict[str, types.ModuleType | None]) -> None:
    """SGLang as ``modules`` (name -> module, None: not importable), every other sglang module missing."""
    for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")] + ["sglang"]:
        monkeypatch.setitem(sys.modules, name, None)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_deterministic_registration_degrades_step_by_step(monkeypatch):
    """A SGLang whose server_args offers only the deterministic-backend list (no DeepSeek list, no hook
    point for the radix cache): the first step registers, the others fail with what is missing."""
    server_args = types.ModuleType("sglang.srt.server_args")
    server_args.DETERMINISTIC_ATTENTION_BACKEND_CHOICES = ["fa3"]
    server_args.add_deterministic_attention_backend_choices = (
        server_args.DETERMINISTIC_ATTENTION_BACKEND_CHOICES.extend
    )
    _fake_sglang(monkeypatch, {"sglang.srt.server_args": server_args})
    status = sglang_plugin.register()
    assert status["deterministic_choices"] == "registered"
    assert server_args.DETERMINISTIC_ATTENTION_BACKEND_CHOICES == ["fa3", BACKEND_NAME]
    assert sglang_plugin.register()["deterministic_choices"] == "already registered"
    assert status["deterministic_radix_cache"].startswith("failed: RuntimeError")
    assert "--disable-radix-cache" in status["deterministic_radix_cache"]
    # without the radix-cache step the DeepSeek list is left alone (SGLang then refuses the combination)
    assert status["deterministic_mla_models"].startswith("failed: RuntimeError: not registered because")
    assert list(status).index("deterministic_radix_cache") < list(status).index("deterministic_mla_models")


def test_deepseek_list_needs_only_its_own_hook_when_the_radix_step_works(monkeypatch):
    """The DeepSeek list's own failure message, when the radix-cache step did not fail."""
    status = {"deterministic_radix_cache": "registered"}
    server_args = types.ModuleType("sglang.srt.server_args")
    _fake_sglang(monkeypatch, {"sglang.srt.server_args": server_args})
    with pytest.raises(RuntimeError, match="add_radix_supported_deterministic_attention_backend_choices"):
        sglang_plugin._register_deterministic_mla_models(status)


@pytest.mark.parametrize(
    "fields,disable",
    [
        ({"enable_deterministic_inference": True, "attention_backend": BACKEND_NAME}, True),
        ({"enable_deterministic_inference": True, "prefill_attention_backend": BACKEND_NAME}, True),
        # flashmla_ops only decoding: the prefill that fills the cache is another backend's
        (
            {
                "enable_deterministic_inference": True,
                "attention_backend": BACKEND_NAME,
                "prefill_attention_backend": "triton",
            },
            False,
        ),
        (
            {
                "enable_deterministic_inference": True,
                "attention_backend": BACKEND_NAME,
                "disable_radix_cache": True,
            },
            False,
        ),
        ({"enable_deterministic_inference": False, "attention_backend": BACKEND_NAME}, False),
        ({"enable_deterministic_inference": True, "attention_backend": "fa3"}, False),
    ],
)
def test_radix_cache_hooks_turn_the_cache_off_where_a_hit_would_change_results(monkeypatch, fields, disable):
    view = {
        "enable_deterministic_inference": False,
        "disable_radix_cache": False,
        "attention_backend": None,
        "prefill_attention_backend": None,
    } | fields
    declared = []
    overrides = types.ModuleType("sglang.srt.arg_groups.overrides")
    overrides.resolved_view = lambda server_args: types.SimpleNamespace(**vars(server_args))
    overrides.declare_resolution = lambda server_args, source, **kw: declared.append((source, kw))
    _fake_sglang(monkeypatch, {"sglang.srt.arg_groups.overrides": overrides})

    # SGLang 0.5.23: a wrapper of the handle_deterministic_inference resolution step
    server_args, steps = types.SimpleNamespace(**view), []
    sglang_plugin._deterministic_radix_cache_step(server_args, steps.append)
    assert steps == [server_args]  # SGLang's own step ran first
    assert declared == (
        [(f"{BACKEND_NAME}:handle_deterministic_inference", {"disable_radix_cache": True})] if disable else []
    )
    # SGLang 0.5.17: an AFTER hook of ServerArgs._handle_deterministic_inference, which sets the field itself
    server_args = types.SimpleNamespace(**view)
    assert sglang_plugin._deterministic_radix_cache_hook(None, server_args) is None
    assert server_args.disable_radix_cache is (disable or view["disable_radix_cache"])
