"""Static SASS instruction counts of the decode kernels, ours and a peer's, side by side.

Reads `cuobjdump -sass` listings (or runs cuobjdump on a .so / .cubin) and counts, per kernel whose name
matches --kernel, the instruction classes that differ between MLA decode loops: wgmma (HGMMA), named / CTA
barriers (BAR), mbarrier and TMA traffic (SYNCS, UTMALDG / UBLKCP), exp2 (MUFU.EX2), fp32 math (FMUL, FFMA,
FADD, FMNMX), shared-memory matrix moves (STSM, LDSM), shared loads and stores, local memory (spills), total.

    python lab/profiling/sass_counts.py ours=flashmla_ops/_C.abi3.so \
        flashmla=/tmp/peers/flash_mla/_C_legacy.abi3.so --kernel "seesaw|splitkv_mla" [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess

CLASSES = [
    ("HGMMA", r"^HGMMA"),
    ("WARPGROUP", r"^WARPGROUP"),
    ("BAR", r"^BAR\b"),
    ("BAR.SYNC", r"^BAR\.SYNC"),
    ("BAR.ARV", r"^BAR\.ARV"),
    ("SYNCS", r"^SYNCS"),
    ("UTMALDG", r"^UTMALDG"),
    ("UTMASTG", r"^UTMASTG"),
    ("UBLKCP", r"^UBLKCP"),
    ("MUFU.EX2", r"^MUFU\.EX2"),
    ("FMUL", r"^FMUL\b"),
    ("FFMA", r"^FFMA\b"),
    ("FADD", r"^FADD\b"),
    ("FMNMX", r"^FMNMX"),
    ("F2FP", r"^F2FP"),
    ("STSM", r"^STSM"),
    ("LDSM", r"^LDSM"),
    ("LDS", r"^LDS\b"),
    ("STS", r"^STS\b"),
    ("LDG", r"^LDG"),
    ("STG", r"^STG"),
    ("LDL/STL", r"^(LDL|STL)"),
    ("SHFL", r"^SHFL"),
    ("BRA", r"^BRA"),
]


def listing(path: str) -> str:
    if path.endswith((".txt", ".sass")):
        return open(path).read()
    cmd = ["cuobjdump", "-sass", "-arch", "sm_90a", path]  # peers' fat binaries also carry sm_100a+ code
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def count(text: str, kernel_re: str) -> dict[str, collections.Counter]:
    """{kernel name: Counter of classes and 'total'} for every function matching kernel_re."""
    out: dict[str, collections.Counter] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1) if re.search(kernel_re, m.group(1)) else None
            if current:
                out[current] = collections.Counter()
            continue
        if current is None:
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not m:
            continue
        op = m.group(1)
        out[current]["total"] += 1
        for name, pat in CLASSES:
            if re.match(pat, op):
                out[current][name] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "inputs", nargs="+", help="label=path[@regex]: .so, .cubin or cuobjdump -sass listing, + kernel regex"
    )
    ap.add_argument("--kernel", default="seesaw|serial|splitkv_mla", help="regex on the mangled kernel name")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    table: dict[str, dict[str, int]] = {}
    for spec in args.inputs:
        label, path = spec.split("=", 1)
        path, _, kernel_re = path.partition("@")
        found = count(listing(path), kernel_re or args.kernel)
        for i, counter in enumerate(found.values()):
            table[label if len(found) == 1 else f"{label}:{i}"] = dict(counter)
    names = ["total"] + [n for n, _ in CLASSES]
    cols = list(table)
    print("| class | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for n in names:
        print(f"| {n} | " + " | ".join(str(table[c].get(n, 0)) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
