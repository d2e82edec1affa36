"""A representative subset of decode cases, run under compute-sanitizer (memcheck, racecheck) on a GPU.

Covers: split and unsplit requests, seqlen 0, MTP causal rows that see nothing, odd head counts with several
kv heads, more than one m-block (h_q * s_q > 64), a partial last page with NaN past the end, fp16 and bf16,
every combine grid (few requests split over many parts, in both register builds; many split requests with
8- and 16-byte lanes); the FP8 kernels (per-tensor e4m3 with bf16 and fp16 q, DeepSeek V3.2 with a padded page
stride), their pages expanded in place in shared memory (more than 32 query rows per kv head) or converted in
registers (the ping-pong kernel), with poisoned unused slots; the batch-invariant
schedule (chunked requests, empty parts, the combine's row arithmetic in its few-requests grid), bf16 and FP8.
`python3 tools/sanitizer_cases.py fp8` runs the FP8 cases only.
"""

import sys

import torch

sys.path.insert(0, "tests")
from _fp8 import make_fp8_inputs  # noqa: E402
from _gpu import make_inputs, run_decode  # noqa: E402

import flashmla_ops  # noqa: E402

CASES = [
    # b, s_q, h_q, h_kv, seqlens, dtype
    (4, 2, 128, 1, [0, 1, 700, 3000], torch.bfloat16),
    (3, 4, 9, 3, [140, 0, 20], torch.float16),
    (2, 1, 16, 1, [4096, 65], torch.bfloat16),
    # one request of 128 rows: the eight-warp combine grid in its 64-register build (> 3 CTAs per SM)
    (1, 1, 128, 1, [5000], torch.bfloat16),
    (6, 2, 63, 1, [20, 140, 1, 0, 64, 129], torch.bfloat16),
    # enough split requests for the combine's wide grid (16-byte lanes)
    (24, 1, 128, 1, [1000 + 37 * i for i in range(24)], torch.bfloat16),
    (70, 1, 16, 1, [300 + 11 * i for i in range(70)], torch.float16),
]

ONLY_FP8 = sys.argv[1:] == ["fp8"]
for b, s_q, h_q, h_kv, lens, dtype in [] if ONLY_FP8 else CASES:
    torch.manual_seed(0)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q, k_cache, block_table = make_inputs(b, s_q, h_q, h_kv, seqlens, dtype)
    out, lse, meta, num_splits = run_decode(q, k_cache, block_table, seqlens, causal=True)
    torch.cuda.synchronize()
    print(f"case b={b} s_q={s_q} h_q={h_q} h_kv={h_kv} ok, NaN in out: {bool(torch.isnan(out).any())}")
FP8_CASES = [
    # seqlens, s_q, h_q, h_kv, format, dtype, page_pad
    ([0, 65, 700, 4097], 2, 64, 1, "per_tensor", torch.bfloat16, 0),
    ([130, 1, 64], 1, 32, 2, "per_tensor", torch.float16, 0),
    ([3000, 70], 4, 128, 1, "v32", torch.bfloat16, 64),
    # the ping-pong kernel (<= 32 query rows per kv head): 32 rows with the causal mask, 16 rows V3.2 and
    # fp16 q, 32 rows V3.2
    ([0, 65, 700, 4097, 5], 2, 16, 1, "per_tensor", torch.bfloat16, 0),
    ([130, 1, 0, 3000], 1, 16, 1, "v32", torch.bfloat16, 64),
    ([300, 0, 64, 1000], 1, 16, 1, "per_tensor", torch.float16, 0),
    ([2000, 63], 2, 16, 1, "v32", torch.bfloat16, 0),
]
for lens, s_q, h_q, h_kv, fmt, dtype, pad in FP8_CASES:
    inp = make_fp8_inputs(lens, s_q, h_q, h_kv, fmt, dtype, seed=1, page_pad=pad).to_cuda()
    meta, num_splits = flashmla_ops.get_mla_metadata(inp.cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flashmla_ops.flash_mla_with_kvcache(
        inp.q,
        inp.k_cache,
        inp.block_table,
        inp.cache_seqlens,
        512,
        meta,
        num_splits,
        None,
        True,
        is_fp8_kvcache=True,
        k_scale=inp.k_scale,
    )
    torch.cuda.synchronize()
    print(f"fp8 case {fmt} s_q={s_q} h_q={h_q} h_kv={h_kv} ok, NaN in out: {bool(torch.isnan(out).any())}")
# The batch-invariant schedule: requests cut into chunks (several per part, segments ending at chunk
# boundaries; empty parts past the working ones), the few-requests combine grid with the row arithmetic, FP8.
INVARIANT_CASES = [
    # seqlens, s_q, h_q, kv format
    ([9000, 0, 130, 20_000], 1, 16, None),
    ([40_000], 2, 128, None),
    ([12_000, 70], 1, 64, "per_tensor"),
]
for lens, s_q, h_q, fmt in [c for c in INVARIANT_CASES if c[3] is not None or not ONLY_FP8]:
    torch.manual_seed(0)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q, k_cache, block_table = make_inputs(len(lens), s_q, h_q, 1, seqlens, torch.bfloat16)
    k_scale = None
    if fmt is not None:
        k_cache, k_scale = flashmla_ops.quantize_kv_cache(k_cache, fmt)
    meta, num_splits = flashmla_ops.get_mla_metadata(
        seqlens, s_q * h_q, 1, batch_invariant=True, max_seqlen_k=max(lens)
    )
    out, lse = flashmla_ops.flash_mla_with_kvcache(
        q, k_cache, block_table, seqlens, 512, meta, num_splits, None, True, fmt is not None, k_scale=k_scale
    )
    torch.cuda.synchronize()
    print(f"invariant case {lens} s_q={s_q} h_q={h_q} {fmt} ok, NaN in out: {bool(torch.isnan(out).any())}")
print("sanitizer cases done")
