"""Helpers for the GPU tests: Hopper detection, FlashMLA-style inputs, FlashMLA's tolerance check."""

from __future__ import annotations

import math

import pytest
import torch

import flashmla_ops

PAGE = 64
GARBAGE_PAGE_ID = 2147480000


def _hopper_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"needs an sm_90 (Hopper) GPU, found sm_{major}{minor}"
    if not flashmla_ops.cuda_extension_available():
        return "flashmla_ops was built without its CUDA extension"
    return None


HOPPER_SKIP_REASON = _hopper_reason()
requires_hopper = pytest.mark.skipif(HOPPER_SKIP_REASON is not None, reason=str(HOPPER_SKIP_REASON))


def make_seqlens(b: int, s_k: int, varlen: bool, zero_frac: float = 0.0, device="cuda") -> torch.Tensor:
    if varlen:
        s = torch.normal(float(s_k), s_k / 2.0, (b,)).round().clamp(min=1, max=4 * s_k)
    else:
        s = torch.full((b,), float(s_k))
    if zero_frac > 0:
        s[torch.rand(b) < zero_frac] = 0
    return s.to(torch.int32).to(device)


def make_inputs(
    b: int,
    s_q: int,
    h_q: int,
    h_kv: int,
    seqlens: torch.Tensor,
    dtype: torch.dtype,
    extra_pages: int = 3,
    extra_cols: int = 2,
):
    """Random q and paged cache as FlashMLA's tests make them: randn/10 clamped to [-1, 1], randomly permuted
    pages, NaN in every cache slot past a request's end (tail of the last page and unused pages), and the
    block table padded with a garbage page id that must never be dereferenced."""
    dev = seqlens.device
    nblk = (seqlens.long() + PAGE - 1) // PAGE
    max_blocks = int(nblk.max().item()) + extra_cols
    num_pages = int(nblk.sum().item()) + extra_pages
    perm = torch.randperm(num_pages, device=dev).to(torch.int32)
    block_table = torch.full((b, max_blocks), GARBAGE_PAGE_ID, dtype=torch.int32, device=dev)
    col = torch.arange(max_blocks, device=dev)
    used = col[None, :] < nblk[:, None]
    block_table[used] = perm[: int(nblk.sum().item())]
    # valid tokens per physical page
    valid = torch.zeros(num_pages, dtype=torch.long, device=dev)
    tokens = (seqlens.long()[:, None] - col[None, :] * PAGE).clamp(0, PAGE)
    valid[block_table[used].long()] = tokens[used]
    k_cache = (torch.randn(num_pages, PAGE, h_kv, 576, device=dev) / 10).clamp(-1, 1).to(dtype)
    slot_used = torch.arange(PAGE, device=dev)[None, :] < valid[:, None]
    k_cache[~slot_used] = float("nan")
    q = (torch.randn(b, s_q, h_q, 576, device=dev) / 10).clamp(-1, 1).to(dtype)
    return q, k_cache, block_table


def assert_allclose_flashmla(
    x: torch.Tensor, ref: torch.Tensor, abs_tol: float, rel_tol: float, cos_tol=None
):
    """FlashMLA's check: each element within abs_tol or rel_tol * |ref|, cosine difference under cos_tol,
    and identical positions of NaN, +inf and -inf."""
    x = x.float()
    ref = ref.float()
    assert x.shape == ref.shape
    for name, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        mism = fn(x) != fn(ref)
        assert not mism.any(), f"{name} positions differ at {mism.nonzero()[:5].tolist()}"
    fin = torch.isfinite(ref)
    xd, rd = x[fin].double(), ref[fin].double()
    diff = (xd - rd).abs()
    ok = (diff <= abs_tol) | (diff <= rel_tol * rd.abs())
    if not ok.all():
        worst = int(diff.argmax())
        raise AssertionError(
            f"{int((~ok).sum())}/{ok.numel()} elements out of tolerance; "
            f"max abs diff {float(diff.max()):.3e} "
            f"(got {float(xd[worst]):.6f}, ref {float(rd[worst]):.6f})"
        )
    if cos_tol is not None and rd.numel() > 0:
        denom = (xd * xd + rd * rd).sum()
        if denom > 0:
            cos_diff = float(1 - 2 * (xd * rd).sum() / denom)
            assert cos_diff <= cos_tol, f"cosine difference {cos_diff:.3e} > {cos_tol}"


def run_decode(q, k_cache, block_table, seqlens, causal, softmax_scale=None, poison=True):
    """Metadata + decode through the public API into NaN-poisoned outputs (so an unwritten element fails)."""
    b, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    meta, num_splits = flashmla_ops.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
    out = torch.full((b, s_q, h_q, 512), float("nan") if poison else 0.0, dtype=q.dtype, device=q.device)
    lse = torch.full((b, h_q, s_q), float("nan") if poison else 0.0, dtype=torch.float32, device=q.device)
    flashmla_ops.flash_mla_with_kvcache(
        q, k_cache, block_table, seqlens, 512, meta, num_splits, softmax_scale, causal, out=out, lse=lse
    )
    return out, lse, meta, num_splits


def default_scale() -> float:
    return 1.0 / math.sqrt(576)
