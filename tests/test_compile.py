"""torch.compile(fullgraph=True) of a small two-layer decode step on CPU, static and dynamic shapes."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from _helpers import D_QK, D_V, make_inputs

import flashmla_ops
from flashmla_ops import flash_mla_with_kvcache, get_mla_metadata

D_MODEL = 64
S_Q = 2
H_Q = 16
H_KV = 1


class TwoLayerDecode(torch.nn.Module):
    """q projection -> scheduler once -> MLA decode per layer (each layer its own cache) -> output proj."""

    def __init__(self, use_out_variant: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.q_proj = torch.nn.ModuleList([torch.nn.Linear(D_MODEL, H_Q * D_QK) for _ in range(2)])
        self.o_proj = torch.nn.Linear(H_Q * D_V, D_MODEL)
        for p in self.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        self.use_out_variant = use_out_variant

    def forward(self, x, k_caches, block_table, cache_seqlens):
        b = x.shape[0]
        meta, num_splits = get_mla_metadata(cache_seqlens, S_Q * H_Q // H_KV, H_KV)
        h = x
        for layer, k_cache in enumerate(k_caches):
            # fp32 around the attention, bf16 into it: keeps compiled and eager numerics comparable
            q = self.q_proj[layer](h).view(b, S_Q, H_Q, D_QK).to(torch.bfloat16)
            if self.use_out_variant:
                out = q.new_empty(b, S_Q, H_Q, D_V)
                lse = q.new_empty(b, H_Q, S_Q, dtype=torch.float32)
                o, lse = flash_mla_with_kvcache(
                    q,
                    k_cache,
                    block_table,
                    cache_seqlens,
                    D_V,
                    meta,
                    num_splits,
                    None,
                    True,
                    out=out,
                    lse=lse,
                )
            else:
                o, lse = flash_mla_with_kvcache(
                    q, k_cache, block_table, cache_seqlens, D_V, meta, num_splits, causal=True
                )
            # lse is +inf for empty rows: clamp before mixing it in
            lse_term = 0.01 * lse.clamp(max=50.0).mean(dim=(1, 2))[:, None, None]
            h = h + self.o_proj(o.reshape(b, S_Q, H_Q * D_V).float()) + lse_term
        return h, meta, num_splits


def _inputs(seqlens: list[int], seed: int):
    inp0 = make_inputs(seqlens, S_Q, H_Q, H_KV, torch.bfloat16, seed=seed, poison=False)
    inp1 = make_inputs(seqlens, S_Q, H_Q, H_KV, torch.bfloat16, seed=seed + 1, poison=False)
    # both layers share the block table (same page ids), each has its own cache
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(seqlens), S_Q, D_MODEL, generator=gen)
    return x, (inp0.k_cache, inp1.k_cache), inp0.block_table, inp0.cache_seqlens


@pytest.mark.parametrize("use_out_variant", [False, True], ids=["functional", "out"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_two_layer_decode(dynamic, use_out_variant):
    torch._dynamo.reset()
    model = TwoLayerDecode(use_out_variant).eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    # static: new values, same shapes (5 pages, 5 block-table columns); dynamic: a new batch size too
    batches = [[70, 0, 129], [5, 64, 1, 300, 17]] if dynamic else [[70, 0, 129], [120, 0, 140]]
    with torch.no_grad():
        for seed, seqlens in enumerate(batches):
            args = _inputs(seqlens, seed)
            want = model(*args)
            # the first call compiles; later ones (new values, a new batch size if dynamic) must reuse it
            with torch._dynamo.config.patch(error_on_recompile=seed > 0):
                got = compiled(*args)
            assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])  # scheduler: exact
            assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
            # Inductor may fuse the fp32 projections differently: allow float rounding noise
            torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-3)


def test_compile_out_variant_mutation_is_visible():
    """Compiled call of the out-variant writes the caller's buffers."""
    torch._dynamo.reset()
    inp = make_inputs([70, 0, 3], S_Q, H_Q, H_KV)

    def step(q, k_cache, block_table, cache_seqlens, out, lse):
        meta, num_splits = get_mla_metadata(cache_seqlens, S_Q * H_Q // H_KV, H_KV)
        flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, D_V, meta, num_splits, causal=True, out=out, lse=lse
        )
        return out.float().sum()

    out = torch.zeros(3, S_Q, H_Q, D_V, dtype=torch.bfloat16)
    lse = torch.zeros(3, H_Q, S_Q)
    total = torch.compile(step, fullgraph=True, backend="aot_eager")(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, out, lse
    )
    meta, num_splits = get_mla_metadata(inp.cache_seqlens, S_Q * H_Q // H_KV, H_KV)
    want_out, want_lse = flash_mla_with_kvcache(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, D_V, meta, num_splits, causal=True
    )
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    assert torch.equal(total, want_out.float().sum())
    assert flashmla_ops.cuda_extension_available() in (True, False)


def test_compile_sizes_taken_from_tensors():
    """Head counts read from q / k_cache shapes (symbolic under dynamic=True): the batch stays dynamic."""
    torch._dynamo.reset()

    def step(q, k_cache, block_table, cache_seqlens):
        _, s_q, h_q, _ = q.shape
        h_kv = k_cache.shape[2]
        meta, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
        return flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, D_V, meta, num_splits, causal=True
        )

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for i, seqlens in enumerate(([70, 0, 129], [5, 64, 1, 300], [9] * 7)):
        inp = make_inputs(seqlens, S_Q, H_Q, 2, seed=i)
        args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(*args)
        want = step(*args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
