"""SM clock and board power while each implementation is timed with the sweep's timer (do_bench, L2 flushed).

Nsight Compute times one call of a kernel in isolation; the sweep times ~200 ms of back-to-back calls with a
256 MB L2 flush before each. If the GPU is power-limited during the sweep, its clock drops and a kernel that
moves or computes more per result loses more. This samples `nvidia-smi` (asked for every 20 ms; it delivers
~every 50 ms) during each timing and prints the median SM clock and power next to the time. Unlike the sweep,
each implementation starts after a 0.5 s pause. Power is `power.draw.instant` where nvidia-smi knows it
(`power.draw` is a one-second average, which would mostly cover the pause), with the software power-cap
clock-event reason; older nvidia-smi versions fall back to `power.draw` alone.

  python lab/probes/probe_clocks.py --shape 128,2,128,8192 --shape 128,1,16,8192 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime

import torch

# The benchmark's implementations and inputs (benchmarks/bench_mla_decode.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from bench_mla_decode import FlashInfer, FlashMLA, Ours, bench, make_case  # noqa: E402

# Preferred query first; the second works on any driver.
QUERIES = (
    "timestamp,clocks.sm,power.draw.instant,clocks_event_reasons.sw_power_cap",
    "timestamp,clocks.sm,power.draw",
)


def pick_query() -> str:
    for fields in QUERIES:
        r = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        )
        if r.returncode == 0 and "not a valid field" not in r.stdout + r.stderr:
            return fields
    return QUERIES[-1]


def parse_smi(lines):
    """'2026/11/22 20:10:00.123, 1755, 512.3[, Active]' -> (epoch s, MHz, W, power cap active or None)."""
    out = []
    for line in lines:
        parts = [x.strip() for x in line.split(",")]
        if len(parts) not in (3, 4):
            continue
        try:
            t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            cap = (parts[3] == "Active") if len(parts) == 4 else None
            out.append((t, float(parts[1]), float(parts[2]), cap))
        except ValueError:
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", required=True, help="b,s_q,h_q,s_k (repeatable)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    import triton  # noqa: F401  (imported here, not inside the first timing window)

    fields = pick_query()
    print(f"nvidia-smi fields: {fields}")
    log = open("/tmp/probe_clocks_smi.csv", "w")
    smi = subprocess.Popen(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-lms", "20"],
        stdout=log,
        stderr=subprocess.DEVNULL,
    )
    spans = []
    try:
        time.sleep(1.0)
        for sh in args.shape:
            b, s_q, h_q, s_k = (int(x) for x in sh.split(","))
            q, k_cache, block_table, seqlens, _ = make_case(b, s_q, h_q, s_k, False, torch.bfloat16)
            for impl in (Ours, FlashMLA, FlashInfer):
                try:
                    f = impl(q, k_cache, block_table, seqlens, True, 576**-0.5)
                except Exception as e:  # peer missing
                    print(f"{impl.name}: {type(e).__name__}: {e}"[:160])
                    continue
                f()
                torch.cuda.synchronize()
                time.sleep(0.5)  # the same starting temperature for each
                t0 = time.time()
                us = bench(f)
                t1 = time.time()
                spans.append(dict(shape=sh, impl=impl.name, us=us, t0=t0, t1=t1))
            del q, k_cache
            torch.cuda.empty_cache()
        time.sleep(0.2)
    finally:
        smi.terminate()
        smi.wait()
        log.close()
    samples = parse_smi(open("/tmp/probe_clocks_smi.csv").read().splitlines())
    cols = f"{'MHz p50':>8} {'MHz min':>8} {'W p50':>7} {'cap':>5} {'n':>4}"
    print(f"{'shape':>16} {'impl':>12} {'us':>9} {cols}")
    for s in spans:
        # Skip do_bench's first 30 ms (its warm-up estimate) and keep the timed part.
        win = [x for x in samples if s["t0"] + 0.03 <= x[0] <= s["t1"]]
        s["mhz_p50"] = statistics.median(x[1] for x in win) if win else None
        s["mhz_min"] = min(x[1] for x in win) if win else None
        s["w_p50"] = statistics.median(x[2] for x in win) if win else None
        caps = [x[3] for x in win if x[3] is not None]
        s["power_cap_frac"] = sum(caps) / len(caps) if caps else None
        s["samples"] = len(win)
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(
            f"{s['shape']:>16} {s['impl']:>12} {s['us']:9.1f} {fmt(s['mhz_p50'], '8.0f')} "
            f"{fmt(s['mhz_min'], '8.0f')} {fmt(s['w_p50'], '7.0f')} {fmt(s['power_cap_frac'], '5.2f')} "
            f"{s['samples']:4d}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), smi_fields=fields, rows=spans), fh, indent=1)


if __name__ == "__main__":
    main()
