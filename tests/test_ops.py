"""The public API (flashmla_ops.ops) and the package surface (flashmla_ops/__init__.py)."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import types

import pytest
import torch
from _helpers import D_V, make_inputs

import flashmla_ops
from flashmla_ops import _schema, flash_mla_with_kvcache, get_mla_metadata, ops
from flashmla_ops._validation import FlashMLAInputError

NOT_SUPPORTED = "flashmla: sparse (top-k) decode is not supported yet"


# ---- get_mla_metadata ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tokens,h_kv,parts",
    [
        (1, 1, 132),  # s_q = 1, h_q = 1
        (64, 1, 132),  # one 64-row tile per kv head
        (65, 1, 66),
        (128, 1, 66),  # s_q = 1, h_q = 128 or s_q = 2, h_q = 64
        (256, 1, 33),
        (32, 2, 66),
        (128, 2, 33),
        (48, 3, 44),
        (1000, 8, 1),  # 132 // 8 // 16 = 1
        (64, 200, 1),  # 132 // 200 = 0 -> at least one part
    ],
)
def test_get_mla_metadata_num_sm_parts_on_cpu(tokens, h_kv, parts):
    sl = torch.tensor([0, 100, 5000], dtype=torch.int32)
    meta, num_splits = get_mla_metadata(sl, tokens, h_kv)
    assert meta.shape == (parts, 8) and num_splits.shape == (4,)
    want = torch.ops.flashmla.get_mla_metadata(sl, tokens, h_kv, parts)
    assert torch.equal(meta, want[0]) and torch.equal(num_splits, want[1])


def test_get_mla_metadata_flashmla_signature():
    sl = torch.tensor([10, 20], dtype=torch.int32)
    a = get_mla_metadata(sl, 16, 1)
    b = get_mla_metadata(cache_seqlens=sl, num_q_tokens_per_head_k=16, num_heads_k=1, num_heads_q=16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kwargs", [{"topk": 2048}, {"topk": 2048, "is_fp8_kvcache": True}])
def test_get_mla_metadata_not_supported(kwargs):
    sl = torch.tensor([10], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match=re.escape(NOT_SUPPORTED)):
        get_mla_metadata(sl, 16, 1, **kwargs)


def test_get_mla_metadata_fp8_uses_the_same_scheduler():
    sl = torch.tensor([10, 300, 0], dtype=torch.int32)
    dense = get_mla_metadata(sl, 32, 1)
    fp8 = get_mla_metadata(sl, 32, 1, num_heads_q=32, is_fp8_kvcache=True)
    assert torch.equal(dense[0], fp8[0]) and torch.equal(dense[1], fp8[1])


def test_sm_count_for_cuda_devices_is_queried_once_per_device(monkeypatch):
    """No GPU here: fake the device-properties query and check the per-device cache."""
    calls = []

    def fake_props(index):
        calls.append(index)
        return types.SimpleNamespace(multi_processor_count=78 + index)

    monkeypatch.setattr(torch.cuda, "get_device_properties", fake_props)
    ops._cuda_sm_count.cache_clear()
    try:
        assert ops._sm_count(torch.device("cuda", 0)) == 78
        assert ops._sm_count(torch.device("cuda", 1)) == 79
        assert ops._sm_count(torch.device("cuda", 0)) == 78
        assert calls == [0, 1]
        assert ops._sm_count(torch.device("cpu")) == 132
        assert ops._sm_count(torch.device("meta")) == 132
    finally:
        ops._cuda_sm_count.cache_clear()


# ---- flash_mla_with_kvcache ---------------------------------------------------------------------------
def _decode_inputs(causal_seq: int = 2):
    inp = make_inputs([70, 0, 3], s_q=causal_seq, h_q=16, h_kv=1)
    meta, num_splits = get_mla_metadata(inp.cache_seqlens, causal_seq * 16, 1)
    return inp, meta, num_splits


def test_default_softmax_scale_is_one_over_sqrt_576():
    inp, meta, num_splits = _decode_inputs()
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, D_V, meta, num_splits)
    default = flash_mla_with_kvcache(*args, causal=True)
    explicit = flash_mla_with_kvcache(*args, softmax_scale=576**-0.5, causal=True)
    assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])
    other = flash_mla_with_kvcache(*args, softmax_scale=0.5, causal=True)
    assert not torch.equal(other[1], default[1])


def test_matches_op_call():
    inp, meta, num_splits = _decode_inputs()
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, D_V, meta, num_splits)
    got = flash_mla_with_kvcache(*args, 0.1, True)
    want = torch.ops.flashmla.mla_decode(*args, 0.1, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_out_variant_writes_and_returns_the_given_buffers():
    inp, meta, num_splits = _decode_inputs()
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, D_V, meta, num_splits)
    want = flash_mla_with_kvcache(*args, causal=True)
    out = torch.full_like(want[0], 7.0)
    lse = torch.full_like(want[1], 7.0)
    got = flash_mla_with_kvcache(*args, causal=True, out=out, lse=lse)
    assert got[0] is out and got[1] is lse
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])


@pytest.mark.parametrize("given", ["out", "lse"])
def test_out_and_lse_must_be_given_together(given):
    inp, meta, num_splits = _decode_inputs()
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, D_V, meta, num_splits)
    buffers = {"out": torch.empty(3, 2, 16, D_V, dtype=torch.bfloat16), "lse": torch.empty(3, 16, 2)}
    with pytest.raises(FlashMLAInputError, match="out and lse must be given together"):
        flash_mla_with_kvcache(*args, **{given: buffers[given]})


@pytest.mark.parametrize("fp8", [False, True], ids=["dense", "fp8"])
def test_decode_not_supported(fp8):
    inp, meta, num_splits = _decode_inputs()
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, D_V, meta, num_splits)
    indices = torch.zeros(3, 2, 64, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match=re.escape(NOT_SUPPORTED)):
        flash_mla_with_kvcache(*args, is_fp8_kvcache=fp8, indices=indices)


def test_docstrings_describe_shapes():
    for fn in (get_mla_metadata, flash_mla_with_kvcache):
        assert "Returns:" in fn.__doc__ and "int32" in fn.__doc__ and "Raises:" in fn.__doc__
    assert "Not supported" in flash_mla_with_kvcache.__doc__
    assert "[batch_size, seq_len_q, num_heads_q, 576]" in flash_mla_with_kvcache.__doc__
    assert "[num_blocks, 64, num_heads_k, 576]" in flash_mla_with_kvcache.__doc__
    assert "num_sm_parts" in get_mla_metadata.__doc__


# ---- package surface ----------------------------------------------------------------------------------
def test_package_exports():
    for name in ("get_mla_metadata", "flash_mla_with_kvcache", "cuda_extension_available", "__version__"):
        assert name in flashmla_ops.__all__ and hasattr(flashmla_ops, name)
    assert flashmla_ops.__version__ == importlib.metadata.version("flashmla_ops")
    assert isinstance(flashmla_ops.cuda_extension_available(), bool)


def test_cuda_kernels_without_extension():
    """Without _C, each op's CUDA kernel raises NotImplementedError explaining why and how to rebuild."""
    if flashmla_ops.cuda_extension_available():
        assert flashmla_ops._C_IMPORT_ERROR is None
        return
    assert "flashmla_ops._C" in flashmla_ops._C_IMPORT_ERROR
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    inp = make_inputs([5], s_q=1, h_q=16)
    meta, num_splits = get_mla_metadata(inp.cache_seqlens, 16, 1)
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, D_V, meta, num_splits, 0.1, False)
    out, lse = torch.empty(1, 1, 16, D_V, dtype=torch.bfloat16), torch.empty(1, 16, 1)
    calls = {
        "get_mla_metadata": (inp.cache_seqlens, 16, 1, 4),
        "get_mla_metadata_batch_invariant": (inp.cache_seqlens, 16, 1, 4, 4),
        "mla_decode": args,
        "mla_decode_out": (*args, out, lse),
    }
    # the FP8 ops' CUDA stubs say something else (tests/test_fp8.py)
    assert set(calls) == set(_schema.SCHEMAS) - set(_schema.FP8_OPS)
    for name, call_args in calls.items():
        with pytest.raises(NotImplementedError) as info:
            getattr(torch.ops.flashmla, name).default.redispatch(cuda, *call_args)
        msg = str(info.value)
        assert msg.startswith(f"flashmla: torch.ops.flashmla.{name} was called on CUDA tensors")
        assert "built without its CUDA extension" in msg
        assert flashmla_ops._C_IMPORT_ERROR in msg
        assert "FLASHMLA_ENABLE_CUDA=ON pip install --no-build-isolation ." in msg
        assert "pip install --no-deps nvidia-cutlass==4.2.0.0" in msg


def test_import_does_not_touch_the_gpu(tmp_path):
    code = """
import torch

def boom(*args, **kwargs):
    raise AssertionError("GPU queried at import time")

for name in ("is_available", "device_count", "get_device_properties", "current_device", "init",
             "get_device_capability", "_lazy_init"):
    setattr(torch.cuda, name, boom)
import flashmla_ops
print("ok", flashmla_ops.cuda_extension_available())
"""
    # run outside the repository so the installed package is imported, not the source folder
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok ")
