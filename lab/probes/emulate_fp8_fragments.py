"""numpy emulation of the FP8 ping-pong kernel's wgmma fragments
(csrc/kernels/sm90/mainloop_pingpong_fp8.cuh), no GPU: does what each thread loads and converts compute
K Q^T and V^T P^T?

It places a page's values in a staging slot the way TMA does (128-column value boxes with the 128B swizzle:
16-byte chunk c of token row t at chunk c ^ t % 8; the per-tensor RoPE as plain 64-byte rows, V3.2's bf16 RoPE
as swizzled 128-byte rows), lets every (warp, lane) of a warpgroup gather its A registers as the kernel does
(16-byte K loads of chunk 2 qq + g % 2; ldmatrix.trans rows, the 0x3120 byte permute), reads them back with
the wgmma A-fragment layout (register 0: row lane / 4, k 2 (lane % 4) + {0, 1}; register 1: row + 8;
registers 2, 3: k + 8), and compares:
  * the logical A (tokens x permuted k) times Q stored by q_logical against K Q^T;
  * the logical V^T (permuted V columns x tokens) times P^T, written back through the epilogue's column order,
    against V^T P^T.
Values are small integers, so the products are exact. Change this file with the kernel's layouts.

    python3 lab/probes/emulate_fp8_fragments.py
"""

from __future__ import annotations

import numpy as np

UNSET = 10**9


def q_logical(c: int, fmt: str) -> tuple[int, int]:
    """k-step S and position in it of source column c (even), as the kernel's q_logical."""
    hi = 8 if c & 3 else 0
    if c < 512:
        box, chunk = c >> 7, (c & 127) >> 4
        return 4 * (2 * box + (chunk & 1)) + ((c & 15) >> 2), 2 * (chunk >> 1) + hi
    w = c - 512
    if fmt == "per_tensor":
        return 32 + ((w & 15) >> 2), 2 * (w >> 4) + hi
    chunk = w >> 3
    return 32 + 2 * (chunk & 1) + ((w & 7) >> 2), 2 * (chunk >> 1) + hi


def stage(k: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """The slot's value boxes (4 x 64 rows x 128 values) and RoPE area (64 rows x 64 values)."""
    boxes = np.zeros((4, 64 * 128), dtype=np.int64)
    for b in range(4):
        for t in range(64):
            for c in range(8):
                boxes[b, t * 128 + ((c ^ (t % 8)) * 16) : t * 128 + ((c ^ (t % 8)) * 16) + 16] = k[
                    t, 128 * b + 16 * c : 128 * b + 16 * c + 16
                ]
    rope = np.zeros(64 * 64, dtype=np.int64)  # indexed by value, not byte
    for t in range(64):
        if fmt == "per_tensor":
            rope[t * 64 : t * 64 + 64] = k[t, 512:]
        else:  # bf16: eight 8-value chunks per row, swizzled
            for c in range(8):
                dst = t * 64 + (c ^ (t % 8)) * 8
                rope[dst : dst + 8] = k[t, 512 + 8 * c : 520 + 8 * c]
    return boxes, rope


def fragment_put(a: np.ndarray, warp: int, lane: int, kstep: int, reg: int, pair) -> None:
    m = 16 * warp + lane // 4 + (8 if reg in (1, 3) else 0)
    kk = 16 * kstep + 2 * (lane % 4) + (8 if reg in (2, 3) else 0)
    a[m, kk], a[m, kk + 1] = pair


def check_s(k: np.ndarray, q: np.ndarray, fmt: str) -> None:
    boxes, rope = stage(k, fmt)
    a = np.full((64, 576), UNSET, dtype=np.int64)
    for warp in range(4):
        for lane in range(32):
            qq, r0 = lane % 4, 16 * warp + lane // 4
            for g in range(9):
                rows = []
                for rr in range(2):
                    t = r0 + 8 * rr
                    if g < 8:
                        chunk = 2 * qq + (g & 1)
                        off = t * 128 + ((chunk ^ (t & 7)) << 4)
                        rows.append(boxes[g >> 1, off : off + 16])
                    elif fmt == "per_tensor":
                        rows.append(rope[t * 64 + qq * 16 : t * 64 + qq * 16 + 16])
                    else:  # chunks 2 qq and 2 qq + 1, 8 bf16 values each
                        e0 = t * 64 + ((2 * qq) ^ (t & 7)) * 8
                        e1 = t * 64 + ((2 * qq + 1) ^ (t & 7)) * 8
                        rows.append(np.concatenate([rope[e0 : e0 + 8], rope[e1 : e1 + 8]]))
                # k-step 4 g + i: 4 values of each row (bytes, or bf16 values for the V3.2 RoPE)
                for i in range(4):
                    for rr in range(2):
                        v = rows[rr][4 * i : 4 * i + 4]
                        fragment_put(a, warp, lane, 4 * g + i, rr, v[0:2])
                        fragment_put(a, warp, lane, 4 * g + i, 2 + rr, v[2:4])
    assert (a != UNSET).all()
    ql = np.zeros_like(q)
    for c in range(0, 576, 2):
        s, pp = q_logical(c, fmt)
        ql[:, 16 * s + pp], ql[:, 16 * s + pp + 1] = q[:, c], q[:, c + 1]
    assert np.array_equal(a @ ql.T, k @ q.T), f"S^T, {fmt}"


def check_o(k: np.ndarray, p: np.ndarray, fmt: str) -> None:
    boxes, _ = stage(k, fmt)
    out = np.zeros((512, p.shape[0]), dtype=np.int64)
    for mb in range(8):
        a = np.full((64, 64), UNSET, dtype=np.int64)  # M rows (permuted V columns) x tokens
        for warp in range(4):
            chunk = 4 * (mb & 1) + warp
            for sp in range(2):
                # lane L gives the row address of matrix L / 8: token 32 sp + L
                row = [
                    boxes[mb >> 1, (32 * sp + x) * 128 + ((chunk ^ (x & 7)) << 4) :][:16] for x in range(32)
                ]
                for lane in range(32):
                    for mi in range(4):
                        # .trans: this lane gets unit lane / 4 of rows 2 (lane % 4) and 2 (lane % 4) + 1
                        ra, rb, u = row[8 * mi + 2 * (lane % 4)], row[8 * mi + 2 * (lane % 4) + 1], lane // 4
                        b0, b1, b2, b3 = ra[2 * u], ra[2 * u + 1], rb[2 * u], rb[2 * u + 1]
                        # byte permute 0x3120 -> (b0, b2, b1, b3); cvt: (b0, b2) then (b1, b3)
                        kstep, base = 2 * sp + mi // 2, 2 * (mi % 2)
                        fragment_put(a, warp, lane, kstep, base, (b0, b2))
                        fragment_put(a, warp, lane, kstep, base + 1, (b1, b3))
        assert (a != UNSET).all()
        acc = a @ p.T
        for warp in range(4):
            for lane in range(32):
                # the epilogue: M row r0 + 8 rr is column 64 mb + 16 warp + 2 (lane / 4) + rr
                for rr in range(2):
                    out[64 * mb + 16 * warp + 2 * (lane // 4) + rr] = acc[16 * warp + lane // 4 + 8 * rr]
    assert np.array_equal(out, k[:, :512].T @ p.T), f"O^T, {fmt}"


def main() -> None:
    rng = np.random.default_rng(0)
    for fmt in ("per_tensor", "v32"):
        for n in (16, 32):
            k = rng.integers(-50, 50, size=(64, 576)).astype(np.int64)
            check_s(k, rng.integers(-50, 50, size=(n, 576)).astype(np.int64), fmt)
            check_o(k, rng.integers(-50, 50, size=(n, 64)).astype(np.int64), fmt)
            print(f"{fmt} N={n}: S^T and O^T fragments match")


if __name__ == "__main__":
    main()
