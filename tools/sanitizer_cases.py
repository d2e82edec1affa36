"""A representative subset of decode cases, run under compute-sanitizer (memcheck, racecheck) on a GPU.

Covers: split and unsplit requests, seqlen 0, MTP causal rows that see nothing, odd head counts with several
kv heads, more than one m-block (h_q * s_q > 64), a partial last page with NaN past the end, fp16 and bf16,
every combine grid (few requests split over many parts, in both register builds; many split requests with
8- and 16-byte lanes).
"""

import sys

import torch

sys.path.insert(0, "tests")
from _gpu import make_inputs, run_decode  # noqa: E402

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

for b, s_q, h_q, h_kv, lens, dtype in CASES:
    torch.manual_seed(0)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q, k_cache, block_table = make_inputs(b, s_q, h_q, h_kv, seqlens, dtype)
    out, lse, meta, num_splits = run_decode(q, k_cache, block_table, seqlens, causal=True)
    torch.cuda.synchronize()
    print(f"case b={b} s_q={s_q} h_q={h_q} h_kv={h_kv} ok, NaN in out: {bool(torch.isnan(out).any())}")
print("sanitizer cases done")
