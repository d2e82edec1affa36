"""The ops inside compiled and captured decode steps on a Hopper GPU: torch.compile (Inductor, CUDA graph
trees), manual torch.cuda.CUDAGraph capture through the out-variant, and torch.export.

Runs only on a Hopper GPU with the CUDA extension built; skipped (with the reason) elsewhere. The CPU-side
compile tests (fake kernels, CPU reference kernels) are in test_compile.py.

Stream behaviour needs no test of its own here: test_decode_cuda.py::test_side_stream checks eager launches
on a side stream, and the manual-capture tests below capture on torch.cuda.graph's private side stream and
then replay with new input values; a kernel launched on any stream other than the current one would run
once at capture time and never again, so its outputs would go stale (or stay NaN-poisoned) on replay.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from _gpu import GARBAGE_PAGE_ID, PAGE, assert_allclose_flashmla, default_scale, requires_hopper
from torch._dynamo.utils import counters

import flashmla_ops
from flashmla_ops.reference import mla_decode_reference

pytestmark = [requires_hopper, pytest.mark.gpu]

D_QK = 576
D_V = 512
D_MODEL = 256
N_LAYERS = 3
H_KV = 1
# the same heads / MTP pairs as the other GPU tests use; causal=True everywhere
HQ_SQ = [(16, 1), (128, 2)]
HQ_SQ_ALL = [(16, 1), (16, 2), (128, 1), (128, 2)]

# Kernel vs kernel with a different split plan (a padded batch schedules differently): FlashMLA's tolerances.
OUT_TOL = dict(abs_tol=8e-4, rel_tol=2.01 / 128, cos_tol=5e-6)
LSE_TOL = dict(abs_tol=1e-6, rel_tol=8.01 / 65536)
# The model around the attention is bf16; Inductor may fuse (and round) it differently from eager.
MODEL_TOL = dict(rtol=2e-2, atol=2e-2)


def rand_bf16(*shape: int) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") / 10).clamp(-1, 1).to(torch.bfloat16)


def paged_caches(seqlens: list[int], num_pages: int, max_blocks: int, n_layers: int = N_LAYERS):
    """Per-layer paged caches sharing one block table, with shapes fixed by (num_pages, max_blocks) whatever
    the lengths, so that only values change between calls.

    Pages are handed out in a random order; every cache slot no request uses (tail of a last page, unused
    pages) is NaN and unused block-table columns hold a page id that must never be read.

    Returns ``(k_caches, block_table, cache_seqlens, free_pages)``; ``free_pages`` are the unused page ids.
    """
    b = len(seqlens)
    nblk = [-(-s // PAGE) for s in seqlens]
    assert max(nblk) <= max_blocks and sum(nblk) <= num_pages
    perm = torch.randperm(num_pages).tolist()
    block_table = torch.full((b, max_blocks), GARBAGE_PAGE_ID, dtype=torch.int32)
    valid = torch.zeros(num_pages, dtype=torch.long)
    nxt = 0
    for i, (s, n) in enumerate(zip(seqlens, nblk, strict=True)):
        for j in range(n):
            block_table[i, j] = perm[nxt]
            valid[perm[nxt]] = min(PAGE, s - j * PAGE)
            nxt += 1
    unused = (torch.arange(PAGE)[None, :] >= valid[:, None]).cuda()
    k_caches = []
    for _ in range(n_layers):
        k_cache = rand_bf16(num_pages, PAGE, H_KV, D_QK)
        k_cache[unused] = float("nan")
        k_caches.append(k_cache)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    return tuple(k_caches), block_table.cuda(), cache_seqlens, perm[nxt:]


class MLADecodeStep(torch.nn.Module):
    """One decode step of a small MLA model in absorbed ("MQA") form, h_kv = 1.

    Scheduler once per step, then per layer: q projection -> paged MLA decode over the layer's own cache
    -> output projection added to the hidden state. Returns the hidden state, the scheduler output and
    every layer's attention inputs and outputs (so a test can check the op in isolation).
    """

    def __init__(self, h_q: int, s_q: int, n_layers: int = N_LAYERS) -> None:
        super().__init__()
        self.h_q, self.s_q = h_q, s_q
        self.q_proj = torch.nn.ModuleList(
            torch.nn.Linear(D_MODEL, h_q * D_QK, bias=False) for _ in range(n_layers)
        )
        self.o_proj = torch.nn.ModuleList(
            torch.nn.Linear(h_q * D_V, D_MODEL, bias=False) for _ in range(n_layers)
        )

    def forward(self, x, k_caches, block_table, cache_seqlens):
        meta, num_splits = flashmla_ops.get_mla_metadata(cache_seqlens, self.s_q * self.h_q // H_KV, H_KV)
        h = x
        qs, outs, lses = [], [], []
        for q_proj, o_proj, k_cache in zip(self.q_proj, self.o_proj, k_caches, strict=True):
            q = q_proj(h).unflatten(-1, (self.h_q, D_QK))  # [b, s_q, h_q, 576]
            o, lse = flashmla_ops.flash_mla_with_kvcache(
                q, k_cache, block_table, cache_seqlens, D_V, meta, num_splits, causal=True
            )
            h = h + o_proj(o.flatten(-2))
            qs.append(q)
            outs.append(o)
            lses.append(lse)
        return h, meta, num_splits, tuple(qs), tuple(outs), tuple(lses)


def make_model(h_q: int, s_q: int) -> MLADecodeStep:
    torch.manual_seed(1234)
    return MLADecodeStep(h_q, s_q).to(device="cuda", dtype=torch.bfloat16).eval()


def step_args(model: MLADecodeStep, seqlens: list[int], num_pages: int, max_blocks: int):
    k_caches, block_table, cache_seqlens, _ = paged_caches(seqlens, num_pages, max_blocks)
    x = torch.randn(len(seqlens), model.s_q, D_MODEL, device="cuda").to(torch.bfloat16)
    return x, k_caches, block_table, cache_seqlens


def check_step(got, want, k_caches, block_table, cache_seqlens) -> None:
    """A compiled / exported step against the eager one."""
    h, meta, num_splits, qs, outs, lses = got
    # the scheduler is an integer algorithm: exact
    assert torch.equal(meta, want[1]) and torch.equal(num_splits, want[2])
    torch.testing.assert_close(h, want[0], **MODEL_TOL)
    for layer, (q, o, lse) in enumerate(zip(qs, outs, lses, strict=True)):
        # The op inside the graph computes bit for bit what it computes eagerly on the same inputs (the
        # projections feeding it may round differently once fused, so the graph's own q is the input) ...
        o_ref, lse_ref = flashmla_ops.flash_mla_with_kvcache(
            q, k_caches[layer], block_table, cache_seqlens, D_V, meta, num_splits, causal=True
        )
        assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref), f"layer {layer}"
        # ... and stays close to the eager model's attention (lse is +inf on the same empty rows)
        torch.testing.assert_close(o, want[4][layer], **MODEL_TOL)
        torch.testing.assert_close(lse, want[5][layer], **MODEL_TOL)


# ---- torch.compile ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("h_q,s_q", HQ_SQ)
def test_compile_step_no_recompile_on_new_values(h_q, s_q):
    """fullgraph Inductor compile of a 3-layer step: matches eager, and new seqlens / block tables / caches /
    hidden states with unchanged shapes reuse the one compiled graph."""
    torch._dynamo.reset()
    model = make_model(h_q, s_q)
    cnt = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=cnt, fullgraph=True, dynamic=False)
    max_blocks, num_pages = 7, 8 * 7 + 2
    batches = [
        [1, 64, 65, 200, 0, 383, 128, 17],
        [300, 2, 0, 0, 64, 129, 448, 5],
        [448] * 8,
    ]
    with torch.no_grad():
        for i, seqlens in enumerate(batches):
            torch.manual_seed(i)
            args = step_args(model, seqlens, num_pages, max_blocks)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = compiled(*args)
            check_step(got, model(*args), *args[1:])
    assert cnt.frame_count == 1


def test_compile_dynamic_batch_recompiles_at_most_once():
    """With the batch dimension marked dynamic, other batch sizes reuse the graph (at most one recompile)."""
    torch._dynamo.reset()
    model = make_model(128, 2)
    cnt = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    max_blocks = 5
    num_pages = 13 * max_blocks + 2  # cache shapes stay fixed: only the batch changes
    with torch.no_grad():
        for i, seqlens in enumerate(([70, 0, 129, 5], [1] * 13, [300, 64, 2, 250, 9, 17, 100], [3, 3])):
            torch.manual_seed(10 + i)
            args = step_args(model, seqlens, num_pages, max_blocks)
            x, _, block_table, cache_seqlens = args
            for t in (x, block_table, cache_seqlens):
                torch._dynamo.mark_dynamic(t, 0)
            check_step(compiled(*args), model(*args), *args[1:])
    assert cnt.frame_count <= 2


@pytest.mark.parametrize("h_q,s_q", HQ_SQ)
def test_reduce_overhead_growing_sequences(h_q, s_q):
    """mode="reduce-overhead" (CUDA graph trees) over 20 decode steps whose lengths grow by one token per
    step, crossing page boundaries: every step matches eager, nothing recompiles and no graph is skipped."""
    torch._dynamo.reset()
    counters.clear()
    model = make_model(h_q, s_q)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
    steps = 20
    lens = [1, 40, 62, 64, 100, 126, 190, 250]  # several cross a 64-token page boundary while growing
    b = len(lens)
    max_blocks = -(-(max(lens) + steps) // PAGE) + 1
    num_pages = b * max_blocks + 2  # every page the run can need is allocated up front
    torch.manual_seed(20)
    k_caches, block_table, cache_seqlens, free_pages = paged_caches(lens, num_pages, max_blocks)
    for k_cache in k_caches:
        # the caches keep their addresses (the usual serving setup): graph trees read them in place
        # instead of copying them into graph-owned inputs before every replay
        torch._dynamo.mark_static_address(k_cache)
    table = block_table.cpu()
    rows = torch.arange(b, device="cuda")
    with torch.no_grad():
        for step in range(steps):
            # append one token per request (done eagerly, as an engine's cache writer would): take a new page
            # from the pool when a request crosses a page boundary, write the token's latent row in every
            # layer's cache (over the NaN that filled the slot), then bump the lengths
            pos = torch.tensor(lens)
            for i, p in enumerate(lens):
                if p % PAGE == 0:
                    table[i, p // PAGE] = free_pages.pop()
            block_table.copy_(table)
            pages = block_table[rows, (pos // PAGE).cuda()].long()
            for k_cache in k_caches:
                k_cache[pages, (pos % PAGE).cuda()] = rand_bf16(b, H_KV, D_QK)
            lens = [p + 1 for p in lens]
            cache_seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
            x = torch.randn(b, s_q, D_MODEL, device="cuda").to(torch.bfloat16)
            args = (x, k_caches, block_table, cache_seqlens)

            torch.compiler.cudagraph_mark_step_begin()
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                got = compiled(*args)
            # graph-tree outputs are overwritten by the next replay: check them now
            check_step(got, model(*args), *args[1:])
    assert counters["inductor"]["cudagraph_skips"] == 0
    torch.cuda.synchronize()


# ---- manual CUDA graph capture ----------------------------------------------------------------------------
GRAPH_BATCH = 64
GRAPH_MAX_BLOCKS = 6  # up to 384 tokens per request
GRAPH_PAGES = GRAPH_BATCH * GRAPH_MAX_BLOCKS + 2


def eager_decode(qs, k_caches, block_table, cache_seqlens):
    s_q, h_q = qs[0].shape[1:3]
    meta, num_splits = flashmla_ops.get_mla_metadata(cache_seqlens, s_q * h_q // H_KV, H_KV)
    results = [
        flashmla_ops.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, D_V, meta, num_splits, causal=True
        )
        for q, k_cache in zip(qs, k_caches, strict=True)
    ]
    return meta, num_splits, results


class CapturedDecode:
    """Static inputs and outputs of a captured step: scheduler + every layer's decode via the out-variant,
    all layers sharing one preallocated workspace."""

    def __init__(self, h_q: int, s_q: int, b: int = GRAPH_BATCH) -> None:
        self.h_q, self.s_q = h_q, s_q
        kw = dict(device="cuda", dtype=torch.bfloat16)
        self.q = [torch.zeros(b, s_q, h_q, D_QK, **kw) for _ in range(N_LAYERS)]
        self.k_caches = [torch.zeros(GRAPH_PAGES, PAGE, H_KV, D_QK, **kw) for _ in range(N_LAYERS)]
        self.block_table = torch.zeros(b, GRAPH_MAX_BLOCKS, dtype=torch.int32, device="cuda")
        self.cache_seqlens = torch.zeros(b, dtype=torch.int32, device="cuda")
        self.out = [torch.empty(b, s_q, h_q, D_V, **kw) for _ in range(N_LAYERS)]
        self.lse = [torch.empty(b, h_q, s_q, dtype=torch.float32, device="cuda") for _ in range(N_LAYERS)]
        # one split-partials workspace for every layer: the captured step allocates nothing for the decode
        meta, _ = flashmla_ops.get_mla_metadata(self.cache_seqlens, s_q * h_q // H_KV, H_KV)
        self.workspace = torch.empty(
            flashmla_ops.workspace_size(meta, s_q * h_q // H_KV, H_KV), dtype=torch.float32, device="cuda"
        )
        self.graph = torch.cuda.CUDAGraph()

    def _step(self):
        num_q_tokens_per_head_k = self.s_q * self.h_q // H_KV
        meta, num_splits = flashmla_ops.get_mla_metadata(self.cache_seqlens, num_q_tokens_per_head_k, H_KV)
        for q, k_cache, out, lse in zip(self.q, self.k_caches, self.out, self.lse, strict=True):
            flashmla_ops.flash_mla_with_kvcache(
                q,
                k_cache,
                self.block_table,
                self.cache_seqlens,
                D_V,
                meta,
                num_splits,
                causal=True,
                out=out,
                lse=lse,
                workspace=self.workspace,
            )
        return meta, num_splits

    def capture(self) -> None:
        # warm up on a side stream, as torch.cuda.graphs' documentation asks
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph):
            # the scheduler's outputs live in the graph's pool; keep them to compare after replays
            self.meta, self.num_splits = self._step()

    def load(self, qs, k_caches, block_table, cache_seqlens) -> None:
        for dst, src in zip(self.q + self.k_caches, list(qs) + list(k_caches), strict=True):
            dst.copy_(src)
        self.block_table.copy_(block_table)
        self.cache_seqlens.copy_(cache_seqlens)

    def replay(self) -> None:
        for t in self.out + self.lse:
            t.fill_(float("nan"))  # an element the replay does not write stays NaN
        self.graph.replay()


def random_batch(h_q: int, s_q: int, seqlens: list[int]):
    k_caches, block_table, cache_seqlens, free_pages = paged_caches(seqlens, GRAPH_PAGES, GRAPH_MAX_BLOCKS)
    qs = [rand_bf16(len(seqlens), s_q, h_q, D_QK) for _ in range(N_LAYERS)]
    return qs, k_caches, block_table, cache_seqlens, free_pages


def random_seqlens(b: int) -> list[int]:
    seqlens = torch.randint(1, GRAPH_MAX_BLOCKS * PAGE + 1, (b,))
    seqlens[torch.rand(b) < 0.1] = 0
    return seqlens.tolist()


@pytest.mark.parametrize("h_q,s_q", HQ_SQ_ALL)
def test_cuda_graph_replay_new_values(h_q, s_q):
    """Scheduler + 3 layers captured once for 64 requests, replayed 5 times with new q, lengths, block
    tables and cache contents: bit-identical to eager every time (same kernels, same schedule)."""
    torch.manual_seed(30 + h_q + s_q)
    g = CapturedDecode(h_q, s_q)
    g.load(*random_batch(h_q, s_q, random_seqlens(GRAPH_BATCH))[:4])
    g.capture()
    for _ in range(5):
        qs, k_caches, block_table, cache_seqlens, _ = random_batch(h_q, s_q, random_seqlens(GRAPH_BATCH))
        g.load(qs, k_caches, block_table, cache_seqlens)
        g.replay()
        meta, num_splits, want = eager_decode(qs, k_caches, block_table, cache_seqlens)
        assert torch.equal(g.meta, meta) and torch.equal(g.num_splits, num_splits)
        for layer, (o, lse) in enumerate(want):
            assert torch.equal(g.out[layer], o) and torch.equal(g.lse[layer], lse), f"layer {layer}"
    torch.cuda.synchronize()


@pytest.mark.parametrize("pad_len", [0, 1])
@pytest.mark.parametrize("h_q,s_q", HQ_SQ)
def test_cuda_graph_padded_batch(h_q, s_q, pad_len):
    """A graph captured for 64 requests serving 37: the 27 padding rows get length 0 (garbage block-table
    rows) or 1 (one shared valid page). The real rows match eager on the 37-request batch, the padding rows
    hold the documented result, and no kernel touches memory it should not."""
    n_real = 37
    torch.manual_seed(40 + h_q + s_q + pad_len)
    g = CapturedDecode(h_q, s_q)
    g.load(*random_batch(h_q, s_q, random_seqlens(GRAPH_BATCH))[:4])
    g.capture()

    qs, k_caches, block_table, cache_seqlens, free_pages = random_batch(h_q, s_q, random_seqlens(n_real))
    n_pad = GRAPH_BATCH - n_real
    pad_table = torch.full((n_pad, GRAPH_MAX_BLOCKS), GARBAGE_PAGE_ID, dtype=torch.int32, device="cuda")
    if pad_len:
        dummy = free_pages[0]
        for k_cache in k_caches:  # token 0 of the shared padding page is real data, the rest stays NaN
            k_cache[dummy, 0] = rand_bf16(H_KV, D_QK)
        pad_table[:, 0] = dummy
    pad_seqlens = torch.full((n_pad,), pad_len, dtype=torch.int32, device="cuda")
    pad_qs = [rand_bf16(n_pad, s_q, h_q, D_QK) for _ in range(N_LAYERS)]
    g.load(
        [torch.cat([q, pq]) for q, pq in zip(qs, pad_qs, strict=True)],
        k_caches,
        torch.cat([block_table, pad_table]),
        torch.cat([cache_seqlens, pad_seqlens]),
    )
    g.replay()
    torch.cuda.synchronize()  # surfaces an illegal address from the replay, if any

    _, _, want = eager_decode(qs, k_caches, block_table, cache_seqlens)
    pad_meta, pad_splits = flashmla_ops.get_mla_metadata(pad_seqlens, s_q * h_q // H_KV, H_KV)
    for layer, (o, lse) in enumerate(want):
        # real rows: the 64-request schedule splits the work differently, so equal up to rounding
        assert_allclose_flashmla(g.out[layer][:n_real], o, **OUT_TOL)
        assert_allclose_flashmla(g.lse[layer][:n_real], lse, **LSE_TOL)
        pad_out, pad_lse = g.out[layer][n_real:], g.lse[layer][n_real:]
        assert torch.isfinite(pad_out).all() and not torch.isnan(pad_lse).any()
        if pad_len == 0:
            # documented result of an empty request
            assert torch.equal(pad_out, torch.zeros_like(pad_out)) and torch.isposinf(pad_lse).all()
        else:
            # one visible token (none for the first of two causal query tokens: out 0, lse +inf)
            ref_out, ref_lse = mla_decode_reference(
                pad_qs[layer],
                k_caches[layer],
                pad_table,
                pad_seqlens,
                D_V,
                pad_meta,
                pad_splits,
                default_scale(),
                True,
            )
            assert_allclose_flashmla(pad_out, ref_out, **OUT_TOL)
            assert_allclose_flashmla(pad_lse, ref_lse, **LSE_TOL)
    torch.cuda.synchronize()


# ---- torch.export -----------------------------------------------------------------------------------------
def test_export_static():
    """torch.export of the step (static shapes); the exported module runs on the GPU like eager."""
    model = make_model(16, 1)
    max_blocks, num_pages = 5, 6 * 5 + 2
    torch.manual_seed(50)
    args = step_args(model, [70, 0, 129, 5, 320, 64], num_pages, max_blocks)
    with torch.no_grad():
        exported = torch.export.export(model, args)
        targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
        assert torch.ops.flashmla.get_mla_metadata.default in targets
        assert torch.ops.flashmla.mla_decode.default in targets
        for seed, seqlens in enumerate(([70, 0, 129, 5, 320, 64], [1, 2, 3, 300, 299, 0])):
            torch.manual_seed(51 + seed)
            args = step_args(model, seqlens, num_pages, max_blocks)
            check_step(exported.module()(*args), model(*args), *args[1:])


def test_export_dynamic_batch():
    """torch.export with a symbolic batch dimension (torch.export.Dim): one exported program serves
    other batch sizes."""
    model = make_model(128, 2)
    max_blocks, num_pages = 5, 16 * 5 + 2
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic_shapes = {
        "x": {0: batch},
        "k_caches": (None,) * N_LAYERS,
        "block_table": {0: batch},
        "cache_seqlens": {0: batch},
    }
    torch.manual_seed(60)
    args = step_args(model, [70, 0, 129, 5, 320], num_pages, max_blocks)
    with torch.no_grad():
        exported = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
        for seed, seqlens in enumerate(([70, 0, 129, 5, 320], [1] * 16, [300, 2], [7])):
            torch.manual_seed(61 + seed)
            args = step_args(model, seqlens, num_pages, max_blocks)
            check_step(exported.module()(*args), model(*args), *args[1:])
