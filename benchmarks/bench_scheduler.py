"""Time the on-device tile scheduler (``get_mla_metadata``), which runs once per decode step.

Prints the median time of one call (triton.testing.do_bench) for a few batch sizes and part counts, with
uniform and random lengths. Usage: ``python benchmarks/bench_scheduler.py [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

import flashmla_ops  # noqa: F401  (registers the ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'b':>6} {'parts':>5} {'lengths':>8} {'us':>8} {'split reqs':>10}")
    for b in (1, 32, 128, 1024, 16384):
        for parts in (66, 132):
            for kind in ("uniform", "random"):
                if kind == "uniform":
                    seqlens = torch.full((b,), 4096, dtype=torch.int32)
                else:
                    seqlens = torch.randint(1, 16385, (b,), generator=gen, dtype=torch.int32)
                seqlens = seqlens.cuda()
                fn = lambda s=seqlens, p=parts: torch.ops.flashmla.get_mla_metadata(s, 128, 1, p)  # noqa: E731
                us = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
                ns = fn()[1]
                split = int((ns[1:] > ns[:-1]).sum())
                rows.append(dict(b=b, parts=parts, lengths=kind, us=us, split_requests=split))
                print(f"{b:>6} {parts:>5} {kind:>8} {us:>8.1f} {split:>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
