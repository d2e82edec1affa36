"""Fake kernels (flashmla_ops.meta): FakeTensorMode and meta-device shapes/dtypes, and opcheck on every op."""

from __future__ import annotations

import pytest
import torch
from _helpers import D_V, make_inputs, schedule_args
from torch._subclasses.fake_tensor import FakeTensorMode

import flashmla_ops

SCALE = 576**-0.5


def _to(inp, device):
    return [t.to(device) for t in (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens)]


@pytest.mark.parametrize("b,num_parts", [(1, 1), (3, 8), (5, 132)])
def test_get_mla_metadata_fake_and_meta(b, num_parts):
    for mode in ("fake", "meta"):
        if mode == "fake":
            with FakeTensorMode():
                sl = torch.zeros(b, dtype=torch.int32)
                meta, num_splits = torch.ops.flashmla.get_mla_metadata(sl, 32, 1, num_parts)
        else:
            sl = torch.zeros(b, dtype=torch.int32, device="meta")
            meta, num_splits = torch.ops.flashmla.get_mla_metadata(sl, 32, 1, num_parts)
            assert meta.device.type == "meta" and num_splits.device.type == "meta"
        assert meta.shape == (num_parts, 8) and meta.dtype == torch.int32
        assert num_splits.shape == (b + 1,) and num_splits.dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,s_q,h_q,h_kv", [(1, 1, 1, 1), (3, 2, 16, 2), (2, 4, 128, 1)])
def test_mla_decode_fake(b, s_q, h_q, h_kv, dtype):
    inp = make_inputs([65] * b, s_q, h_q, h_kv, dtype)
    meta, num_splits = schedule_args(inp)
    with FakeTensorMode() as mode:
        q, k, bt, sl = (mode.from_tensor(t) for t in _to(inp, "cpu"))
        fmeta, fsplits = mode.from_tensor(meta), mode.from_tensor(num_splits)
        out, lse = torch.ops.flashmla.mla_decode(q, k, bt, sl, D_V, fmeta, fsplits, SCALE, True)
        assert out.shape == (b, s_q, h_q, D_V) and out.dtype == dtype and out.is_contiguous()
        assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32 and lse.is_contiguous()
        fo, fl = torch.empty_like(out), torch.empty_like(lse)
        assert (
            torch.ops.flashmla.mla_decode_out(q, k, bt, sl, D_V, fmeta, fsplits, SCALE, False, fo, fl) is None
        )
        # the fake derives the scheduler outputs too
        fm2, fs2 = torch.ops.flashmla.get_mla_metadata(sl, s_q * h_q // h_kv, h_kv, 4)
        assert fm2.shape == (4, 8) and fs2.shape == (b + 1,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mla_decode_meta_device(dtype):
    b, s_q, h_q, h_kv = 2, 2, 16, 2
    dev = "meta"
    q = torch.empty(b, s_q, h_q, 576, dtype=dtype, device=dev)
    k = torch.empty(10, 64, h_kv, 576, dtype=dtype, device=dev)
    bt = torch.empty(b, 4, dtype=torch.int32, device=dev)
    sl = torch.empty(b, dtype=torch.int32, device=dev)
    meta, num_splits = torch.ops.flashmla.get_mla_metadata(sl, s_q * h_q // h_kv, h_kv, 7)
    out, lse = torch.ops.flashmla.mla_decode(q, k, bt, sl, D_V, meta, num_splits, SCALE, True)
    assert out.device.type == "meta" and out.shape == (b, s_q, h_q, D_V) and out.dtype == dtype
    assert lse.device.type == "meta" and lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    out2 = torch.empty_like(out)
    lse2 = torch.empty_like(lse)
    assert (
        torch.ops.flashmla.mla_decode_out(q, k, bt, sl, D_V, meta, num_splits, SCALE, True, out2, lse2)
        is None
    )


# ---- opcheck: schema, autograd registration, fake vs real kernel, AOT dispatch (static and dynamic) -----
SAMPLES = [
    # (seqlens, s_q, h_q, h_kv, dtype, causal, num_parts)
    ([0, 70, 129], 1, 16, 1, torch.bfloat16, False, 4),
    ([3, 64, 0], 2, 16, 2, torch.float16, True, 8),
    ([200], 4, 3, 1, torch.bfloat16, True, 1),
    ([0, 0], 1, 64, 1, torch.float16, False, 132),
    ([1, 130, 65, 2], 2, 128, 2, torch.bfloat16, True, 5),
]
SAMPLE_IDS = [f"b{len(s[0])}-sq{s[1]}-hq{s[2]}-hkv{s[3]}-{'causal' if s[5] else 'full'}" for s in SAMPLES]


@pytest.mark.parametrize("seqlens,s_q,h_q,h_kv,dtype,causal,num_parts", SAMPLES, ids=SAMPLE_IDS)
def test_opcheck(seqlens, s_q, h_q, h_kv, dtype, causal, num_parts):
    inp = make_inputs(seqlens, s_q, h_q, h_kv, dtype, seed=len(seqlens))
    torch.library.opcheck(
        torch.ops.flashmla.get_mla_metadata.default, (inp.cache_seqlens, s_q * h_q // h_kv, h_kv, num_parts)
    )
    meta, num_splits = schedule_args(inp, num_parts)
    args = inp.args(meta, num_splits, SCALE, causal)
    torch.library.opcheck(torch.ops.flashmla.mla_decode.default, args)
    b = len(seqlens)
    out = torch.empty(b, s_q, h_q, D_V, dtype=dtype)
    lse = torch.empty(b, h_q, s_q)
    torch.library.opcheck(torch.ops.flashmla.mla_decode_out.default, (*args, out, lse))
    workspace = torch.empty(flashmla_ops.workspace_size(meta, s_q * h_q // h_kv, h_kv))
    torch.library.opcheck(torch.ops.flashmla.mla_decode_out.default, (*args, out, lse, workspace))
