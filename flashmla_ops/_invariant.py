"""The batch-invariant chunk rule, shared by the public API (workspace bound), the reference scheduler and
(mirrored) the CUDA scheduler and main loops (``csrc/kernels/params.h``: ``invariant_chunk_blocks``)."""

from __future__ import annotations

from ._validation import PAGE_SIZE

__all__ = [
    "ctas_per_part",
    "INVARIANT_CHUNK_CUBE",
    "INVARIANT_CTA_TARGET",
    "invariant_chunks",
    "invariant_max_pieces",
    "invariant_target_chunks",
]

#: Batch-invariant chunk rule (csrc/kernels/params.h: kInvariantChunkCube, kInvariantCtaTarget).
INVARIANT_CHUNK_CUBE = 1 << 21
INVARIANT_CTA_TARGET = 128


def ctas_per_part(num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """CTAs that work on one part: query tiles of 64 rows per kv head, times kv heads (the head geometry)."""
    return -(-num_q_tokens_per_head_k // 64) * num_heads_k


def invariant_target_chunks(nblk: int, ctas_per_part: int) -> int:
    """The target chunk count ``n`` of the rule below; it never decreases with ``nblk`` (the realised count
    can: 763 blocks give 128 chunks, 769 give 110), so it is the one that bounds a batch's partials."""
    n_max = max(1, INVARIANT_CTA_TARGET // ctas_per_part)
    return n_max if nblk > 4096 else min(n_max, max(1, -(-(nblk**3) // INVARIANT_CHUNK_CUBE)))


def invariant_chunks(nblk: int, ctas_per_part: int) -> tuple[int, int]:
    """The batch-invariant cut of a request of ``nblk`` blocks: ``(chunk_blocks, n_chunks)``.

    ``n = min(max(1, 128 // ctas_per_part), ceil(nblk^3 / 2^21))`` target chunks (so a request of up to 128
    blocks, 8,192 tokens, is never cut, and a long one is cut into about enough chunks to fill 128 CTAs);
    every chunk but the last has ``chunk_blocks = ceil(nblk / n)`` blocks, and ``n_chunks =
    ceil(nblk / chunk_blocks)``. ``ctas_per_part`` is the CTAs that work on one part (query tiles per kv
    head times kv heads): the head geometry, never the batch. Mirrors ``invariant_chunk_blocks`` in
    ``csrc/kernels/params.h``.
    """
    chunk = -(-nblk // invariant_target_chunks(nblk, ctas_per_part))
    return chunk, -(-nblk // chunk)


def invariant_max_pieces(b: int, max_seqlen_k: int, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """Upper bound of the split partials of a batch-invariant schedule of ``b`` requests of at most
    ``max_seqlen_k`` tokens: ``b`` times the target chunk count at ``max_seqlen_k`` (0 if nothing that long
    is cut). A shorter request never has more chunks: its realised count is at most its own target, and the
    target does not decrease with the length."""
    ctas = ctas_per_part(num_q_tokens_per_head_k, num_heads_k)
    n = invariant_target_chunks(max(1, -(-max(max_seqlen_k, 0) // PAGE_SIZE)), ctas)
    return b * n if n > 1 else 0
